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
from .errors import BusError, ConfigError, DcmonError, DeviceError, NoResponse, PortNotFound, SinkError
from .meter import read_shunt, read_values, set_shunt
from .models import FieldValue, Model, RegType
from .reading import Reading, encode_head, encode_line
from .systemd import Watchdog
from .helptext import Formatter

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


# ------------------------------------------------------------------------------------- the run command

SERVICE_STATUS = Path("/run/dcmon/status.json")  # the installed service's RuntimeDirectory (0750 dcmon:dcmon)


def _probe(path: Path) -> bool | None:
    """Whether ``path`` exists; None when a folder on the way is closed to this user (EACCES), so it cannot
    be told (``Path.exists()`` raises PermissionError there)."""
    try:
        path.stat()
    except PermissionError:
        return None
    except OSError:
        return False
    return True


def service_status_path() -> Path | None:
    """The status file named by the environment or the installed service, if any (no config needed)."""
    if os.environ.get("DCMON_STATUS_PATH"):
        return Path(os.environ["DCMON_STATUS_PATH"])
    if os.environ.get("RUNTIME_DIRECTORY"):
        return Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0]) / "status.json"
    if _probe(SERVICE_STATUS) is not False:  # there, or there but closed to this user: that is the one
        return SERVICE_STATUS
    return None


def status_path(cfg: Config) -> Path:
    """Where the running poller publishes its status for `dcmon status`: $DCMON_STATUS_PATH, else the
    systemd runtime directory (tmpfs: no SD-card writes), else beside the spool."""
    return service_status_path() or cfg.resolve(cfg.spool.path).with_name("status.json")


def simulated_meters(sensors: list[SensorConfig], *, steady: bool = False, shunt_code: int | None = None) -> list:
    """SimMeters for configured sensors: each has its shunt wired (``shunt_a``) and, like a commissioned meter,
    the matching shunt code, unless ``shunt_code`` says which code it has instead (an uncommissioned meter)."""
    from .simulator import meters_for

    meters = meters_for([(s.meter, s.address) for s in sensors], steady=steady)
    for m, s in zip(meters, sensors):
        if m.model.shunt_codes:
            if s.shunt_a:
                m.true_shunt_a = s.shunt_a
            amps = shunt_code or s.shunt_a
            if amps:
                m.holding[0x0003] = m.model.shunt_codes[amps]
    return meters


def start_simulators(cfg: Config) -> list:
    """--simulate: serve each bus's configured meters on a pty and point the bus at it."""
    from .simulator import Simulator

    sims = []
    for name in list(cfg.buses):
        sensors = cfg.enabled_sensors(name)
        if not sensors:
            continue
        sim = Simulator(simulated_meters(sensors)).start()
        sims.append(sim)
        cfg.buses[name].port = sim.path
        log.info("bus %r: simulating %d meter(s) on %s", name, len(sensors), sim.path)
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


def run(cfg: Config, *, simulate: bool = False, once: bool = False, echo: bool | None = None,
        stop: threading.Event | None = None, hint_simulate: bool = False, test: bool = False,
        clock: Clock | None = None) -> int:
    """The main job. Returns the exit status. ``echo``: print each reading (default: with ``once`` only)."""
    from .influx import InfluxSink
    from .sender import Sender
    from .spool import Spool

    cfg.require_sensors()   # the last checks before any I/O: something to poll, a spool we can write
    if test:
        return run_test(cfg, simulate=simulate, hint_simulate=hint_simulate)
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
    poller = Poller(cfg, put=put, on_reading=show if (once if echo is None else echo) else None, retrying=not once,
                    hint_simulate=hint_simulate, progress=watchdog.progress, clock=clock)
    poller.restore_counters(_load_counters(spool))
    for name in poller.buses:
        watchdog.register(f"poll:{name}")
    if not poller.states:
        log.warning("no enabled sensors in %s: nothing to poll", cfg.source)
    if not sink and once:  # the sender's thread says it when the poller runs on
        log.warning("influxdb.enabled = false: readings are kept in the spool %s only", cfg.resolve(cfg.spool.path))
    try:
        if once:
            return _run_once(cfg, poller, sender, spool)
        return _run_forever(cfg, poller, sender, spool, stop, watchdog)
    finally:
        _save_counters(spool, poller)
        poller.close()
        spool.close()
        if sink:
            sink.close()
        for s in sims:
            s.stop()


def _load_counters(spool: Spool) -> dict[str, float]:
    try:
        return spool.load_counters()
    except DcmonError as e:  # never a reason not to poll: only a reset while stopped would go unflagged
        log.warning("cannot read the last energy counters from the spool (%s): a reset made while the poller "
                    "was stopped will not be flagged", e)
        return {}


def _save_counters(spool: Spool, poller: Poller) -> None:
    try:
        spool.save_counters(poller.counters())
    except DcmonError as e:
        log.warning("cannot keep the energy counters in the spool (%s)", e)


def _poll_all_once(poller: Poller) -> None:
    """One cycle of every bus, buses in parallel (each meter on a bus in turn)."""
    threads = [threading.Thread(target=poller.poll_bus_once, args=(name,), name=f"poll {name}") for name in poller.buses]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _cycle_status(poller: Poller) -> int:
    """--once and --test: 1 when a meter failed or a reading was discarded (each was logged once already, with
    its cause: no summary line that says it again)."""
    failed = [st.name for st in poller.states.values() if not st.up]
    discarded = sum(st.discarded for st in poller.states.values())
    return 1 if failed or discarded or not poller.states else 0


def run_test(cfg: Config, *, simulate: bool = False, hint_simulate: bool = False) -> int:
    """``run --test`` (as ``telegraf --test``): poll every meter once and print the line protocol that would be
    written, one line per reading, on stdout. Neither the spool nor the database is touched."""
    sims = start_simulators(cfg) if simulate else []
    lines: list[str] = []
    lock = threading.Lock()

    def put(batch: list[str]) -> None:
        with lock:
            lines.extend(batch)

    poller = Poller(cfg, put=put, retrying=False, hint_simulate=hint_simulate)
    if not poller.states:
        log.warning("no enabled sensors in %s: nothing to poll", cfg.source)
    try:
        _poll_all_once(poller)
    finally:
        poller.close()
        for sim in sims:
            sim.stop()
    for line in lines:
        print(line)
    sys.stdout.flush()
    target = (f"{cfg.influxdb.url} ({'bucket ' + cfg.influxdb.bucket if cfg.influxdb.api == 2 else 'database ' + cfg.influxdb.database})"
              if cfg.influxdb.enabled else "nowhere (influxdb.enabled = false)")
    log.info("--test: %d line(s) that would go to %s; nothing was spooled or written", len(lines), target)
    return _cycle_status(poller)


def _run_once(cfg: Config, poller: Poller, sender: Sender, spool: Spool) -> int:
    _poll_all_once(poller)
    quarantined_before = spool.stats().quarantined
    if cfg.influxdb.enabled:
        # send while it works (a backlog too, for up to 30 s); the first failure ends it with one line
        deadline = time.monotonic() + 30.0
        try:
            while sender.send_once() and time.monotonic() < deadline:
                pass
        except SinkError as e:
            log.warning("%s; %d reading(s) kept in the spool %s", e, spool.stats().depth, spool.path)
        else:
            stats = spool.stats()
            refused = stats.quarantined - quarantined_before
            if refused > 0:
                log.warning("InfluxDB refused %d line(s) for good: set aside in the quarantine (`dcmon spool "
                            "quarantine list` shows why)", refused)
                return 1
            if stats.depth:
                log.info("%d reading(s) still queued in the spool %s", stats.depth, spool.path)
            elif any(st.up for st in poller.states.values()):
                log.info("all readings written to %s", cfg.influxdb.url)
    return _cycle_status(poller)


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
    next_counters = next_status + COUNTERS_SAVE_S
    next_health = time.monotonic() + min(10.0, cfg.poller.health_interval_s or 10.0)
    while not stop.wait(1.0):
        now = time.monotonic()
        stats = spool.stats()
        if now >= next_status:  # every 5 s: cheap, and on tmpfs under systemd (RuntimeDirectory)
            next_status = now + 5.0
            _write_status(spath, _status_record(cfg, poller, stats, sender, "running"))
        if now >= next_counters:
            next_counters = now + COUNTERS_SAVE_S
            _save_counters(spool, poller)
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
    _write_status(spath, _status_record(cfg, poller, spool.stats(), sender, "stopped"))
    log.info("stopped")
    return 0


# The energy counters are saved this often (and at every stop): a counter only grows, so after a kill the saved
# value is at most a minute behind and a reset made while stopped is still a drop below it.
COUNTERS_SAVE_S = 60.0


def _status_record(cfg: Config, poller: Poller, stats: SpoolStats, sender: Sender, state: str) -> dict[str, object]:
    from . import __version__

    return {**poller.status(), "state": state, "version": __version__, "interval_s": cfg.poller.interval_s,
            "influxdb_enabled": cfg.influxdb.enabled, "spool": _stats_dict(stats),
            "sender_error": getattr(sender, "last_error", "")}




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


def _owner_of(path: Path) -> tuple[int, int] | None:
    """The uid and gid owning ``path``, or its nearest existing folder; None when nothing can be looked at."""
    for p in (path, *path.parents):
        try:
            st = p.stat()
            return st.st_uid, st.st_gid
        except FileNotFoundError:
            continue
        except OSError:
            return None
    return None


def cmd_run(args: argparse.Namespace) -> int:
    # command-line overrides go through the config's own validation (a range, and nan/inf refused)
    cfg = _setup(args, {"poller.interval_s": ("--interval", args.interval)} if args.interval is not None else None)
    echo = args.print if args.print is not None else (sys.stdout.isatty() or args.simulate or args.once)
    return run(cfg, simulate=args.simulate, once=args.once, echo=echo, hint_simulate=not args.simulate,
               test=args.test)


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    cfg.require_sensors()
    note = ""
    try:
        cfg.check_spool()
    except ConfigError as e:
        owner, group = _owner_of(cfg.resolve(cfg.spool.path)) or (None, None)
        if owner is None or owner == os.geteuid() or group not in {os.getegid(), *os.getgroups()}:
            raise
        # the service's spool, looked at by a member of its group: may check the file, not write the spool
        import pwd

        name = pwd.getpwuid(owner).pw_name if owner in {p.pw_uid for p in pwd.getpwall()} else str(owner)
        note = f"note: {e.problem}; it belongs to {name}: `sudo -u {name} dcmon check-config` checks it as the service"
    print("\n".join(cfg.describe()))
    if note:
        print(note)
    print(f"{cfg.source}: ok")
    return 0


def _simulate_what(args: argparse.Namespace) -> list[tuple[str | None, list, list[SensorConfig | None]]]:
    """What `dcmon simulate` serves: the meters given (--model/--address), else the configuration's (one pty per
    bus), else one PZEM-017 at address 1. Each: (bus name, SimMeters, the sensor each one is)."""
    from .simulator import meters_for

    if args.model or args.address:
        addrs = args.address or [1]
        model = args.model or "pzem017"
        meters = meters_for([(model, a) for a in addrs], steady=args.steady)
        if args.shunt_code and meters[0].model.shunt_codes:
            for m in meters:
                m.holding[0x0003] = m.model.shunt_codes[args.shunt_code]
        return [(None, meters, [None] * len(meters))]
    found = _probe(Path(args.config))
    if found is False:
        print(f"no configuration at {args.config}: serving one PZEM-017 at address 1", file=sys.stderr)
        cfg = None
    else:
        cfg = load(args.config)  # unreadable or invalid: one line saying so (exit 2)
    if cfg is None or not cfg.enabled_sensors():
        if cfg is not None:
            print(f"no enabled sensors in {cfg.source}: serving one PZEM-017 at address 1", file=sys.stderr)
        meters = meters_for([("pzem017", 1)], steady=args.steady)
        if args.shunt_code:
            meters[0].holding[0x0003] = meters[0].model.shunt_codes[args.shunt_code]
        return [(None, meters, [None])]
    out: list[tuple[str | None, list, list[SensorConfig | None]]] = []
    for name in cfg.buses:
        sensors = cfg.enabled_sensors(name)
        if sensors:
            out.append((name, simulated_meters(sensors, steady=args.steady, shunt_code=args.shunt_code), list(sensors)))
    return out


def _describe_meter(m: object, sensor: SensorConfig | None, steady: bool) -> str:
    model = m.model  # type: ignore[attr-defined]
    extra = [f"sensor {sensor.name!r}"] if sensor else []
    if model.shunt_codes:
        amps = model.shunt_amps(m.holding.get(0x0003, 0))  # type: ignore[attr-defined]
        extra.append(f"shunt code {amps} A" + (f" on a {m.true_shunt_a} A shunt" if amps != m.true_shunt_a else ""))  # type: ignore[attr-defined]
    if steady:
        v = m.values()  # type: ignore[attr-defined]
        extra.append(f"steady {float(v['voltage_v']):.2f} V {float(v['current_a']):.2f} A")
    return f"{model.title} at address {m.address}" + (f" ({', '.join(extra)})" if extra else "")  # type: ignore[attr-defined]


def cmd_simulate(args: argparse.Namespace) -> int:
    """Serve simulated meters on a pty until interrupted; print what is served where, and how to use it."""
    from .simulator import Simulator

    served = _simulate_what(args)
    sims: list[Simulator] = []
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        for bus, meters, sensors in served:
            link = args.link if not args.link or len(served) == 1 else f"{args.link}-{bus}"
            try:
                sim = Simulator(meters, timing=args.timing, turnaround_s=args.turnaround, link=link).start()
            except OSError as e:
                raise DcmonError(f"cannot make the link {link}: {e.strerror}; choose a path in a folder you may "
                                 f"write (e.g. --link /tmp/pzem)") from None
            sims.append(sim)
            where = sim.link or sim.path
            first = meters[0]
            framing = f"{first.model.serial.baudrate} {first.model.serial.bytesize}{first.model.serial.parity}{first.model.serial.stopbits}"
            what = ", ".join(_describe_meter(m, s, args.steady) for m, s in zip(meters, sensors))
            print(f"{where}  {'bus ' + repr(bus) + ', ' if bus else ''}{framing}: {what}", flush=True)
        bus0, meters0, _ = served[0]
        where0 = sims[0].link or sims[0].path
        model_opt = "" if meters0[0].model.name == "pzem017" else f" --model {meters0[0].model.name}"
        print(f"try: dcmon read --port {where0} --address {meters0[0].address}{model_opt}   "
              f"(or `dcmon run --simulate`, which simulates the configured meters by itself); Ctrl-C stops",
              flush=True)
        stop.wait()
    finally:
        for sim in sims:
            sim.stop()
    return 0


# `dcmon status` exit codes, as monitoring plugins report them (Nagios, Icinga, Telegraf `exec`, cron, Home
# Assistant `command_line`): docs/troubleshooting.md#dcmon-status-as-a-health-check.
STATUS_OK, STATUS_WARNING, STATUS_CRITICAL, STATUS_UNKNOWN = 0, 1, 2, 3
_VERDICT = {STATUS_OK: "OK", STATUS_WARNING: "WARNING", STATUS_CRITICAL: "CRITICAL", STATUS_UNKNOWN: "UNKNOWN"}
STATUS_MAX_AGE_S = 30.0        # the poller rewrites it every 5 s
STATUS_MAX_BACKLOG_S = 600.0   # readings older than this still waiting for InfluxDB


def _pid_alive(pid: object) -> bool:
    try:
        os.kill(int(pid), 0)  # type: ignore[call-overload]
    except PermissionError:
        return True           # there, and someone else's (the service runs as dcmon)
    except (OSError, ValueError, TypeError, OverflowError):
        return False
    return True


def _clock(t: object) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(t)))  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError, OSError):
        return "an unknown time"


def assess(data: dict, *, now: float | None = None, max_age_s: float = STATUS_MAX_AGE_S,
           max_backlog_s: float = STATUS_MAX_BACKLOG_S) -> tuple[int, list[str]]:
    """The verdict on a status record: (exit status, problems). Not running (stopped, a dead pid, a stale
    status) is CRITICAL; running with a sensor down or an old backlog is WARNING."""
    now = time.time() if now is None else now
    pid = data.get("pid")
    age = now - float(data.get("time") or 0)
    if data.get("state") == "stopped":
        return STATUS_CRITICAL, [f"the poller stopped cleanly at {_clock(data.get('time'))}; start it: "
                                 f"sudo systemctl start dcmon"]
    if not _pid_alive(pid):
        return STATUS_CRITICAL, [f"the poller (pid {pid}) is not running: killed or crashed "
                                 f"(journalctl -u dcmon -n 30 says why)"]
    if age > max_age_s:
        return STATUS_CRITICAL, [f"the status is {age:.0f} s old (more than {max_age_s:g} s): the poller is hung "
                                 f"(journalctl -u dcmon -n 30)"]
    problems = []
    buses = data.get("buses") or {}
    for name, s in (data.get("sensors") or {}).items():
        bus_error = (buses.get(s.get("bus")) or {}).get("error", "")
        if s.get("up") is False or bus_error:
            problems.append(f"sensor {name!r} is down: {s.get('last_error') or bus_error}")
    sp = data.get("spool") or {}
    oldest = sp.get("oldest_time_ns")
    if data.get("influxdb_enabled", True) and oldest:
        backlog = now - float(oldest) / 1e9
        if backlog > max_backlog_s:
            why = data.get("sender_error") or "InfluxDB has not taken them"
            problems.append(f"{sp.get('depth', 0)} reading(s) wait in the spool, the oldest {backlog / 60:.0f} min "
                            f"old: {why}")
    return (STATUS_WARNING if problems else STATUS_OK), problems


def _status_verdict(code: int, problems: list[str], data: dict | None = None) -> str:
    if code == STATUS_OK and data is not None:
        sensors = data.get("sensors") or {}
        up = sum(1 for s in sensors.values() if s.get("up"))
        depth = (data.get("spool") or {}).get("depth", 0)
        return (f"DCMON OK: poller pid {data.get('pid')} running, {up} of {len(sensors)} sensor(s) up, "
                f"{depth} reading(s) queued")
    return f"DCMON {_VERDICT[code]}: " + "; ".join(problems)


def cmd_status(args: argparse.Namespace) -> int:
    path = service_status_path() or status_path(load(args.config))
    problem = ""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        code, problem = STATUS_CRITICAL, (f"no status at {path}: the poller is not running "
                                          f"(systemctl status dcmon; or start it: sudo systemctl start dcmon)")
    except PermissionError:
        code, problem = STATUS_UNKNOWN, (f"cannot read {path}: permission denied; run `sudo dcmon status`, or "
                                         f"join the dcmon group (sudo usermod -aG dcmon $USER, then log in again)")
    except (OSError, ValueError) as e:
        code, problem = STATUS_UNKNOWN, f"cannot read the status {path}: {getattr(e, 'strerror', None) or e}"
    if problem:
        if args.json:
            print(json.dumps({"health": {"status": _VERDICT[code], "exit": code, "problems": [problem]}}))
        else:
            print(f"DCMON {_VERDICT[code]}: {problem}")
        return code
    code, problems = assess(data, max_age_s=args.max_age, max_backlog_s=args.max_backlog)
    if args.json:
        print(json.dumps({**data, "health": {"status": _VERDICT[code], "exit": code, "problems": problems}}, indent=2))
        return code
    print(_status_verdict(code, problems, data))
    if args.brief:
        return code
    age = time.time() - float(data.get("time") or 0)
    print(f"poller pid {data.get('pid')}, {data.get('state', 'running')}, status {age:.0f} s old"
          + (f", dcmon {data['version']}" if data.get("version") else ""))
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
    return code


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, not {text}")
    return v


def _parser(sub: argparse._SubParsersAction, name: str, common: argparse.ArgumentParser, *, help: str,
            description: str, examples: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, parents=[common], help=help, description=description,
                          epilog="examples:\n" + examples, formatter_class=Formatter)


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from .models import MODELS

    p = _parser(sub, "run", common, help="poll the meters and write to InfluxDB (the main job)",
                description="Poll every configured meter on its bus, keep each reading in the local spool and send "
                            "the spool to InfluxDB, until stopped (Ctrl-C or systemctl stop). This is what the "
                            "service runs.",
                examples="  dcmon run --simulate              # simulated meters, no hardware needed\n"
                         "  dcmon run --once                  # one cycle: poll, print, send, exit (1 if a meter failed)\n"
                         "  dcmon run --test                  # poll once, print the line protocol, write nothing")
    p.add_argument("--simulate", action="store_true", help="poll simulated meters on a pseudo-terminal instead of the ports")
    once = p.add_mutually_exclusive_group()
    once.add_argument("--once", action="store_true",
                      help="one cycle: poll, print, send, exit; exit status 1 if a meter failed, a reading was "
                           "discarded or InfluxDB refused a line")
    once.add_argument("--test", action="store_true",
                      help="poll once and print the line protocol that would be written; touch neither the spool "
                           "nor the database (exit status as --once)")
    p.add_argument("--interval", type=float, default=None, metavar="S", help="seconds between polls (overrides poller.interval_s)")
    p.add_argument("--print", dest="print", action="store_true", default=None, help="print each reading (default on a terminal and with --once)")
    p.add_argument("--no-print", dest="print", action="store_false", help="do not print readings")
    p.set_defaults(func=cmd_run)

    p = _parser(sub, "check-config", common, help="validate the configuration and exit",
                description="Check the configuration whole (config.toml, config.local.toml beside it, DCMON_* "
                            "environment variables: every key, file and the spool's folder) without touching a "
                            "meter or the network, and name the files merged. A mistake gives one line naming the "
                            "file, the key and the fix, and exit status 2.",
                examples="  dcmon check-config\n  sudo -u dcmon dcmon check-config --config /etc/dcmon/config.toml")
    p.set_defaults(func=cmd_check_config)

    p = _parser(sub, "simulate", common, help="serve simulated PZEM meters on a pseudo-terminal",
                description="Serve simulated meters, speaking real Modbus RTU, on a pseudo-terminal that any command "
                            "can open as its serial port, until Ctrl-C. Without --model or --address it serves the "
                            "meters of the configuration (one pseudo-terminal per bus), or one PZEM-017 at address 1. "
                            "It prints the port and a command to try.",
                examples="  dcmon simulate\n"
                         "  dcmon simulate --steady --link /tmp/pzem     # values that do not wander, at /tmp/pzem\n"
                         "  dcmon simulate --address 1 --address 2 --shunt-code 100")
    p.add_argument("--model", default=None, choices=sorted(MODELS), help="meter model (default pzem017)")
    p.add_argument("--address", type=int, action="append", help="address to serve (repeat for more meters)")
    p.add_argument("--steady", action="store_true",
                   help="values that do not wander (13.20 V, 8.00 A for the first meter), e.g. to reproduce "
                        "the examples of docs/commissioning.md")
    p.add_argument("--shunt-code", type=int, choices=(50, 100, 200, 300), metavar="A",
                   help="the shunt code the PZEM-017 meters have (default: the config's shunt_a, like a commissioned "
                        "meter; 100 A, the factory code, without one)")
    p.add_argument("--timing", action="store_true", help="delay replies by the 9600-baud wire time")
    p.add_argument("--turnaround", type=float, default=0.0, metavar="S", help="extra reply delay in seconds (with --timing)")
    p.add_argument("--link", default=None, metavar="PATH", help="also make this symlink to the pseudo-terminal (e.g. /tmp/pzem)")
    p.set_defaults(func=cmd_simulate, address=None)

    p = _parser(sub, "status", common, help="is the poller running and healthy? (a health check for scripts)",
                description="What the running poller sees: each meter, its last reading and errors, the spool. The "
                            "first line is the verdict, and the exit status says it for scripts and monitoring "
                            "(Nagios plugin codes): 0 OK: running, every sensor up, no old backlog; 1 WARNING: "
                            "running, but a sensor is down or readings older than --max-backlog wait for InfluxDB; "
                            "2 CRITICAL: not running (stopped, killed, no status) or its status is older than "
                            "--max-age; 3 UNKNOWN: the status cannot be read (permissions).",
                examples="  dcmon status\n  dcmon status --brief || echo 'dcmon needs attention'\n"
                         "  dcmon status --json --max-backlog 300")
    p.add_argument("--json", action="store_true", help="print the status as JSON (with a \"health\" verdict)")
    p.add_argument("--brief", action="store_true", help="print only the verdict line")
    p.add_argument("--max-age", type=_seconds, default=STATUS_MAX_AGE_S, metavar="S",
                   help=f"a status older than this means the poller is hung (default {STATUS_MAX_AGE_S:g})")
    p.add_argument("--max-backlog", type=_seconds, default=STATUS_MAX_BACKLOG_S, metavar="S",
                   help=f"warn when the oldest unsent reading is older than this (default {STATUS_MAX_BACKLOG_S:g})")
    p.set_defaults(func=cmd_status)
