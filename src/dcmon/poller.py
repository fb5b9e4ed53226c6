"""The poller: every configured meter on every configured bus, into the spool, on a monotonic schedule.

One thread per bus (meters on a bus in turn, buses in parallel); each bus cycle's readings go into the spool
in one transaction; a sender thread drains the spool to InfluxDB. Polling never waits on the network, and a
meter that does not answer costs its own bus at most ``timeout × (retries + 1)`` per cycle.

Decisions (see docs/configuration.md):
- A reading is timestamped (wall clock, ns) when the meter's reply arrived.
- Cycles are scheduled on ``time.monotonic()`` deadlines: start + k × interval. An overrun skips the slots it
  missed instead of bunching polls up (no drift, no burst).
- Energy going down is a counter reset (or wrap), never negative use: the reading carries
  ``energy_reset=true``; dashboards compute energy from non-negative differences.
- PZEM meters just powered up have returned wrong values with a valid CRC. A meter that starts answering
  again after it had stopped (power-cycled) is given ``poller.settle_s`` before its readings are kept; at
  start-up the meters are assumed settled (a Pi boots slower than a meter). Independently, a reading whose
  values are impossible for the model (above its range, or P far from V × I) is discarded and counted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .bus import Bus
from .calibration import apply_calibration
from .clock import Clock
from .config import Config, SensorConfig, load
from .errors import BusError, DcmonError, DeviceError, NoResponse, PortNotFound, SinkError
from .meter import read_values, set_shunt
from .models import FieldValue, Model, RegType
from .reading import Reading, encode_head, encode_line
from .systemd import Watchdog

if TYPE_CHECKING:
    from .sender import Sender
    from .spool import Spool, SpoolStats

log = logging.getLogger("dcmon.poller")


# ------------------------------------------------------------------------------------ per-sensor state

# A meter that is down (issue 12): after a poll without an answer the next ones get one try (no retry); after
# DOWN_AFTER polls in a row without an answer it is polled only every BACKOFF_FIRST_S, then twice as long
# after each further one, up to BACKOFF_MAX_S; the first answer puts it back on every cycle. So a dead meter
# costs its bus one timeout per back-off period instead of timeout × (retries + 1) per cycle, and a meter that
# comes back is polled again within BACKOFF_MAX_S (or one interval, if that is longer).
# docs/troubleshooting.md says the same.
DOWN_AFTER = 3
BACKOFF_FIRST_S = 5.0
BACKOFF_MAX_S = 60.0
COUNTER_JUMP_READINGS = 3    # readings in a row that agree on a new counter level before it is accepted


@dataclass
class SensorState:
    """What the poller knows about one meter between cycles (also what `dcmon status` shows)."""

    cfg: SensorConfig
    polls_ok: int = 0
    polls_failed: int = 0
    discarded: int = 0
    up: bool | None = None           # None: not polled yet
    last_error: str = ""
    last_time_ns: int = 0
    last_values: dict[str, FieldValue] = field(default_factory=dict)
    latency_ms: float = 0.0
    last_energy: float | None = None
    settle_until: float = 0.0        # monotonic; readings before this are discarded
    shunt_pending: bool = False
    # back-off of a meter that is down (see DOWN_AFTER)
    fails_in_row: int = 0
    backoff_s: float = 0.0           # 0: polled every cycle
    next_try: float = 0.0            # monotonic: the first cycle at or after this polls it again
    polls_skipped: int = 0
    _ok_at_failure: int = 0
    # the energy counter's last accepted value and when (monotonic), and a jump under test
    counter_ref: tuple[float, float] | None = None
    _jump: tuple[float, float] | None = None
    _jump_run: int = 0

    @property
    def name(self) -> str:
        return self.cfg.name

    def _answered_since_failure(self) -> bool:
        return self.polls_ok != self._ok_at_failure

    def due(self, now: float) -> bool:
        """Poll this meter in this cycle? False while it is backed off (counted in polls_skipped)."""
        if self.backoff_s and self._answered_since_failure():
            self.backoff_s, self.fails_in_row = 0.0, 0
        if self.backoff_s and now < self.next_try:
            self.polls_skipped += 1
            return False
        return True

    @property
    def tries(self) -> int | None:
        """Attempts for the next poll: one after a poll without an answer (a meter that did not answer
        retries + 1 tries is probably down, and every try costs the bus a timeout), else the bus's
        retries + 1."""
        return 1 if self.fails_in_row and not self._answered_since_failure() else None

    def note_failure(self, now: float, silent: bool = True) -> bool:
        """Count a failed poll; returns True when this failure starts the back-off. Only silence counts towards
        it (``silent``): a meter that answers, if garbled or with an exception, is not down."""
        if self._answered_since_failure() or not silent:
            self.fails_in_row = 0
            self.backoff_s = 0.0
        self._ok_at_failure = self.polls_ok
        if not silent:
            return False
        self.fails_in_row += 1
        if self.fails_in_row < DOWN_AFTER:
            return False
        started = not self.backoff_s
        self.backoff_s = BACKOFF_FIRST_S if started else min(self.backoff_s * 2, BACKOFF_MAX_S)
        self.next_try = now + self.backoff_s
        return started

    def backoff_status(self, now: float) -> dict[str, object]:
        """The back-off as `dcmon status` shows it."""
        backing_off = bool(self.backoff_s) and not self._answered_since_failure()
        return {"fails_in_row": self.fails_in_row if not self._answered_since_failure() else 0,
                "backoff_s": self.backoff_s if backing_off else 0.0,
                "retry_in_s": round(max(0.0, self.next_try - now), 1) if backing_off else 0.0,
                "polls_skipped": self.polls_skipped}

    def check_counter(self, model: Model, energy: float, now: float) -> str:
        """Empty string if the energy counter can have reached ``energy`` since the last accepted reading (it
        is then the new reference), else why not. A drop is always possible (a reset, handled by the caller).
        A counter that really jumped (meter swapped, counter preset) is accepted once COUNTER_JUMP_READINGS
        readings in a row agree with each other."""
        top = counter_max(model)
        if top is not None and energy >= top:
            return f"energy counter {energy:g} Wh is the register's maximum, not a reading"
        if self.counter_ref is not None:
            last, then = self.counter_ref
            allowed = max_counter_rise(model, now - then)
            if energy - last > allowed:
                j = self._jump
                agrees = j is not None and 0 <= energy - j[0] <= max_counter_rise(model, now - j[1])
                self._jump_run = self._jump_run + 1 if agrees else 1
                self._jump = (energy, now)
                if self._jump_run < COUNTER_JUMP_READINGS:
                    return (f"energy counter rose {energy - last:g} Wh in {now - then:.1f} s, more than the "
                            f"{model.title}'s maximum power allows ({allowed:.0f} Wh)")
                log.warning("sensor %r: energy counter jumped from %g to %g Wh and stayed there for %d readings: "
                            "taken as its new level", self.name, last, energy, self._jump_run)
        self._jump, self._jump_run = None, 0
        self.counter_ref = (energy, now)
        return ""


def counter_max(model: Model) -> float | None:
    """The largest value the model's energy register can hold (a glitch reads as all ones)."""
    for reg in model.inputs:
        if reg.name == "energy_wh":
            return (0xFFFFFFFF if reg.type is RegType.U32_LOW_WORD_FIRST else 0xFFFF) * reg.scale
    return None


def max_counter_rise(model: Model, seconds: float) -> float:
    """The most an energy counter can rise in ``seconds``: the model's maximum power, with 20 % and 2 s to
    spare (the meter integrates on its own clock), plus two counts of the register's resolution."""
    watts = model.max_voltage_v * model.max_current_a
    step = next((r.scale for r in model.inputs if r.name == "energy_wh"), 1.0)
    return watts * 1.2 * (max(0.0, seconds) + 2.0) / 3600.0 + 2 * step


def is_plausible(model: Model, v: dict[str, FieldValue], state: SensorState | None = None,
                 now: float | None = None) -> str:
    """Empty string if the values are possible for this model, else the reason. With ``state`` (and ``now``,
    monotonic) the energy counter is also checked against the last accepted reading (SensorState.check_counter);
    without, only against the register's maximum."""
    volt, amp, watt = float(v["voltage_v"]), float(v["current_a"]), float(v["power_w"])
    if volt > model.max_voltage_v * 1.2 or amp > model.max_current_a * 1.2:
        return f"{volt:g} V / {amp:g} A is outside the {model.title}'s range"
    pf = float(v.get("power_factor", 1.0)) or 1.0
    expected = volt * amp * (pf if model.kind == "ac" else 1.0)
    if abs(watt - expected) > 0.10 * expected + 2.0 + 0.02 * (volt + amp):
        return f"power {watt:g} W does not match V × I = {expected:.1f} W"
    if "energy_wh" not in v:
        return ""
    energy = float(v["energy_wh"])
    if state is not None:
        return state.check_counter(model, energy, time.monotonic() if now is None else now)
    top = counter_max(model)
    if top is not None and energy >= top:
        return f"energy counter {energy:g} Wh is the register's maximum, not a reading"
    return ""


# ------------------------------------------------------------------------------------------- poller

class Poller:
    """Owns the buses and sensor states; `poll_bus_once` is one cycle of one bus."""

    def __init__(self, cfg: Config, *, put: Callable[[list[str]], None], buses: dict[str, Bus] | None = None,
                 on_reading: Callable[[Reading], None] | None = None, settle_on_start: bool = False,
                 retrying: bool = True, hint_simulate: bool = False,
                 progress: Callable[[str], None] | None = None, clock: Clock | None = None) -> None:
        self.cfg = cfg
        self.clock = clock  # dcmon.clock: stamps (provisional while the wall clock is not trusted); None = wall
        self.put = put
        self.on_reading = on_reading
        self.host = cfg.host
        self.buses = buses if buses is not None else {
            name: Bus(cfg.bus_settings(name)) for name in cfg.buses if cfg.enabled_sensors(name)
        }
        self.states = {s.name: SensorState(cfg=s, shunt_pending=cfg.poller.apply_shunt_codes and s.shunt_a is not None)
                       for s in cfg.enabled_sensors()}
        self.bus_errors: dict[str, str] = {}
        self.loop_errors: dict[str, int] = {}   # unexpected exceptions caught by bus_loop, by bus
        self.cycles = 0
        self._settle_on_start = settle_on_start
        self._retrying = retrying
        self._hint_simulate = hint_simulate
        self._progress = progress  # called after each meter: a bus of dead meters is slow, not hung
        self._heads: dict[str, tuple[str, dict[str, str], str]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------ one cycle
    def poll_bus_once(self, bus_name: str) -> list[Reading]:
        """Poll every meter on one bus once; spool what was read (one transaction); return the readings."""
        bus = self.buses[bus_name]
        readings: list[Reading] = []
        self.cycles += 1
        if not self._open(bus):
            for s in self.cfg.enabled_sensors(bus_name):
                self.states[s.name].polls_failed += 1
            return readings
        for s in self.cfg.enabled_sensors(bus_name):
            r = self._poll_sensor(bus, self.states[s.name])
            if r is not None:
                readings.append(r)
            if self._progress:
                self._progress(f"poll:{bus_name}")
        if readings:
            self.put([r.to_line() for r in readings])
            if self.on_reading:
                for r in readings:
                    self.on_reading(r)
        return readings

    def _open(self, bus: Bus) -> bool:
        try:
            bus.open()
        except BusError as e:
            if self.bus_errors.get(bus.name) != str(e):
                hint = "; to try the stack without hardware: --simulate" if self._hint_simulate and isinstance(e, PortNotFound) else ""
                log.error("%s%s%s", e, hint, "; retrying every cycle" if self._retrying else "")
                self.bus_errors[bus.name] = str(e)
            return False
        if self.bus_errors.pop(bus.name, None):
            log.info("bus %r: %s is open again", bus.name, bus.settings.port)
        return True

    def _poll_sensor(self, bus: Bus, st: SensorState) -> Reading | None:
        s = st.cfg
        who = f"sensor {s.name!r} (bus {s.bus!r}, address {s.address})"
        if not st.due(time.monotonic()):
            return None                                   # down, and backed off (SensorState.due)
        if st.shunt_pending:
            self._apply_shunt(bus, st, who)
        t0 = time.monotonic()
        try:
            values = read_values(bus, s.meter, s.address, tries=st.tries)
        except (BusError, DeviceError) as e:
            st.polls_failed += 1
            msg = str(e)
            probing = st.tries == 1
            changed = st.last_error.split(" (")[0] != msg.split(" (")[0]  # a change of kind, not of hex dump
            if (st.up is not False or changed) and not (probing and isinstance(e, NoResponse)):
                log.warning("%s: %s", who, msg)
            if st.note_failure(time.monotonic(), silent=isinstance(e, NoResponse)):
                log.info("%s: down after %d failed polls in a row: polling it every %g s, doubling up to %g s, "
                            "one try each, until it answers", who, st.fails_in_row, st.backoff_s, BACKOFF_MAX_S)
            st.up, st.last_error = False, msg
            return None
        now_ns = self.clock.stamp_ns() if self.clock else time.time_ns()
        mono = time.monotonic()
        st.latency_ms = (mono - t0) * 1000.0
        st.polls_ok += 1
        if st.up is False:
            log.info("%s answers again (after %d failed polls)", who, st.polls_failed)
            st.settle_until = mono + self.cfg.poller.settle_s
        elif st.up is None and self._settle_on_start:
            st.settle_until = mono + self.cfg.poller.settle_s
        st.up, st.last_error = True, ""
        if mono < st.settle_until:
            st.discarded += 1
            log.debug("%s: reading discarded while the meter settles", who)
            return None
        why = is_plausible(s.meter, values, st, mono)
        if why:
            st.discarded += 1
            log.warning("%s: implausible reading discarded: %s", who, why)
            return None
        values = apply_calibration(values, s.calibration)
        energy = float(values["energy_wh"])
        reset = st.last_energy is not None and energy < st.last_energy
        if reset:
            log.info("%s: energy counter went from %g to %g Wh: counted as a reset", who, st.last_energy, energy)
        st.last_energy = energy
        st.last_values, st.last_time_ns = values, now_ns
        return self.make_reading(s, values, now_ns, energy_reset=reset)

    def make_reading(self, s: SensorConfig, values: dict[str, FieldValue], time_ns: int, *,
                     energy_reset: bool = False) -> Reading:
        fields: dict[str, float | int | bool | str] = {}
        for k, v in values.items():
            fields[k] = v if isinstance(v, bool) else float(v)
        fields["calibrated"] = not s.calibration.is_identity
        fields["energy_reset"] = energy_reset
        measurement, tags, head = self._series(s)
        return Reading(measurement=measurement, time_ns=time_ns, tags=tags, fields=fields, sensor=s.name, head=head)

    def _series(self, s: SensorConfig) -> tuple[str, dict[str, str], str]:
        """Measurement, tags and their encoded line-protocol head: fixed per sensor, so made once."""
        got = self._heads.get(s.name)
        if got is None:
            tags = {"sensor": s.name, "model": s.model, "address": str(s.address), "bus": s.bus, "host": self.host, **s.tags}
            ix = self.cfg.influxdb
            measurement = ix.measurement if s.meter.kind == "dc" else ix.measurement_ac
            got = self._heads[s.name] = (measurement, tags, encode_head(measurement, tags))
        return got

    def _apply_shunt(self, bus: Bus, st: SensorState, who: str) -> None:
        s = st.cfg
        assert s.shunt_a is not None
        try:
            changed = set_shunt(bus, s.meter, s.address, s.shunt_a)
        except (BusError, DeviceError) as e:
            log.warning("%s: could not apply shunt code for %d A: %s (will retry)", who, s.shunt_a, e)
            return
        st.shunt_pending = False
        if changed:
            log.info("%s: shunt code set to %d A and read back", who, s.shunt_a)
        else:
            log.info("%s: shunt code already %d A", who, s.shunt_a)

    # ------------------------------------------------------------------------------- health
    def health_lines(self, spool_stats: SpoolStats | None = None, sender: Sender | None = None) -> list[str]:
        """The poller's own health as line protocol (measurement ``influxdb.health_measurement``): one point
        per sensor, one for the poller (``sensor=_poller``)."""
        now = time.time_ns()
        m = self.cfg.influxdb.health_measurement
        lines = []
        for st in self.states.values():
            lines.append(encode_line(m, {"host": self.host, "bus": st.cfg.bus, "sensor": st.name},
                                     {"polls_ok": st.polls_ok, "polls_failed": st.polls_failed,
                                      "discarded": st.discarded, "latency_ms": round(st.latency_ms, 2),
                                      "up": bool(st.up), **self._noise_fields(st)}, now))
        f: dict[str, float | int | bool | str] = {"cycles": self.cycles, "loop_errors": sum(self.loop_errors.values())}
        if spool_stats is not None:
            f["spool_depth"] = spool_stats.depth
            # dropped by the cap, plus lines that could not be stored at all (disk full, I/O error)
            f["spool_dropped"] = spool_stats.dropped_total + spool_stats.lost_total
            f["quarantined"] = spool_stats.quarantined
            oldest = spool_stats.oldest_time_ns
            f["spool_oldest_age_s"] = round(max(0.0, (now - oldest) / 1e9), 3) if oldest else 0.0
        if sender is not None:
            f["sent_points"] = sender.sent_points
            f["send_failures"] = sender.send_failures
        lines.append(encode_line(m, {"host": self.host, "bus": "_all", "sensor": "_poller"}, f, now))
        return lines

    def _noise_fields(self, st: SensorState) -> dict[str, float | int]:
        """Line noise and back-off of one meter, for its health point."""
        bus = self.buses.get(st.cfg.bus)
        ls = bus.line_stats(st.cfg.address) if bus is not None else None
        return {"bad_frames": ls.bad_frames if ls else 0, "resyncs": ls.resyncs if ls else 0,
                "backoff_s": float(st.backoff_status(time.monotonic())["backoff_s"])}

    def _line_status(self, st: SensorState) -> dict[str, object]:
        """Back-off and line counters of one meter, for `dcmon status`."""
        bus = self.buses.get(st.cfg.bus)
        return {**st.backoff_status(time.monotonic()),
                "line": bus.line_stats(st.cfg.address).as_dict() if bus is not None else {}}

    def status(self) -> dict[str, object]:
        return {
            "time": time.time(),
            "pid": os.getpid(),
            "cycles": self.cycles,
            "buses": {name: {"port": b.settings.port, "error": self.bus_errors.get(name, ""),
                             "loop_errors": self.loop_errors.get(name, 0), "line": b.line_stats().as_dict()}
                      for name, b in self.buses.items()},
            "sensors": {st.name: {"bus": st.cfg.bus, "address": st.cfg.address, "model": st.cfg.model, "up": st.up,
                                  "polls_ok": st.polls_ok, "polls_failed": st.polls_failed, "discarded": st.discarded,
                                  "last_error": st.last_error, "last_time_ns": st.last_time_ns,
                                  "latency_ms": round(st.latency_ms, 2), "values": st.last_values,
                                  **self._line_status(st)}
                        for st in self.states.values()},
        }

    def close(self) -> None:
        for b in self.buses.values():
            b.close()


def next_deadline(start: float, interval: float, now: float) -> float:
    """The first slot start + k × interval that is after ``now`` (skips missed slots)."""
    if interval <= 0:
        return now
    k = int((now - start) // interval) + 1
    return start + k * interval


NOISE_REPORT_S = 600.0   # bus_loop's summary of recovered garbled replies: at most one line per bus this often


def bus_loop(poller: Poller, bus_name: str, stop: threading.Event, progress: Callable[[str], None] | None = None) -> None:
    """Poll one bus on deadlines start + k × interval until stopped. Reports progress (for the systemd
    watchdog) after each cycle and at least every second while waiting, so only a hung poll stops it.

    Guarded: an unexpected exception in a cycle (a bug, or a library raising what it should not) is counted
    (``Poller.loop_errors``, the health point's ``loop_errors``), logged with its traceback at debug and in one
    line at error (the same error again at most once a minute), and the loop goes on with the next cycle,
    at least a second later, so that a cycle that fails at once cannot spin."""
    interval = poller.cfg.poller.interval_s
    name = f"poll:{bus_name}"
    start = time.monotonic()
    last_error, last_error_at = "", -1e9
    bus = poller.buses.get(bus_name)
    noise_seen, noise_at = (bus.line_stats().bad_frames if bus else 0), time.monotonic()
    while not stop.is_set():
        failed = False
        try:
            poller.poll_bus_once(bus_name)
        except Exception as e:  # noqa: BLE001 - the guard of a bus thread: nothing may end it but stop
            failed = True
            poller.loop_errors[bus_name] = poller.loop_errors.get(bus_name, 0) + 1
            text = f"{type(e).__name__}: {e}"
            log.debug("bus %r: unexpected error in a poll cycle", bus_name, exc_info=True)
            now = time.monotonic()
            if text != last_error or now - last_error_at >= 60.0:
                log.error("bus %r: unexpected error in a poll cycle (%s; %d so far), polling goes on; please "
                          "report it with the debug log (poller.log_level = \"debug\")", bus_name, text,
                          poller.loop_errors[bus_name])
                last_error, last_error_at = text, now
        if progress:
            progress(name)
        if bus is not None and time.monotonic() - noise_at >= NOISE_REPORT_S:
            bad = bus.line_stats().bad_frames
            if bad > noise_seen:
                log.info("bus %r: %d garbled repl%s in the last %.0f min (retried; see dcmon status); check "
                         "termination, biasing and wiring", bus_name, bad - noise_seen, "y" if bad - noise_seen == 1 else "ies",
                         (time.monotonic() - noise_at) / 60)
            noise_seen, noise_at = bad, time.monotonic()
        deadline = next_deadline(start, interval, time.monotonic())
        if failed:
            deadline = max(deadline, time.monotonic() + 1.0)
        while not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0 or stop.wait(min(left, 1.0)):
                break
            if progress:
                progress(name)


# ------------------------------------------------------------------------------------- the run command

def status_path(cfg: Config) -> Path:
    """Where the running poller publishes its status for `dcmon status`: $DCMON_STATUS_PATH, else the
    systemd runtime directory (tmpfs: no SD-card writes), else beside the spool."""
    if os.environ.get("DCMON_STATUS_PATH"):
        return Path(os.environ["DCMON_STATUS_PATH"])
    if os.environ.get("RUNTIME_DIRECTORY"):
        return Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0]) / "status.json"
    service = Path("/run/dcmon/status.json")   # the installed service's RuntimeDirectory, for `dcmon status`
    if service.exists():
        return service
    return cfg.resolve(cfg.spool.path).with_name("status.json")


def start_simulators(cfg: Config) -> list:
    """--simulate: serve each bus's configured meters on a pty and point the bus at it."""
    from .simulator import Simulator, meters_for

    sims = []
    for name in list(cfg.buses):
        sensors = cfg.enabled_sensors(name)
        if not sensors:
            continue
        meters = meters_for([(s.model, s.address) for s in sensors])
        for m, s in zip(meters, sensors):
            if s.shunt_a and m.model.shunt_codes:   # a commissioned meter: its code matches its shunt
                m.true_shunt_a = s.shunt_a
                m.holding[0x0003] = m.model.shunt_codes[s.shunt_a]
        sim = Simulator(meters).start()
        sims.append(sim)
        cfg.buses[name].port = sim.path
        log.info("bus %r: simulating %d meter(s) on %s", name, len(meters), sim.path)
    return sims


def format_reading(r: Reading) -> str:
    f = r.fields
    text = f"{r.sensor:<12} {float(f['voltage_v']):8.2f} V {float(f['current_a']):8.3f} A {float(f['power_w']):9.1f} W {float(f['energy_wh']):10.0f} Wh"
    alarms = [k for k, v in f.items() if k.endswith("_alarm") and v is True]
    if "frequency_hz" in f:
        text += f" {float(f['frequency_hz']):5.1f} Hz PF {float(f['power_factor']):.2f}"
    if alarms:
        text += "  ALARM: " + ", ".join(alarms)
    return text


def run(cfg: Config, *, simulate: bool = False, once: bool = False, echo: bool = False,
        stop: threading.Event | None = None, hint_simulate: bool = False, clock: Clock | None = None) -> int:
    """The main job. Returns the exit status."""
    from .influx import InfluxSink
    from .sender import Sender
    from .spool import Spool

    cfg.require_sensors()   # the last checks before any I/O: something to poll, a spool we can write
    cfg.check_spool()
    for line in cfg.describe():
        log.info("%s", line)
    stop = stop or threading.Event()
    sims = start_simulators(cfg) if simulate else []
    clock = clock or Clock()  # one clock for stamps and the spool (held readings, the age cap)
    spool = Spool.open(cfg.resolve(cfg.spool.path), max_bytes=cfg.spool.max_bytes,
                       max_age_s=cfg.spool.max_age_days * 86400, durability=cfg.spool.durability, clock=clock)
    from .influx_setup import Backfill  # downsamples what a backlog delivered (a no-op before influx-setup)
    backfill = Backfill(cfg)
    sink = backfill.watch(InfluxSink(cfg.influxdb)) if cfg.influxdb.enabled else None
    sender = Sender(spool, sink, batch_lines=cfg.spool.batch_lines, on_backlog_sent=backfill if sink else None)

    def put(lines: list[str]) -> None:
        spool.put(lines)
        sender.poke()

    def show(r: Reading) -> None:
        print(format_reading(r), flush=True)

    watchdog = Watchdog.from_env(loops=["send"])
    poller = Poller(cfg, put=put, on_reading=show if (echo or once) else None, retrying=not once,
                    hint_simulate=hint_simulate, progress=watchdog.progress, clock=clock)
    for name in poller.buses:
        watchdog.register(f"poll:{name}")
    if not poller.states:
        log.warning("no enabled sensors in %s: nothing to poll", cfg.source)
    if not sink:
        log.warning("influxdb.enabled = false: readings are kept in the spool %s only", cfg.resolve(cfg.spool.path))
    try:
        if once:
            return _run_once(cfg, poller, sender, spool)
        return _run_forever(cfg, poller, sender, spool, stop, watchdog)
    finally:
        poller.close()
        spool.close()
        if sink:
            sink.close()
        for s in sims:
            s.stop()


def _run_once(cfg: Config, poller: Poller, sender: Sender, spool: Spool) -> int:
    threads = [threading.Thread(target=poller.poll_bus_once, args=(name,), name=f"poll {name}") for name in poller.buses]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [st for st in poller.states.values() if not st.up]
    if cfg.influxdb.enabled:
        # send while it works (a backlog too, for up to 30 s); the first failure ends it with one line
        deadline = time.monotonic() + 30.0
        try:
            while sender.send_once() and time.monotonic() < deadline:
                pass
        except SinkError as e:
            log.warning("%s; %d reading(s) kept in the spool %s", e, spool.stats().depth, spool.path)
        else:
            depth = spool.stats().depth
            if depth:
                log.info("%d reading(s) still queued in the spool %s", depth, spool.path)
            else:
                log.info("all readings written to %s", cfg.influxdb.url)
    return 1 if failed or not poller.states else 0


def _run_forever(cfg: Config, poller: Poller, sender: Sender, spool: Spool, stop: threading.Event,
                 watchdog: Watchdog) -> int:

    def on_signal(signum: int, _frame: object) -> None:
        log.info("%s received: finishing the current cycle and flushing", signal.Signals(signum).name)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    threads = [threading.Thread(target=bus_loop, args=(poller, name, stop, watchdog.progress), name=f"poll {name}", daemon=True)
               for name in poller.buses]

    def send_loop() -> None:
        sender.run(stop)

    sender_thread = threading.Thread(target=send_loop, name="sender", daemon=True)
    for t in threads:
        t.start()
    sender_thread.start()
    log.info("polling %d sensor(s) on %d bus(es) every %g s", len(poller.states), len(poller.buses), cfg.poller.interval_s)
    watchdog.ready(f"polling {len(poller.states)} sensor(s) on {len(poller.buses)} bus(es)")
    spath = status_path(cfg)
    last_send_check = next_status = time.monotonic()
    next_health = time.monotonic() + min(10.0, cfg.poller.health_interval_s or 10.0)
    while not stop.wait(1.0):
        now = time.monotonic()
        stats = spool.stats()
        if now >= next_status:  # every 5 s: cheap, and on tmpfs under systemd (RuntimeDirectory)
            next_status = now + 5.0
            _write_status(spath, {**poller.status(), "spool": _stats_dict(stats), "sender_error": getattr(sender, "last_error", "")})
        if cfg.poller.health_interval_s and time.monotonic() >= next_health:
            next_health = time.monotonic() + cfg.poller.health_interval_s
            spool.put(poller.health_lines(stats, sender))
        if sender_thread.is_alive() and getattr(sender, "last_progress", now) >= last_send_check:
            watchdog.progress("send")
        last_send_check = now
        watchdog.maybe_ping()
    sender.poke()  # wake the sender now rather than at its next tick
    for t in threads:
        t.join(timeout=max(5.0, max((b.timeout_s * (b.retries + 1) for b in cfg.buses.values()), default=0) * 10))
    sender_thread.join(timeout=5.0)
    if cfg.influxdb.enabled and not sender.flush(timeout_s=5.0):
        log.info("%d reading(s) stay in the spool for the next start", spool.stats().depth)
    watchdog.stopping()
    log.info("stopped")
    return 0




def _stats_dict(stats: SpoolStats) -> dict[str, object]:
    return {k: getattr(stats, k) for k in ("depth", "bytes", "oldest_time_ns", "dropped_total", "lost_total",
                                           "quarantined", "last_error", "held")}


def _write_status(path: Path, data: dict[str, object]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, default=str))
        os.replace(tmp, path)
    except OSError as e:
        log.debug("cannot write status file %s: %s", path, e)


# ---------------------------------------------------------------------------------------- commands

def _setup(args: argparse.Namespace, cli: dict[str, tuple[str, object]] | None = None) -> Config:
    cfg = load(args.config, cli=cli)
    level = args.log_level or cfg.poller.log_level
    logging.getLogger().setLevel(getattr(logging, level.upper()))
    return cfg


def cmd_run(args: argparse.Namespace) -> int:
    # command-line overrides go through the config's own validation (a range, and nan/inf refused)
    cfg = _setup(args, {"poller.interval_s": ("--interval", args.interval)} if args.interval is not None else None)
    echo = args.print if args.print is not None else (sys.stdout.isatty() or args.simulate)
    return run(cfg, simulate=args.simulate, once=args.once, echo=echo, hint_simulate=not args.simulate)


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    cfg.require_sensors()
    cfg.check_spool()
    print("\n".join(cfg.describe()))
    print(f"{cfg.source}: ok")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    """Serve simulated meters on a pty until interrupted; print the path for other programs to open."""
    from .simulator import Simulator, meters_for

    meters = meters_for([(args.model, a) for a in args.address])
    sim = Simulator(meters, timing=args.timing, turnaround_s=args.turnaround, link=args.link).start()
    print(sim.link or sim.path, flush=True)
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        sim.stop()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    path = status_path(cfg)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DcmonError(f"no status at {path}: is the poller running? (systemctl status dcmon)") from None
    except (OSError, ValueError) as e:
        raise DcmonError(f"cannot read status {path}: {e}") from None
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    age = time.time() - float(data.get("time", 0))
    print(f"poller pid {data.get('pid')}, status {age:.0f} s old{' (STALE: is it still running?)' if age > 30 else ''}")
    for name, b in data.get("buses", {}).items():
        print(f"bus {name}: {b['port']}{'  ERROR: ' + b['error'] if b.get('error') else ''}")
    for name, s in data.get("sensors", {}).items():
        v = s.get("values") or {}
        state = {True: "up", False: "DOWN", None: "not polled"}[s.get("up")]
        when = f"{(time.time_ns() - s['last_time_ns']) / 1e9:.0f} s ago" if s.get("last_time_ns") else "never"
        vals = f"{v.get('voltage_v', 0):.2f} V {v.get('current_a', 0):.2f} A {v.get('power_w', 0):.1f} W" if v else ""
        backoff = f"  (backed off: next try in {s.get('retry_in_s', 0):.0f} s)" if s.get("backoff_s") else ""
        print(f"  {name:<12} {state:<10} ok {s['polls_ok']} failed {s['polls_failed']}  last {when}  {vals}"
              f"{'  ' + s['last_error'] if s.get('last_error') else ''}{backoff}")
    sp = data.get("spool", {})
    if sp:
        print(f"spool: {sp.get('depth', 0)} queued, {sp.get('dropped_total', 0)} dropped, {sp.get('quarantined', 0)} quarantined"
              f"{'  last error: ' + data['sender_error'] if data.get('sender_error') else ''}")
    return 0


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("run", parents=[common], help="poll the meters and write to InfluxDB (the main job)")
    p.add_argument("--simulate", action="store_true", help="poll simulated meters on a pseudo-terminal instead of the ports")
    p.add_argument("--once", action="store_true", help="one cycle: poll, print, send, exit (1 if a meter failed)")
    p.add_argument("--interval", type=float, default=None, help="override poller.interval_s")
    p.add_argument("--print", dest="print", action="store_true", default=None, help="print each reading (default on a terminal)")
    p.add_argument("--no-print", dest="print", action="store_false", help="do not print readings")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", parents=[common], help="validate the configuration and exit",
                       description="Check the configuration whole (every key, file and the spool's folder) without "
                                   "touching a meter or the network, and name the files merged. Exit 2 on a problem.",
                       epilog="example: sudo -u dcmon dcmon check-config")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("simulate", parents=[common], help="serve simulated PZEM meters on a pseudo-terminal")
    p.add_argument("--model", default="pzem017", help="meter model (default pzem017)")
    p.add_argument("--address", type=int, action="append", help="address to serve (repeat; default 1)")
    p.add_argument("--timing", action="store_true", help="delay replies by the 9600-baud wire time")
    p.add_argument("--turnaround", type=float, default=0.0, help="extra reply delay in seconds (with --timing)")
    p.add_argument("--link", default=None, help="also make this symlink to the pty (e.g. /tmp/pzem)")
    p.set_defaults(func=cmd_simulate, address=None)

    p = sub.add_parser("status", parents=[common], help="what the running poller is doing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
