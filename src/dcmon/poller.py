"""The poller: every configured meter on every configured bus, into the spool, on a monotonic schedule.

The polling core: one thread per bus (meters on a bus in turn, buses in parallel) runs ``bus_loop``; each bus
cycle's readings are handed to ``put`` (the service spools them in one transaction) and ``on_reading``. The
service runtime around it (spools, senders, outputs, status file, signals, watchdog) is ``dcmon.service``; the
commands are ``dcmon.service_cli``. Polling never waits on the network, and a meter that does not answer costs
its own bus at most ``timeout × (retries + 1)`` per cycle.

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

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from .bus import Bus
from .calibration import apply_calibration
from .clock import Clock
from .config import Config, SensorConfig
from .errors import BusError, DeviceError, NoResponse, PortNotFound
from .meter import read_shunt, read_values, set_shunt
from .models import FieldValue, Model, RegType
from .reading import Reading, encode_head, encode_line

if TYPE_CHECKING:
    from .sender import Sender
    from .spool import SpoolStats

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
    failed_at_last_ok: int = 0       # polls_failed at the last good poll ("answers again" counts one outage)
    shunt_checked: bool = False      # current-range register read since start-up, or since the meter came back
    shunt_warned: int | None = None  # the mismatched code already warned about (-1: an unknown code)
    shunt_error: str = ""            # kind of the last failure to apply the shunt code (logged once per change)

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

    def backoff_status(self, now: float) -> dict[str, float]:
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
    without, only against the register's maximum. A check whose fields the model lacks (a user-defined
    table without power, or without a maximum) is skipped."""
    if "voltage_v" in v and "current_a" in v:
        volt, amp = float(v["voltage_v"]), float(v["current_a"])
        if model.max_voltage_v and model.max_current_a and (volt > model.max_voltage_v * 1.2
                                                            or amp > model.max_current_a * 1.2):
            return f"{volt:g} V / {amp:g} A is outside the {model.title}'s range"
        if "power_w" in v:
            watt = float(v["power_w"])
            pf = float(v.get("power_factor", 1.0)) or 1.0   # a DC meter has none: 1
            expected = volt * amp * pf
            if abs(watt - expected) > 0.10 * expected + 2.0 + 0.02 * (volt + amp):
                return f"power {watt:g} W does not match V × I = {expected:.1f} W"
    if "energy_wh" not in v:
        return ""
    energy = float(v["energy_wh"])
    if state is not None and model.max_voltage_v and model.max_current_a:
        return state.check_counter(model, energy, time.monotonic() if now is None else now)
    top = counter_max(model)
    if top is not None and energy >= top:
        return f"energy counter {energy:g} Wh is the register's maximum, not a reading"
    return ""


# ------------------------------------------------------------------------------------------- poller

class Poller:
    """Owns the buses and sensor states; `poll_bus_once` is one cycle of one bus."""

    def __init__(self, cfg: Config, *, put: Callable[[list[str]], None], buses: dict[str, Bus] | None = None,
                 on_reading: Callable[[Reading], None] | None = None,
                 on_meter_state: Callable[[SensorState, bool], None] | None = None,
                 extra_lines: Callable[[list[Reading]], list[str]] | None = None, settle_on_start: bool = False,
                 retrying: bool = True, hint_simulate: bool = False,
                 progress: Callable[[str], None] | None = None, clock: Clock | None = None) -> None:
        self.cfg = cfg
        self.clock = clock  # dcmon.clock: stamps (provisional while the wall clock is not trusted); None = wall
        self.put = put
        self.on_reading = on_reading
        self.on_meter_state = on_meter_state  # after every poll of a meter: (its state, does it answer?)
        self.extra_lines = extra_lines        # a cycle's readings → more lines for the same spool transaction
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
        with self._lock:   # one thread per bus: += is not atomic
            self.cycles += 1
        if not self._open(bus):
            for s in self.cfg.enabled_sensors(bus_name):
                self.states[s.name].polls_failed += 1
                if self.on_meter_state:
                    self.on_meter_state(self.states[s.name], False)
            return readings
        for s in self.cfg.enabled_sensors(bus_name):
            st = self.states[s.name]
            r = self._poll_sensor(bus, st)
            if r is not None:
                readings.append(r)
            if self.on_meter_state and st.up is not None:
                self.on_meter_state(st, st.up)
            if self._progress:
                self._progress(f"poll:{bus_name}")
        if readings:
            lines = [r.to_line() for r in readings]
            self.put(lines + self.extra_lines(readings) if self.extra_lines else lines)
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
        if st.shunt_pending and st.up is not False:  # a meter that is down gets it when it answers again
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
            outage = st.polls_failed - st.failed_at_last_ok
            log.info("%s answers again (after %d failed poll%s)", who, outage, "" if outage == 1 else "s")
            st.settle_until = mono + self.cfg.poller.settle_s
            self._came_back(st)
        elif st.up is None and self._settle_on_start:
            st.settle_until = mono + self.cfg.poller.settle_s
        st.up, st.last_error = True, ""
        st.failed_at_last_ok = st.polls_failed
        if not st.shunt_checked:
            self._check_shunt(bus, st, who)
        if mono < st.settle_until:
            st.discarded += 1
            log.debug("%s: reading discarded while the meter settles", who)
            return None
        why = is_plausible(s.meter, values, st, mono)
        if why:
            st.discarded += 1
            log.warning("%s: implausible reading discarded: %s", who, why)
            return None
        values = apply_calibration(values, s.calibration, s.meter)
        reset = False
        if "energy_wh" in values:   # a user-defined table may have no energy counter
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
            measurement = s.meter.measurement or (ix.measurement if s.meter.kind == "dc" else ix.measurement_ac)
            got = self._heads[s.name] = (measurement, tags, encode_head(measurement, tags))
        return got

    def _apply_shunt(self, bus: Bus, st: SensorState, who: str) -> None:
        s = st.cfg
        assert s.shunt_a is not None
        try:
            changed = set_shunt(bus, s.meter, s.address, s.shunt_a)
        except (BusError, DeviceError) as e:
            kind = f"{type(e).__name__}:{getattr(e, 'code', '')}"   # not the text: a garbled reply differs each time
            if st.shunt_error != kind:
                log.warning("%s: could not apply shunt code for %d A: %s (retrying at each poll, logged again "
                            "only when this changes)", who, s.shunt_a, e)
                st.shunt_error = kind
            return
        st.shunt_pending, st.shunt_checked, st.shunt_error = False, True, ""
        if changed:
            log.info("%s: shunt code set to %d A and read back", who, s.shunt_a)
        else:
            log.info("%s: shunt code already %d A", who, s.shunt_a)

    def _came_back(self, st: SensorState) -> None:
        """A meter that answers again after being down may have been power-cycled or replaced: check (or
        apply) its shunt code again."""
        st.shunt_checked = False
        if self.cfg.poller.apply_shunt_codes and st.cfg.shunt_a is not None and st.cfg.meter.shunt_codes:
            st.shunt_pending = True

    def _check_shunt(self, bus: Bus, st: SensorState, who: str) -> None:
        """Read the current-range register once (at start-up, and after the meter comes back) and warn, once,
        when it does not match ``shunt_a``: the meter then reads current, power and energy off by a factor.
        Writing it stays opt-in (``poller.apply_shunt_codes``, which checks by itself)."""
        s = st.cfg
        if s.shunt_a is None or not s.meter.shunt_codes or self.cfg.poller.apply_shunt_codes:
            st.shunt_checked = True
            return
        try:
            amps = read_shunt(bus, s.meter, s.address)
        except DeviceError as e:
            st.shunt_checked = True
            log.warning("%s: cannot read its shunt code (%s): is it really a %s? (dcmon scan tells the models "
                        "apart)", who, e, s.meter.title)
            return
        except BusError:
            return  # the values came a moment ago: a passing line error; try again at the next poll
        st.shunt_checked = True
        if amps == s.shunt_a:
            if st.shunt_warned is not None:
                log.info("%s: shunt code now matches shunt_a = %d A", who, s.shunt_a)
            st.shunt_warned = None
            return
        key = -1 if amps is None else amps
        if st.shunt_warned == key:
            return  # said already, and nothing changed
        st.shunt_warned = key
        if amps is None:
            effect = "an unknown shunt code (not 50, 100, 200 or 300 A), so its current is wrong"
        else:
            effect = (f"shunt code {amps} A, so current, power and energy read {amps / s.shunt_a:.3g} × the true "
                      f"value")
        log.warning("%s: shunt_a = %d A in the config but the meter has %s; fix the meter with `dcmon shunt set "
                    "--sensor %s --amps %d` (service stopped), or set poller.apply_shunt_codes = true",
                    who, s.shunt_a, effect, s.name, s.shunt_a)

    # ----------------------------------------------------------------------- energy counters
    def restore_counters(self, counters: dict[str, float]) -> None:
        """The last energy counter of each sensor from before a restart (kept in the spool's database), so
        that a counter that went down while the poller was stopped is flagged ``energy_reset`` too."""
        for name, value in counters.items():
            st = self.states.get(name)
            if st is not None and st.last_energy is None:
                st.last_energy = value

    def counters(self) -> dict[str, float]:
        return {st.name: st.last_energy for st in self.states.values() if st.last_energy is not None}

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
