"""The battery monitors inside the running service: readings in, ``battery`` points and a status out.

The service makes one ``BatteryService`` from the configuration (``BatteryService.from_config(cfg)``: None
when there is no ``[[batteries]]`` table) and calls exactly three things:

- ``on_readings(readings) -> list[str]`` after each poll cycle: feeds every battery's monitor with its
  meters' readings and returns InfluxDB line-protocol lines for the ``battery`` measurement (one point per
  battery whose meters were read in these readings; tags ``host`` and ``battery``), to put into the spool
  with the readings' lines. It also saves the state when due and logs the monitors' events (synchronised,
  state lost) as INFO lines.
- ``status() -> dict``: battery name → its state (JSON-able), for status.json under ``"batteries"``;
  ``status_lines(data["batteries"])`` formats it for ``dcmon status``.
- ``close()``: saves the state and closes the store.

It owns the state file (``battery.sqlite`` beside the spool: ``dcmon.battery_store``), the save schedule
(every 30 s on a monotonic deadline, at once after a synchronisation or a loss) and logs each battery's
``limits()`` once at start-up. Thread-safe: the bus threads may call ``on_readings`` concurrently.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .battery import BatteryMonitor, BatterySettings, BatteryState, limits
from .battery_store import SAVE_INTERVAL_S, BatteryStore, SaveSchedule, store_path
from .reading import FieldScalar, Reading, encode_line

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger(__name__)

MEASUREMENT = "battery"
# BatteryState.fields() names → the measurement's field names (units in the names, like dc_power's)
_RENAME = {"current_a": "net_current_a", "power_w": "net_power_w"}
# every field the measurement's points can have (influx_fields' keys; a point leaves out what is unknown)
FIELDS = tuple(_RENAME.get(n, n) for n in BatteryState.field_names())
# a reading's wall time older than this (or in the future) is not used to place it on the monotonic clock
_MAX_READING_AGE_S = 30.0


def influx_fields(st: BatteryState) -> dict[str, FieldScalar]:
    """The ``battery`` point's fields: unknown values left out (never written as 0); each keeps one type.
    ``unknown_reason`` is shortened to its first sentence (a limits() text is ~500 bytes, every cycle)."""
    out = {_RENAME.get(k, k): _round(k, v) for k, v in st.fields().items()}
    if "unknown_reason" in out:
        out["unknown_reason"] = short_reason(st.name, str(out["unknown_reason"]))
    return out


# Decimals a battery field is written with: finer than any meter resolves (0.01 V, 0.001 A), not float noise
_DECIMALS = {"_v": 3, "_a": 4, "_w": 3, "_ah": 5, "_kwh": 7, "_pct": 3, "_s": 1, "cycles": 5}


def _round(name: str, value: FieldScalar) -> FieldScalar:
    if isinstance(value, float):
        for suffix, places in _DECIMALS.items():
            if name.endswith(suffix):
                return round(value, places)
    return value


class BatteryService:
    """Every configured battery's monitor, its durable state and its output (see the module docstring)."""

    name = "batteries"   # its key in status.json (a dcmon.service.ReadingConsumer)

    def __init__(self, batteries: Iterable[BatterySettings], path: Path, host: str, *,
                 save_interval_s: float = SAVE_INTERVAL_S, mono: Callable[[], float] = time.monotonic,
                 wall_ns: Callable[[], int] = time.time_ns,
                 on_state: Callable[[BatteryState], None] | None = None) -> None:
        self.host = host
        self.on_state = on_state   # each new state (the service passes it to the outputs' on_battery)
        self._mono, self._wall_ns = mono, wall_ns
        self._lock = threading.Lock()
        self.store = BatteryStore.open(path)   # BatteryStoreError (a DcmonError: one line) if it cannot be
        self._sched = SaveSchedule(save_interval_s)
        now = wall_ns()
        self.monitors: dict[str, BatteryMonitor] = {}
        for s in batteries:
            self.monitors[s.name] = BatteryMonitor.restore(s, self.store.load(s.name), now)
            log.info("%s", limits(s))
            mon = self.monitors[s.name]
            if mon.soc_known:
                soc = mon.snapshot().soc_pct
                log.info("battery %s: state restored from %s: state of charge %.1f %%", s.name, path,
                         soc if soc is not None else float("nan"))
            elif s.can_count:
                log.info("battery %s: state of charge unknown (%s)", s.name, mon.unknown_reason)
        self._by_sensor: dict[str, list[BatteryMonitor]] = {}
        for mon in self.monitors.values():
            for sensor in mon.settings.sensors:
                self._by_sensor.setdefault(sensor, []).append(mon)
        self._closed = False

    @classmethod
    def from_config(cls, cfg: Config, **kw: Any) -> BatteryService | None:
        """The service's battery monitors, or None when the configuration has no ``[[batteries]]``. A battery
        naming a sensor with ``enabled = false`` shows no state of charge (said once at start-up)."""
        if not cfg.batteries:
            return None
        svc = cls([fit_to_interval(b, cfg.poller.interval_s) for b in cfg.batteries], store_path(cfg), cfg.host, **kw)
        disabled = {s.name for s in cfg.sensors if not s.enabled}
        for mon in svc.monitors.values():
            mon.disabled = disabled & set(mon.settings.sensors)
            if mon.disabled:
                log.warning("battery %s: %s", mon.settings.name, mon.disabled_reason())
        return svc

    # ------------------------------------------------------------------------------ the three calls
    def on_readings(self, readings: Iterable[Reading]) -> list[str]:
        """Feed one cycle's readings; return one ``battery`` line per battery whose meters were read (and
        pass each of those batteries' new state to ``on_state``, outside the lock)."""
        states: list[BatteryState] = []
        lines = self._feed(readings, states)
        if self.on_state is not None:
            for st in states:
                self.on_state(st)
        return lines

    def _feed(self, readings: Iterable[Reading], states: list[BatteryState]) -> list[str]:
        with self._lock:
            if self._closed:
                return []
            mono, wall = self._mono(), self._wall_ns()
            touched: dict[str, int] = {}
            for r in readings:
                mons = self._by_sensor.get(r.sensor)
                if not mons:
                    continue
                age = (wall - r.time_ns) / 1e9
                at = mono - age if 0.0 <= age <= _MAX_READING_AGE_S else mono  # when the reply came, monotonic
                for mon in mons:
                    mon.update(r.sensor, r.time_ns, at, r.fields)
                    name = mon.settings.name
                    touched[name] = max(touched.get(name, 0), r.time_ns)
            lines = []
            for name, t_ns in touched.items():
                st = self.monitors[name].snapshot()
                states.append(st)
                lines.append(encode_line(MEASUREMENT, {"host": self.host, "battery": name}, influx_fields(st), t_ns))
            for mon in self.monitors.values():
                for event in mon.drain_events():
                    log.info("%s", event)
            if touched and self._sched.due(mono, any(m.changed for m in self.monitors.values())):
                self._save()
            return lines

    def status(self) -> dict[str, Any]:
        """Battery name → its state (JSON-able: None = unknown), for status.json's ``"batteries"``."""
        with self._lock:
            return {name: status_entry(mon.snapshot(), mon.settings) for name, mon in self.monitors.items()}

    def close(self) -> None:
        """Save every battery's state and close the file (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._save()
            self._closed = True
            self.store.close()

    def _save(self) -> None:
        self.store.save({name: mon.to_state() for name, mon in self.monitors.items()})


def settings_entry(s: BatterySettings) -> dict[str, Any]:
    """What a battery's status entry tells of its settings (the page and `dcmon status` use them)."""
    return {"capacity_ah": s.capacity_ah, "discharge_floor_pct": s.discharge_floor_pct, "can_count": s.can_count}


def status_entry(st: BatteryState, settings: BatterySettings | None = None) -> dict[str, Any]:
    """A state as status.json's ``"batteries"`` holds it (JSON-able, None = unknown), with the settings'
    keys when ``settings`` is given."""
    d = dataclasses.asdict(st)
    d["stale_sensors"] = list(st.stale_sensors)
    if settings is not None:
        d.update(settings_entry(settings))
    return d


def fit_to_interval(b: BatterySettings, interval_s: float) -> BatterySettings:
    """A meter is stale once not read for ``max_gap_s``; with a slow poller (interval_s = 60, say) the
    default 60 s would call every meter stale between two polls. So a battery allows at least 3 poll
    intervals (said once at start-up)."""
    want = b.stale_after_s(interval_s)
    if b.max_gap_s >= want:
        return b
    log.info("battery %s: max_gap_s %g s is raised to %g s (3 poll intervals of %g s): a meter is stale only "
             "after it missed 3 polls", b.name, b.max_gap_s, want, interval_s)
    return dataclasses.replace(b, max_gap_s=want)


# ------------------------------------------------------------------------------------------ display

def duration(s: float) -> str:
    """A time to go / since, as a person reads it: "25 min", "5 h 12 min", "3.2 days"."""
    s = max(0.0, s)
    if s < 3600:
        return f"{s / 60:.0f} min"
    if s < 48 * 3600:
        return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"
    return f"{s / 86400:.1f} days"


def short_reason(name: str, reason: str) -> str:
    """The reason the SoC is unknown, short: a limits() text becomes its first sentence."""
    prefix = f"battery {name}: "
    if reason.startswith(prefix):
        reason = reason[len(prefix):].split(". ")[0]
    return reason or "unknown"


def headline(name: str, b: Mapping[str, Any]) -> str:
    """One battery's status entry (``status()``'s values) in a phrase: ``SoC 87.3 %, discharging -4.20 A
    12.61 V, time to go 5 h 12 min to 50 %`` (``dcmon status`` and ``dcmon watch --battery``)."""
    soc = b.get("soc_pct")
    head = (f"SoC {soc:.1f} %" if isinstance(soc, (int, float))
            else f"SoC unknown ({short_reason(str(name), str(b.get('unknown_reason') or ''))})")
    state = str(b.get("status") or "unknown")
    cur, volt = b.get("current_a"), b.get("voltage_v")
    if isinstance(cur, (int, float)):
        state += f" {cur:+.2f} A"
    if isinstance(volt, (int, float)):
        state += f" {volt:.2f} V"
    stale = b.get("stale_sensors") or []
    if stale:
        state += f" (not read lately: {', '.join(map(str, stale))})"
    ttg = b.get("time_to_go_s")
    floor = b.get("discharge_floor_pct")
    to = f" to {floor:g} %" if isinstance(floor, (int, float)) else ""
    ttg_text = f"time to go {duration(float(ttg))}{to}" if isinstance(ttg, (int, float)) else "time to go -"
    return f"{head}, {state}, {ttg_text}"


def status_lines(batteries: Mapping[str, Any], *, now_ns: int | None = None) -> list[str]:
    """The ``"batteries"`` part of a status record as lines for ``dcmon status``, two per battery."""
    now = time.time_ns() if now_ns is None else now_ns
    out: list[str] = []
    for name, b in (batteries or {}).items():
        if not isinstance(b, Mapping):
            continue
        used = b.get("consumed_ah")
        used_text = f"{used:.1f} Ah consumed" if isinstance(used, (int, float)) else "Ah consumed unknown"
        last = b.get("last_full_ns")
        if isinstance(last, int):
            ago = duration((now - last) / 1e9)
            full = f"last full charge {ago} ago ({time.strftime('%Y-%m-%d %H:%M', time.localtime(last / 1e9))})"
        else:
            full = "never fully charged since set-up"
        out.append(f"battery {name}: {headline(str(name), b)}")
        out.append(f"  {used_text}, {full}, {int(b.get('synchronisations') or 0)} synchronisation(s), "
                   f"charged {float(b.get('charged_ah') or 0):.1f} Ah, discharged {float(b.get('discharged_ah') or 0):.1f} Ah")
    return out


__all__ = ["BatteryService", "FIELDS", "MEASUREMENT", "duration", "fit_to_interval", "headline", "influx_fields", "settings_entry",
           "short_reason", "status_entry", "status_lines", "store_path"]
