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
  (corrupt CRC), ``reject_writes`` (a write is echoed but not stored);
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
from dataclasses import dataclass, field

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
    steady: bool = False           # true values stay at base_voltage_v / base_current_a (no wander, no noise)

    def __post_init__(self) -> None:
        if not self.holding:
            for s in self.model.settings:
                self.holding[s.address] = 0
            if self.model.kind == "dc":
                self.holding[0x0000] = 30000   # 300 V
                self.holding[0x0001] = 700     # 7 V
            else:
                self.holding[0x0001] = 23000
            self.holding[0x0002] = self.address
            if self.model.shunt_codes:
                self.holding[0x0003] = self.model.shunt_codes[100]  # factory default: 100 A
        self._t0 = time.monotonic()
        self._last = self._t0
        self._rng = random.Random(self.seed or self.address)
        self._phase = self._rng.random() * 6.28

    # ------------------------------------------------------------------------------ values
    def power_cycle(self) -> None:
        self._t0 = self._last = time.monotonic()

    def values(self, now: float | None = None) -> dict[str, float | bool]:
        now = time.monotonic() if now is None else now
        t = now - self._t0
        kind = self.model.kind
        if self.steady:
            v, true_i = self.base_voltage_v, self.base_current_a
        else:
            v = self.base_voltage_v * (1 + 0.02 * math.sin(t / 37 + self._phase)) + self._rng.uniform(-0.01, 0.01)
            true_i = max(0.0, self.base_current_a * (1 + 0.5 * math.sin(t / 23 + self._phase)) + self._rng.uniform(-0.02, 0.02))
        i = true_i
        if self.model.shunt_codes:
            # the meter measures shunt millivolts and scales them by the range it was told
            range_a = self.model.shunt_amps(self.holding.get(0x0003, 0)) or 100
            i = true_i * range_a / self.true_shunt_a
        i = min(i, self.model.max_current_a)
        v = min(max(v, 0.0), self.model.max_voltage_v)
        res_v = self.model.inputs[0].scale
        v = round(v / res_v) * res_v
        res_i = next(r.scale for r in self.model.inputs if r.name == "current_a")
        i = round(i / res_i) * res_i
        p = v * i
        self.energy_wh += p * max(0.0, now - self._last) / 3600.0
        self._last = now
        vals: dict[str, float | bool] = {"voltage_v": v, "current_a": i, "power_w": p, "energy_wh": math.floor(self.energy_wh)}
        if kind == "dc":
            vals["high_voltage_alarm"] = v > self.holding.get(0x0000, 30000) * 0.01
            vals["low_voltage_alarm"] = v < self.holding.get(0x0001, 700) * 0.01
        else:
            vals["frequency_hz"] = 50.0
            vals["power_factor"] = 1.0
            vals["power_alarm"] = p > self.holding.get(0x0001, 23000)
        if self.boot_garbage_s and t < self.boot_garbage_s:
            vals = {k: (x if isinstance(x, bool) else self._rng.uniform(0, 600)) for k, x in vals.items()}
        return vals

    def input_words(self) -> list[int]:
        return encode(self.model, self.values())

    # ---------------------------------------------------------------------------- requests
    def handle(self, fc: int, data: bytes, addr_used: int) -> bytes | None:
        """Return the PDU of the reply (function code + data), or None for no reply."""
        if fc == 0x04:
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
            return
        if len(replies) == 1:
            out = replies[0]
        else:  # two meters talking at once: the bytes collide on the wire
            out = bytes(a | b for a, b in zip(replies[0], replies[1]))
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


def meters_for(sensors: list[tuple[str, int]], **kw: object) -> list[SimMeter]:
    """SimMeters for (model name, address) pairs, with varied base values so that each looks different."""
    out = []
    for i, (model, address) in enumerate(sensors):
        m = MODELS[model]
        base_v = 13.2 if m.kind == "dc" else 230.0
        base_i = (8.0 + 3 * i) if m.kind == "dc" else 1.5 + i
        if m.max_current_a and base_i > m.max_current_a / 2:
            base_i = m.max_current_a / 3
        out.append(SimMeter(model=m, address=address, base_voltage_v=base_v * (1 + 0.01 * i), base_current_a=base_i,
                            energy_wh=12_000.0 * (i + 1), **kw))  # type: ignore[arg-type]
    return out


__all__ = ["SimMeter", "Simulator", "crc16", "frame", "meters_for"]
