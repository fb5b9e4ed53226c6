"""PZEM meters on a pseudo-terminal, speaking real Modbus RTU (CRC-16/MODBUS, exception replies).

The simulator is a Modbus RTU *slave*: a program opens the pty's slave side (``Simulator.path``) exactly as
it would open ``/dev/ttyUSB0``. It serves any number of meters, each a model from ``dcmon.models`` (the same
register tables the poller decodes with: that is why it can never be the only check of decoding; see
tests/test_frames.py for frames from the manual and other implementations).

What it does, like a real meter:
- function 0x04 reads of the input-register block (asking past the map: exception 02), 0x03 reads and 0x06
  writes of the settings (out-of-range value: exception 03; writing the address register moves the meter),
  0x42 reset energy (4-byte echo), unknown functions: exception 01; broadcast (0) writes get no reply;
  the general address 0xF8 is answered by every meter (so two meters make a collision, as on a real bus);
- silence for addresses it does not serve, for frames with a bad CRC, and for meters set ``silent``;
- plausible, consistent, changing values: V wanders, I follows a slow cycle, P = V × I, energy integrates P;
  or, ``steady``, V and I fixed at the meter's base values (documentation examples that can be reproduced);
- the shunt code matters: the meter reports shunt-mV × (range amps / 75 mV), so a meter whose code does not
  match its physical shunt (``true_shunt_a``) reports current off by the ratio, like the real thing;
- optional faults: ``boot_garbage_s`` (wrong values with a valid CRC just after power-up), ``garble``
  (corrupt CRC), ``reject_writes`` (a write is echoed but not stored), ``silent`` (a dead meter);
- line faults (``LineFaults``, per address: leading junk, a foreign-address reply first, a truncated reply
  first, one-shot garbage replies; on the Simulator: ``echo`` of every request, ``noise()`` bursts);
- optional wire timing: ``timing=True`` delays each reply by the request and reply lengths on a
  9600-baud 8N2 (or 8N1) line, the 3.5-character silence that ends the request, and ``turnaround_s``, so
  throughput can be measured against the wire limit.
"""

from __future__ import annotations

import logging
import math
import os
import random
import select
import struct
import termios
import threading
import time
import tty
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from pymodbus.framer.rtu import FramerRTU

from .models import MODELS, Model, encode

log = logging.getLogger(__name__)

GENERAL_ADDRESS = 0xF8


def crc16(data: bytes) -> bytes:
    """CRC-16/MODBUS of ``data``, as the two bytes sent on the wire (low byte first)."""
    return FramerRTU.compute_CRC(data).to_bytes(2, "big")


def frame(body: bytes) -> bytes:
    return body + crc16(body)


@dataclass
class LineFaults:
    """What the line (or a misbehaving adapter or neighbour) does to the replies for one address: the fault
    modes of issue 12, for tests and bench/bench_bus.py. All off by default; set them before or while serving
    (``Simulator.faults(address)``). The bytes added are sent in one write with the reply and count in the wire
    timing (``timing=True``) like the reply's own.

    - ``junk``: these bytes before every reply, and alone when there is none (a transceiver turning around
      emits 0x00; noise on an unbiased line);
    - ``foreign``: before every reply, a whole valid reply from this other address (a neighbour answering, or
      a second master's exchange);
    - ``truncate``: before every reply, its first N bytes (a reply cut short), then the whole reply;
    - ``garbage``: one-shot replacements: each reply takes the next entry instead (then normal replies again);
      ``b""`` means no reply at all.
    Line-wide faults are on the Simulator: ``echo`` (the adapter echoes every request) and ``noise`` (bytes
    written once, at once, like a burst on the line)."""

    junk: bytes = b""
    foreign: int | None = None
    truncate: int = 0
    garbage: deque[bytes] = field(default_factory=deque)
    faulted: int = 0               # replies this changed (for tests)

    def update(self, spec: dict[str, object]) -> LineFaults:
        """Set from JSON-able values (hex strings for bytes), as bench/bench_bus.py does in its child."""
        if "junk" in spec:
            self.junk = bytes.fromhex(str(spec["junk"] or ""))
        if "foreign" in spec:
            self.foreign = None if spec["foreign"] is None else int(spec["foreign"])  # type: ignore[call-overload]
        if "truncate" in spec:
            self.truncate = int(spec["truncate"] or 0)  # type: ignore[call-overload]
        for g in cast("list[object]", spec.get("garbage") or []):
            self.garbage.append(bytes.fromhex(str(g)))
        return self

    def apply(self, reply: bytes) -> bytes:
        """The bytes the line carries for ``reply``."""
        if self.garbage:
            self.faulted += 1
            return self.garbage.popleft()
        out = self.junk
        if self.foreign is not None:
            out += frame(bytes([self.foreign]) + reply[1:-2])
        if self.truncate:
            out += reply[:self.truncate]
        if out:
            self.faulted += 1
        return out + reply


@dataclass
class SimMeter:
    """One simulated meter. Values are derived from the time since power-up, so they change smoothly."""

    model: Model
    address: int
    base_voltage_v: float = 13.2
    base_current_a: float = 8.0
    true_shunt_a: int = 100        # the shunt physically wired to it (PZEM-017)
    energy_wh: float = 0.0
    silent: bool = False
    garble: float = 0.0            # probability that a reply's CRC is corrupted
    boot_garbage_s: float = 0.0    # for this long after power-up, values are nonsense (valid CRC)
    reject_writes: bool = False    # echo writes but do not store them
    holding: dict[int, int] = field(default_factory=dict)
    seed: int = 0
    drive: Drive | None = None     # an external model sets V, I and energy (see Drive, dcmon.battery_sim)
    steady: bool = False           # true values stay at base_voltage_v / base_current_a (no wander, no noise)

    def __post_init__(self) -> None:
        if not self.holding:   # the model's power-up values (the address register: this meter's address)
            for s in self.model.settings:
                self.holding[s.address] = self.address if s.default is None else round(s.default / s.scale)
        self._t0 = time.monotonic()
        self._last = self._t0
        self._rng = random.Random(self.seed or self.address)
        self._phase = self._rng.random() * 6.28

    # ------------------------------------------------------------------------------ values
    def power_cycle(self) -> None:
        self._t0 = self._last = time.monotonic()

    def values(self, now: float | None = None) -> dict[str, float | bool]:
        now = time.monotonic() if now is None else now
        if self.drive is not None:
            return self.drive.values(self, now)
        t = now - self._t0
        if self.steady:
            v, true_i = self.base_voltage_v, self.base_current_a
        else:
            v = self.base_voltage_v * (1 + 0.02 * math.sin(t / 37 + self._phase)) + self._rng.uniform(-0.01, 0.01)
            true_i = max(0.0, self.base_current_a * (1 + 0.5 * math.sin(t / 23 + self._phase)) + self._rng.uniform(-0.02, 0.02))
        i = true_i
        i = true_i
        if (range_a := self.range_a()) is not None:
            # the meter measures shunt millivolts and scales them by the range it was told
            i = true_i * range_a / self.true_shunt_a
        i = min(i, self.model.max_current_a)
        v = min(max(v, 0.0), self.model.max_voltage_v)
        res_v = _resolution(self.model, "voltage_v")
        v = round(v / res_v) * res_v
        res_i = _resolution(self.model, "current_a")
        i = round(i / res_i) * res_i
        p = v * i
        self.energy_wh += p * max(0.0, now - self._last) / 3600.0
        self._last = now
        vals: dict[str, float | bool] = {"voltage_v": v, "current_a": i, "power_w": p, "energy_wh": math.floor(self.energy_wh)}
        self.complete(vals)
        if self.boot_garbage_s and t < self.boot_garbage_s:
            vals = {k: (x if isinstance(x, bool) else self._rng.uniform(0, 600)) for k, x in vals.items()}
        return vals

    def range_a(self) -> int | None:
        """The range the meter was told (its shunt code, in rated amps); None for a model without one."""
        s = self.model.shunt_setting
        if s is None:
            return None
        return self.model.shunt_amps(self.holding.get(s.address, 0)) or 100

    def complete(self, vals: dict[str, float | bool]) -> None:
        """The model's other fields: an AC meter's frequency and power factor, and each alarm from its
        threshold register (the model's settings name which field each one drives)."""
        names = self.model.field_names
        if "frequency_hz" in names:
            vals["frequency_hz"] = 50.0
        if "power_factor" in names:
            vals["power_factor"] = 1.0
        for s in self.model.settings:
            if s.alarm:
                limit = self.holding.get(s.address, 0) * s.scale
                q = float(vals[s.of])
                vals[s.alarm] = q > limit if s.above else q < limit

    def input_words(self) -> list[int]:
        return encode(self.model, self.values())

    # ---------------------------------------------------------------------------- requests
    def handle(self, fc: int, data: bytes, addr_used: int) -> bytes | None:
        """Return the PDU of the reply (function code + data), or None for no reply."""
        if fc == (0x03 if self.model.function == "holding" else 0x04):
            start, count = struct.unpack(">HH", data[:4])
            if count < 1 or start < self.model.input_start or start + count > self.model.input_start + self.model.input_count:
                return bytes([fc | 0x80, 0x02])
            words = self.input_words()[start - self.model.input_start:start - self.model.input_start + count]
            return bytes([fc, 2 * count]) + struct.pack(f">{count}H", *words)
        if fc == 0x03:
            start, count = struct.unpack(">HH", data[:4])
            regs = [self.holding.get(a) for a in range(start, start + count)]
            if count < 1 or any(r is None for r in regs):
                return bytes([fc | 0x80, 0x02])
            return bytes([fc, 2 * count]) + struct.pack(f">{count}H", *regs)
        if fc == 0x06:
            reg, value = struct.unpack(">HH", data[:4])
            setting = next((s for s in self.model.settings if s.address == reg), None)
            if setting is None:
                return bytes([fc | 0x80, 0x02])
            lo, hi = round(setting.minimum / setting.scale), round(setting.maximum / setting.scale)
            if not lo <= value <= hi:
                return bytes([fc | 0x80, 0x03])
            if not self.reject_writes:
                self.holding[reg] = value
                if setting.name == "address":
                    self.address = value
            return bytes([fc]) + data[:4]
        if fc == 0x42 and self.model.has_reset_energy:
            self.energy_wh = 0.0
            return bytes([fc])
        return bytes([fc | 0x80, 0x01])


class Drive:
    """Lets an external model drive a meter: ``sample(now)`` returns the true voltage (V), current (A) and
    energy (Wh, integrated continuously by the model since its start) at monotonic time ``now``. The meter
    reports them as a real one would: at its register resolution, energy as a whole-Wh counter that its
    reset (0x42) sets back to zero, current scaled by the shunt code like the free-running meter."""

    def __init__(self, sample: Callable[[float], tuple[float, float, float]]) -> None:
        self.sample = sample
        self._last_wh: float | None = None

    def values(self, meter: SimMeter, now: float) -> dict[str, float | bool]:
        v, i, wh = self.sample(now)
        if self._last_wh is not None:
            meter.energy_wh += max(0.0, wh - self._last_wh)   # the meter's own counter: reset to 0 by 0x42
        self._last_wh = wh
        model = meter.model
        if (range_a := meter.range_a()) is not None:
            i = i * range_a / meter.true_shunt_a
        i = min(max(i, 0.0), model.max_current_a)
        v = min(max(v, 0.0), model.max_voltage_v)
        res_v = _resolution(model, "voltage_v")
        res_i = _resolution(model, "current_a")
        v, i = round(v / res_v) * res_v, round(i / res_i) * res_i
        vals: dict[str, float | bool] = {"voltage_v": v, "current_a": i, "power_w": v * i,
                                         "energy_wh": math.floor(meter.energy_wh)}
        meter.complete(vals)
        return vals


def _resolution(model: Model, name: str) -> float:
    reg = model.register(name)
    return reg.step if reg else 0.01


def request_length(buf: bytes) -> int | None:
    """Length of the request at the start of buf, from its function code (None: unknown function)."""
    if len(buf) < 2:
        return 0
    fc = buf[1]
    if fc in (0x03, 0x04, 0x06):
        return 8
    if fc == 0x42:
        return 4
    if fc == 0x41:
        return 6
    return None


class Simulator:
    """Meters on one pseudo-terminal. Use as a context manager, or start()/stop()."""

    def __init__(self, meters: list[SimMeter], *, timing: bool = False, turnaround_s: float = 0.0,
                 link: str | None = None) -> None:
        self.meters = meters
        self.timing = timing
        self.turnaround_s = turnaround_s
        self.link = link
        self.requests = 0
        self.echo = False                          # the adapter echoes every request (LineFaults)
        self._faults: dict[int, LineFaults] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._master = self._slave = -1
        self.path = ""
        stop = {m.model.serial.stopbits for m in meters} or {2}
        self.char_time_s = (1 + 8 + max(stop)) / 9600

    # ----------------------------------------------------------------------------- life cycle
    def start(self) -> Simulator:
        self._master, self._slave = os.openpty()
        tty.setraw(self._master)
        tty.setraw(self._slave)
        attrs = termios.tcgetattr(self._slave)
        attrs[3] &= ~termios.ECHO
        termios.tcsetattr(self._slave, termios.TCSANOW, attrs)
        self.path = os.ttyname(self._slave)
        if self.link:
            try:
                os.unlink(self.link)
            except FileNotFoundError:
                pass
            os.symlink(self.path, self.link)
        self._thread = threading.Thread(target=self._serve, name=f"sim {self.path}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=2)
        for fd in (self._master, self._slave):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._master = self._slave = -1
        if self.link:
            try:
                os.unlink(self.link)
            except FileNotFoundError:
                pass

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def meter(self, address: int) -> SimMeter:
        return next(m for m in self.meters if m.address == address)

    def faults(self, address: int) -> LineFaults:
        """The line faults for replies to ``address`` (made on first use)."""
        return self._faults.setdefault(address, LineFaults())

    def noise(self, data: bytes) -> None:
        """Put ``data`` on the line now, unasked (a burst of noise, a foreign device talking)."""
        if self._master >= 0:
            os.write(self._master, data)

    def _line(self, req: bytes, out: bytes | None) -> bytes | None:
        """The line's faults on one exchange: echo ``req`` now (if the adapter echoes), and what it carries for
        the reply ``out`` (None: no reply)."""
        if self.echo:
            try:
                os.write(self._master, req)
            except OSError:
                pass
        f = self._faults.get(req[0])
        if out is None:
            if f and f.junk:             # the turnaround junk comes without a reply too
                try:
                    os.write(self._master, f.junk)
                except OSError:
                    pass
            return None
        return f.apply(out) if f else out

    # -------------------------------------------------------------------------------- serving
    def _serve(self) -> None:
        buf = b""
        last_rx = time.monotonic()
        while not self._stop.is_set():
            r, _, _ = select.select([self._master], [], [], 0.05)
            now = time.monotonic()
            if not r:
                if buf and now - last_rx > 0.01:   # a silence ends whatever partial frame we hold
                    buf = b""
                continue
            try:
                chunk = os.read(self._master, 512)
            except OSError:
                time.sleep(0.01)
                continue
            if buf and now - last_rx > 0.01:
                buf = b""
            last_rx = now
            buf += chunk
            while buf:
                need = request_length(buf)
                if need is None:        # unknown function code: answer it (it is addressed) or drop it
                    if len(buf) >= 4 and buf[-2:] == crc16(buf[:-2]):
                        self._dispatch(buf, time.monotonic())
                        buf = b""
                    break
                if need == 0 or len(buf) < need:
                    break
                req, buf = buf[:need], buf[need:]
                self._dispatch(req, time.monotonic())

    def _dispatch(self, req: bytes, t_rx: float) -> None:
        if crc16(req[:-2]) != req[-2:]:
            log.debug("simulator: bad CRC, ignored: %s", req.hex(" "))
            self._line(req, None)
            return
        self.requests += 1
        addr, fc, data = req[0], req[1], req[2:-2]
        if addr == 0:
            targets = list(self.meters)
        elif addr == GENERAL_ADDRESS:
            targets = [m for m in self.meters if not m.silent]
        else:
            targets = [m for m in self.meters if m.address == addr and not m.silent]
        replies = []
        for m in targets:
            pdu = m.handle(fc, data, addr)
            if pdu is not None:
                out = frame(bytes([addr]) + pdu)
                if m.garble and random.random() < m.garble:
                    out = out[:-1] + bytes([out[-1] ^ 0x5A])
                replies.append(out)
        if addr == 0 or not replies:
            self._line(req, None)
            return
        if len(replies) == 1:
            out = replies[0]
        else:  # two meters talking at once: the bytes collide on the wire
            out = bytes(a | b for a, b in zip(replies[0], replies[1]))
        out = self._line(req, out) or b""
        if not out:
            return
        if self.timing:
            # request on the wire, the meter's 3.5-character end-of-frame silence, its turnaround, the reply
            due = t_rx + (len(req) + 3.5 + len(out)) * self.char_time_s + self.turnaround_s
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        try:
            os.write(self._master, out)
        except OSError:
            pass


def meters_for(sensors: list[tuple[str | Model, int]], **kw: object) -> list[SimMeter]:
    """SimMeters for (model or model name, address) pairs, with varied base values so that each looks different."""
    out = []
    for i, (model, address) in enumerate(sensors):
        m = MODELS[model] if isinstance(model, str) else model
        base_v = m.sim.voltage_v
        base_i = m.sim.current_a + m.sim.current_step_a * i
        if m.max_current_a and base_i > m.max_current_a / 2:
            base_i = m.max_current_a / 3
        out.append(SimMeter(model=m, address=address, base_voltage_v=base_v * (1 + 0.01 * i), base_current_a=base_i,
                            energy_wh=12_000.0 * (i + 1), **kw))  # type: ignore[arg-type]
    return out


__all__ = ["Drive", "LineFaults", "SimMeter", "Simulator", "crc16", "frame", "meters_for"]
