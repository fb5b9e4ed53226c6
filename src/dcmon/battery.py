"""A battery monitor from PZEM meters: state of charge, time to go, charge/discharge history.

Done the way Victron's BMV-712 / SmartShunt do it (docs/battery.md cites each parameter and default),
with what the PZEM-017 makes different: its current has no sign, so a battery needs one or more meters on
the cables **into** it (``charge``: chargers, solar) and **out of** it (``discharge``: loads, inverter);
net current = Σ charge − Σ discharge.

Pure: no I/O, no clock. The poller feeds it each meter's decoded reading with ``update()`` and reads a typed
``BatteryState`` with ``snapshot()``; ``to_state()`` / ``BatteryMonitor.restore()`` move the durable part
to and from ``dcmon.battery_store``.

How the charge is counted (the choice the issue asked to document):
- The meters' own energy counters are the long-term truth: the meter integrates continuously, while a
  sampled current misses what happens between polls. But the PZEM-017's counter has 1 Wh resolution
  (about 0.08 Ah at 12 V: at 24 W it steps once every 2.5 minutes).
- So each meter's true internal total is *estimated* between steps by integrating its sampled power
  (trapezoid, P × Δt), and that estimate is clamped into the interval the counter allows: the meter's
  internal total is at least the counter and less than the counter + 1 Wh. Short-term resolution comes
  from the sampled power, the long-term sum can never drift more than 1 Wh from the counter, and a gap in
  polling (bus down, poller restarted) is bridged by the counter alone.
- Wh → Ah with the mean voltage over the interval (the counter integrates V × I, the battery stores Ah).
- A counter that went down (reset, or a meter that lost its memory) loses what flowed in that interval:
  after a short interval (≤ ``max_gap_s``) P × Δt stands in for it; after a longer one the state of
  charge is declared lost (unknown) rather than guessed.

Corrections (on the net current, as a shunt on the battery would see it):
- |net| below ``current_threshold_a`` counts as zero (nothing is counted);
- net > 0 (charging): every Ah counted is multiplied by the charge efficiency;
- net < 0 (discharging): by Peukert's factor (I / I_rated)^(n − 1), I_rated = capacity / rated_hours,
  so the state of charge is the remaining capacity at the rated (20 h) rate.
Synchronisation to 100 %: battery voltage above ``charged_voltage_v`` and net current below the tail
current (and not discharging) for ``charged_detection_min`` without a break. Before the first
synchronisation, and after the state is lost, the state of charge is unknown (None), never guessed.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from .errors import ConfigError
from .schema import Invalid, key, parse

log = logging.getLogger(__name__)

Chemistry = Literal["lead-acid", "lifepo4"]
BatteryStatus = Literal["charging", "discharging", "idle", "unknown"]
STATE_VERSION = 1

# Per-chemistry defaults (docs/battery.md gives the Victron source of each).
#   charged voltage is per 12 V of nominal voltage: 13.2 V is the BMV-712's 12 V default; LiFePO4 is
#   charged well above its 13.3 V plateau, so 14.0 V (3.5 V a cell) is used, just under the usual
#   14.2 V absorption voltage.
PRESETS: dict[str, dict[str, float]] = {
    "lead-acid": {"charge_efficiency_pct": 95.0, "peukert": 1.25, "discharge_floor_pct": 50.0,
                  "charged_voltage_per_12v": 13.2},
    "lifepo4": {"charge_efficiency_pct": 99.0, "peukert": 1.05, "discharge_floor_pct": 10.0,
                "charged_voltage_per_12v": 14.0},
}
_CHEMISTRY_ALIASES = {"lead-acid": "lead-acid", "lead_acid": "lead-acid", "leadacid": "lead-acid", "agm": "lead-acid",
                      "gel": "lead-acid", "flooded": "lead-acid", "lifepo4": "lifepo4", "lfp": "lifepo4",
                      "lifepo": "lifepo4"}


def _tag_safe(v: str) -> str:
    """The name becomes the ``battery`` tag: line protocol cannot carry one ending in a backslash."""
    if v.endswith("\\"):
        raise Invalid("must not end with a backslash (InfluxDB's line protocol cannot carry it)",
                      "remove the trailing backslash")
    return v


def _chemistry(v: str) -> str:
    chem = _CHEMISTRY_ALIASES.get(v.strip().lower().replace(" ", ""))
    if chem is None:
        raise Invalid("is not a chemistry we know", 'use "lead-acid" (also AGM, gel) or "lifepo4"')
    return chem


def _or_default(sentinel: float, lo: float, hi: float, unit: str = "") -> Any:
    """A key whose ``sentinel`` value means "the chemistry's default"; anything else must be in lo..hi."""
    def check(v: float) -> float:
        if v != sentinel and not lo <= v <= hi:
            raise Invalid(f"must be from {lo:g}{unit} to {hi:g}{unit} (or {sentinel:g} for the chemistry's default)")
        return v
    return check


def _sensor_names(v: list[str]) -> list[str]:
    for i, s in enumerate(v):
        if not s:
            raise Invalid("a sensor name must not be empty", 'e.g. ["solar", "charger"]', loc=(i,))
    return v


@dataclass(kw_only=True)
class BatterySettings:
    """One ``[[batteries]]`` table: a field of ``dcmon.config.Config`` (``batteries``), validated by
    ``dcmon.schema`` like every other table; ``check()`` fills in the chemistry's defaults. Outside the config
    loader build it with ``from_dict`` or ``preset``."""

    name: str = key(min_len=1, max_len=64, check=_tag_safe)  # the `battery` tag
    capacity_ah: float = key(gt=0, le=100_000, fix="the battery's rated capacity (20 h rate), e.g. capacity_ah = 200")
    nominal_v: float = key(12.0, gt=0, le=1000)
    chemistry: str = key("lead-acid", check=_chemistry)
    charge: list[str] = key(factory=list, check=_sensor_names)         # meters on the cables into it (chargers, solar)
    discharge: list[str] = key(factory=list, check=_sensor_names)      # meters on the cables out of it (loads, inverter)
    battery_cable: list[str] = key(factory=list, check=_sensor_names)  # a meter on the battery cable: no sign
    voltage_sensor: str = ""              # whose voltage is the battery's ("" = the first meter listed)
    charged_voltage_v: float = key(0.0, ge=0, le=1500)   # 0 = the chemistry's default for nominal_v
    tail_current_pct: float = key(4.0, ge=0.5, le=10)    # % of capacity, in A
    charged_detection_min: float = key(3.0, ge=0, le=50)
    peukert: float = key(0.0, check=_or_default(0.0, 1.0, 1.5))                          # 0 = the chemistry's
    charge_efficiency_pct: float = key(0.0, check=_or_default(0.0, 50, 100, " %"))       # 0 = the chemistry's
    current_threshold_a: float = key(0.1, ge=0, le=2)
    ttg_window_min: float = key(3.0, ge=0, le=12)
    discharge_floor_pct: float = key(-1.0, check=_or_default(-1.0, 0, 99, " %"))        # -1 = the chemistry's
    rated_hours: float = key(20.0, ge=1, le=100)          # the discharge time the capacity is rated at (C20)
    max_gap_s: float = key(60.0, ge=1, le=3600)           # longest interval bridged by sampled power
    state_max_age_h: float = key(24.0, gt=0, le=24 * 365)  # a saved state older than this: state of charge unknown

    def check(self) -> None:
        """Rules across keys, then the chemistry's defaults for the keys left at 0 (-1)."""
        every = self.sensors
        if not every:
            raise Invalid("no meters: a battery needs the meters on its cables",
                          'list them: charge = ["solar"] and discharge = ["loads"] (or battery_cable = ["shunt"])',
                          loc=("charge",))
        dup = sorted({s for s in every if every.count(s) > 1})
        if dup:
            raise Invalid(f"{', '.join(dup)} listed more than once",
                          "a meter is either charge, discharge or battery_cable, once", loc=("discharge",))
        if self.voltage_sensor and self.voltage_sensor not in every:
            raise Invalid(f"{self.voltage_sensor!r} is not one of this battery's meters ({', '.join(every)})",
                          "name one of them, or leave it out (the first meter listed)", loc=("voltage_sensor",))
        pre = PRESETS[self.chemistry]
        default_cv = round(pre["charged_voltage_per_12v"] * self.nominal_v / 12.0, 2)
        if self.charged_voltage_v == 0.0:
            self.charged_voltage_v = default_cv
        elif not self.nominal_v * 0.95 <= self.charged_voltage_v <= self.nominal_v * 1.5:
            raise Invalid(f"{self.charged_voltage_v:g} V does not suit the nominal {self.nominal_v:g} V",
                          f"set it 0.1 to 0.2 V below the charger's float (lead-acid) or absorption (LiFePO4) "
                          f"voltage, default {default_cv:.2f} V", loc=("charged_voltage_v",))
        if self.peukert == 0.0:
            self.peukert = pre["peukert"]
        if self.charge_efficiency_pct == 0.0:
            self.charge_efficiency_pct = pre["charge_efficiency_pct"]
        if self.discharge_floor_pct == -1.0:
            self.discharge_floor_pct = pre["discharge_floor_pct"]

    # ------------------------------------------------------------------------------ derived values
    @property
    def tail_current_a(self) -> float:
        return self.capacity_ah * self.tail_current_pct / 100.0

    @property
    def rated_current_a(self) -> float:
        return self.capacity_ah / self.rated_hours

    @property
    def sensors(self) -> list[str]:
        return [*self.charge, *self.discharge, *self.battery_cable]

    @property
    def battery_voltage_sensor(self) -> str:
        return self.voltage_sensor or (self.sensors[0] if self.sensors else "")

    @property
    def can_count(self) -> bool:
        """True when the state of charge can be estimated at all (see ``limits``)."""
        return bool(self.charge) and bool(self.discharge) and not self.battery_cable

    def stale_after_s(self, interval_s: float) -> float:
        """How long a meter may go unread before it counts as stale: ``max_gap_s``, but at least 3 poll
        intervals (a once-a-minute poller would otherwise make every meter stale between two polls)."""
        return max(self.max_gap_s, 3.0 * interval_s)

    def fingerprint(self) -> str:
        """What a saved state must match to be restored: the capacity and the meters counted."""
        return f"{self.capacity_ah:g}Ah|in={','.join(self.charge)}|out={','.join(self.discharge)}"

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def preset(cls, name: str, capacity_ah: float, chemistry: str = "lead-acid", **kw: Any) -> BatterySettings:
        """Settings with the chemistry's defaults filled in (validated like the config file's)."""
        data: dict[str, Any] = {"name": name, "capacity_ah": capacity_ah, "chemistry": chemistry, **kw}
        return cls.from_dict(data, "<code>")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "config.toml", *, key: str = "batteries") -> BatterySettings:
        """Validate one ``[[batteries]]`` table outside the config loader (``dcmon.config.load`` parses them
        as a field of Config). Raises ConfigError naming ``where``, the key (``key`` + its own) and the fix."""
        try:
            out: BatterySettings = parse(cls, dict(data) if isinstance(data, Mapping) else data)
        except Invalid as e:
            loc = ".".join(str(p) for p in (key, *e.loc))
            raise ConfigError(where, loc, e.problem, e.fix or "see docs/battery.md for the keys of a battery") from None
        return out


def limits(settings: BatterySettings) -> str:
    """What this battery's meters can and cannot tell, in words (for the start-up log and the docs)."""
    n = settings.name
    if settings.battery_cable:
        meters = ", ".join(settings.battery_cable)
        return (f"battery {n}: one meter on the battery cable ({meters}). A PZEM-017's current has no sign, so it "
                f"cannot tell charge from discharge: known are the voltage (and its minimum and maximum), the size "
                f"of the current and the power, and the throughput (Ah and kWh through the cable, both directions "
                f"added). Not known: state of charge, time to go, Ah consumed, Ah charged versus discharged, "
                f"synchronisation. For those, put one meter on the charge side and one on the load side "
                f"(charge = [...], discharge = [...]).")
    if not settings.charge:
        return (f"battery {n}: only load meters ({', '.join(settings.discharge)}): what goes out is measured, what "
                f"comes in is not, so state of charge, time to go and synchronisation are unknown. Add the "
                f"charger's or solar's meter to charge = [...].")
    if not settings.discharge:
        return (f"battery {n}: only charge meters ({', '.join(settings.charge)}): what comes in is measured, what "
                f"goes out is not, so state of charge and time to go are unknown. Add the loads' meter to "
                f"discharge = [...].")
    return (f"battery {n}: net current = {' + '.join(settings.charge)} - {' - '.join(settings.discharge)}. State of "
            f"charge is unknown until the first synchronisation (voltage above {settings.charged_voltage_v:g} V and "
            f"net current below {settings.tail_current_a:g} A for {settings.charged_detection_min:g} min). Current "
            f"that bypasses these meters (a charger or load wired straight to the battery) is not seen.")


def peukert_factor(settings: BatterySettings, current_a: float) -> float:
    """Ah of rated capacity used per Ah drawn at ``current_a``: (I / I_rated)^(n − 1)."""
    if current_a <= 0 or settings.peukert == 1.0:
        return 1.0
    return (current_a / settings.rated_current_a) ** (settings.peukert - 1.0)


# BatteryState's attributes that are not fields of its point ("status" is, but comes first)
_NOT_FIELDS = ("name", "status", "stale_sensors", "last_full_ns")


@dataclass(frozen=True)
class BatteryState:
    """What the monitor knows now. None = unknown (never a guess)."""

    name: str
    status: BatteryStatus
    soc_pct: float | None               # state of charge, % (None until synchronised, and after loss)
    time_to_go_s: float | None          # to the discharge floor at the averaged current (None: not discharging)
    unknown_reason: str                 # why soc_pct is None ("" when known)
    voltage_v: float | None
    current_a: float | None             # net: + into the battery, − out of it (None: a meter is stale)
    power_w: float | None
    consumed_ah: float | None           # Ah taken out since the last full charge (charge efficiency applied)
    charged_ah: float                   # history (counted on the net flow into the battery)
    discharged_ah: float
    charged_kwh: float
    discharged_kwh: float
    deepest_discharge_ah: float | None
    last_discharge_ah: float | None
    average_discharge_ah: float | None
    full_cycles: float                  # discharged Ah / capacity (equivalent full cycles)
    synchronisations: int
    min_voltage_v: float | None
    max_voltage_v: float | None
    last_full_ns: int | None            # wall time of the last synchronisation
    time_since_full_s: float | None
    stale_sensors: tuple[str, ...] = ()


    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Every key ``fields()`` can give, in its order."""
        return ("status", "soc_known", *(f.name for f in fields(cls) if f.name not in _NOT_FIELDS))

    def fields(self) -> dict[str, float | int | bool | str]:
        """For an InfluxDB point / MQTT / HTTP: unknown values are left out (never written as 0); each
        field keeps one type (floats stay floats)."""
        out: dict[str, float | int | bool | str] = {"status": self.status, "soc_known": self.soc_pct is not None}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in _NOT_FIELDS or v is None:
                continue
            if f.name == "unknown_reason":
                if v:
                    out[f.name] = v
            elif isinstance(v, bool) or f.name == "synchronisations":
                out[f.name] = int(v)
            else:
                out[f.name] = float(v)
        return out


@dataclass
class _Meter:
    """Per-meter counting state (see the module docstring for the clamp)."""

    sign: int                       # +1 charge, −1 discharge, 0 battery cable (throughput only)
    total_wh: float | None = None   # estimate of the meter's internal energy total (counter ≤ it < counter + 1)
    phase_known: bool = False       # the counter has stepped since we started: total_wh is pinned to it
    counter_wh: float | None = None
    last_ns: int | None = None
    last_mono: float | None = None  # None after a restore: intervals then come from wall time
    voltage_v: float | None = None
    current_a: float = 0.0
    power_w: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"total_wh": self.total_wh, "phase_known": self.phase_known, "counter_wh": self.counter_wh,
                "last_ns": self.last_ns,
                "voltage_v": self.voltage_v, "power_w": self.power_w}


@dataclass
class _History:
    charged_ah: float = 0.0
    discharged_ah: float = 0.0
    charged_wh: float = 0.0
    discharged_wh: float = 0.0
    through_ah: float = 0.0        # battery_cable meters: both directions added
    through_wh: float = 0.0
    deepest_ah: float = 0.0
    last_depth_ah: float | None = None
    depth_sum_ah: float = 0.0
    depth_count: int = 0
    syncs: int = 0
    min_v: float | None = None
    max_v: float | None = None
    last_full_ns: int | None = None
    # Flow against the present direction, not yet netted (see BatteryMonitor._count): a load's step while
    # charging waits here for the chargers' next step, so charged/discharged totals never go back.
    carry_ah: float = 0.0
    carry_wh: float = 0.0
    carry_charging: bool = True


MIN_COUNTED_DEPTH_PCT = 1.0  # discharges shallower than this (float-charge wiggles) do not count in the average


class BatteryMonitor:
    """The estimator for one battery. Not thread-safe: one poller thread feeds it (or hold a lock)."""

    def __init__(self, settings: BatterySettings) -> None:
        self.settings = settings
        self._meters: dict[str, _Meter] = {}
        for n in settings.charge:
            self._meters[n] = _Meter(sign=+1)
        for n in settings.discharge:
            self._meters[n] = _Meter(sign=-1)
        for n in settings.battery_cable:
            self._meters[n] = _Meter(sign=0)
        self.h = _History()
        self.soc_known = False
        self.unknown_reason = "not synchronised yet" if settings.can_count else limits(settings)
        self.used_ah = 0.0          # rated-capacity Ah used since full (Peukert and efficiency applied)
        self.consumed_ah = 0.0      # Ah taken out since full (efficiency applied, no Peukert)
        self.cycle_depth_ah = 0.0   # deepest consumed_ah since the last synchronisation
        self._sync_since: float | None = None
        self._sync_latched = False
        self._avg: deque[tuple[float, float]] = deque()
        self._last_mono: float | None = None
        self._last_ns: int | None = None
        self._pending_ah = 0.0      # flow seen while a meter was stale, counted once all are fresh again
        self._pending_wh = 0.0
        self.disabled: set[str] = set()  # its meters with enabled = false: never read, so no SoC is shown
        self.changed = False        # something worth saving happened (cleared by to_state)
        self.events: list[str] = []  # one-line log events since the last drain (synchronised, lost)

    # --------------------------------------------------------------------------------- feeding
    def update(self, sensor: str, time_ns: int, mono_s: float, values: Mapping[str, Any],
               energy_reset: bool = False) -> None:
        """Feed one meter's decoded reading (voltage_v, current_a, power_w, energy_wh; a Reading's fields do).
        Readings of meters that are not this battery's are ignored. ``energy_reset`` (argument or field): the
        poller saw the counter go down."""
        m = self._meters.get(sensor)
        if m is None:
            return
        try:
            v = float(values["voltage_v"])
            i = float(values["current_a"])
            p = float(values.get("power_w", v * i))
            e = float(values["energy_wh"])
        except (KeyError, TypeError, ValueError):
            return
        if not all(math.isfinite(x) for x in (v, i, p, e)) or i < 0 or e < 0:
            return
        s = self.settings
        if m.last_mono is not None:
            dt: float | None = mono_s - m.last_mono
        elif m.last_ns is not None:
            dt = (time_ns - m.last_ns) / 1e9
        else:
            dt = None
        if dt is not None and dt < 0:
            dt = None  # the clock went back: trust the counter alone
        integrable = dt is not None and dt <= s.max_gap_s

        # ---- energy in this interval: sampled power, clamped into what the counter allows
        reset = (energy_reset or values.get("energy_reset") is True
                 or (m.counter_wh is not None and e < m.counter_wh))
        sampled = (m.power_w + p) / 2 * dt / 3600.0 if integrable and dt is not None else 0.0
        if m.total_wh is None:
            delta_wh = 0.0
            m.total_wh = float(e)         # the fraction of a Wh already in the meter is not known yet
            m.phase_known = False
        elif reset:
            delta_wh = sampled
            m.total_wh, m.phase_known = float(e), False
            if not integrable and m.sign != 0:
                self._lose(f"the energy counter of {sensor} was reset while it was not read "
                           f"({'unknown' if dt is None else f'{dt:.0f} s'}): what flowed then is unknown")
        elif not m.phase_known:
            # until the counter first steps, the sampled power is all we have; the step tells where the
            # meter's fraction of a Wh is (it just passed a whole Wh), and from then on the clamp holds
            if m.counter_wh is not None and e > m.counter_wh:
                delta_wh = sampled if integrable else e - m.counter_wh  # after a long gap: the steps
                m.total_wh, m.phase_known = float(e), True
            else:  # a counter that does not step caps what the sampled power may add at 1 Wh
                new = min(m.total_wh + sampled, e + 0.999999)
                delta_wh, m.total_wh = new - m.total_wh, new
        else:
            new = min(max(m.total_wh + sampled, e), e + 0.999999)
            delta_wh = new - m.total_wh
            m.total_wh = new
        m.counter_wh = e
        v_mean = (m.voltage_v + v) / 2 if m.voltage_v and m.voltage_v > 0.5 else v
        delta_ah = delta_wh / v_mean if v_mean > 0.5 else (i * dt / 3600.0 if integrable and dt is not None else 0.0)
        m.last_ns, m.last_mono, m.voltage_v, m.current_a, m.power_w = time_ns, mono_s, v, i, p
        self._last_mono, self._last_ns = mono_s, time_ns

        net = self._net_current(mono_s)
        if m.sign == 0:
            self.h.through_ah += delta_ah
            self.h.through_wh += delta_wh
        elif net is None or self._pending_ah:
            # a meter is stale (or was, just after a restart): keep the flow until every meter has been read
            # again, then count the whole gap in the direction of its own net flow (its counters bridged it)
            self._pending_ah += m.sign * delta_ah
            self._pending_wh += m.sign * delta_wh
            if net is not None:
                ah, wh, self._pending_ah, self._pending_wh = self._pending_ah, self._pending_wh, 0.0, 0.0
                if ah:
                    self._count(ah, wh, math.copysign(max(abs(net), s.current_threshold_a), ah))
        elif abs(net) >= s.current_threshold_a and delta_ah > 0:
            self._count(m.sign * delta_ah, m.sign * delta_wh, net)
        if sensor == self._voltage_sensor(mono_s):
            if v > 0.5:
                self.h.min_v = v if self.h.min_v is None else min(self.h.min_v, v)
                self.h.max_v = v if self.h.max_v is None else max(self.h.max_v, v)
            self._check_sync(v, net, time_ns, mono_s)
        if net is not None:
            self._avg.append((mono_s, net))
        window = s.ttg_window_min * 60.0
        while self._avg and self._avg[0][0] < mono_s - window:
            self._avg.popleft()

    def _count(self, ah: float, wh: float, net: float) -> None:
        """Count a signed flow (+ into the battery) while the net current is ``net``."""
        s = self.settings
        self._total(ah, wh, net > 0)
        if net > 0:
            stored = ah * s.charge_efficiency_pct / 100.0
            self.used_ah -= stored
            self.consumed_ah -= stored
        else:
            self.used_ah -= ah * peukert_factor(s, -net)
            self.consumed_ah -= ah
        self.used_ah = min(max(self.used_ah, 0.0), s.capacity_ah)
        self.consumed_ah = max(self.consumed_ah, 0.0)
        if self.soc_known:
            self.cycle_depth_ah = max(self.cycle_depth_ah, self.consumed_ah)
            self.h.deepest_ah = max(self.h.deepest_ah, self.consumed_ah)

    def _total(self, ah: float, wh: float, charging: bool) -> None:
        """Add a signed flow to the history totals, which only ever grow. Meters are read one after the
        other, so while charging a load meter's step arrives before the chargers' step that outweighs it:
        counted as it came, "charged" would step back for a moment (and a per-day increase read high).
        Such a flow against the direction waits in a carry, netted with the next flow in the direction;
        when the direction changes, what is left of it belongs to the new direction's total. So
        charged − discharged still equals the net flow counted."""
        h = self.h
        if charging != h.carry_charging:
            if charging:   # was discharging: a carry of charge (> 0) is charge
                h.charged_ah += max(h.carry_ah, 0.0)
                h.charged_wh += max(h.carry_wh, 0.0)
            else:          # was charging: a carry of discharge (< 0) is discharge
                h.discharged_ah -= min(h.carry_ah, 0.0)
                h.discharged_wh -= min(h.carry_wh, 0.0)
            h.carry_ah = h.carry_wh = 0.0
            h.carry_charging = charging
        sign = 1.0 if charging else -1.0   # + : flow in the present direction
        t_ah, t_wh = sign * (ah + h.carry_ah), sign * (wh + h.carry_wh)
        if charging:
            h.charged_ah += max(t_ah, 0.0)
            h.charged_wh += max(t_wh, 0.0)
        else:
            h.discharged_ah += max(t_ah, 0.0)
            h.discharged_wh += max(t_wh, 0.0)
        h.carry_ah, h.carry_wh = sign * min(t_ah, 0.0), sign * min(t_wh, 0.0)

    def _fresh(self, m: _Meter, mono_s: float) -> bool:
        return m.last_mono is not None and mono_s - m.last_mono <= self.settings.max_gap_s

    def _net_current(self, mono_s: float) -> float | None:
        """Σ charge − Σ discharge from each meter's latest reading; None if one of them is stale."""
        net = 0.0
        for m in self._meters.values():
            if m.sign == 0:
                continue
            if not self._fresh(m, mono_s):
                return None
            net += m.sign * m.current_a
        return net if self.settings.can_count else None

    def _voltage_sensor(self, mono_s: float) -> str:
        want = self.settings.battery_voltage_sensor
        m = self._meters.get(want)
        if m is not None and self._fresh(m, mono_s):
            return want
        for name, other in self._meters.items():  # its meter is stale: the next fresh one stands in
            if self._fresh(other, mono_s):
                return name
        return want

    def _check_sync(self, v: float, net: float | None, time_ns: int, mono_s: float) -> None:
        s = self.settings
        ok = (net is not None and v > s.charged_voltage_v
              and -s.current_threshold_a < net < s.tail_current_a)
        if not ok:
            self._sync_since = None
            self._sync_latched = False
            return
        if self._sync_since is None:
            self._sync_since = mono_s
        if not self._sync_latched and mono_s - self._sync_since >= s.charged_detection_min * 60.0:
            self._sync_latched = True
            self.synchronise(time_ns)

    def synchronise(self, time_ns: int, how: str = "") -> None:
        """Set the state of charge to 100 % (the charged conditions held; ``how`` " (by hand)": a manual sync)."""
        s = self.settings
        if self.soc_known and self.cycle_depth_ah >= s.capacity_ah * MIN_COUNTED_DEPTH_PCT / 100.0:
            self.h.last_depth_ah = self.cycle_depth_ah
            self.h.depth_sum_ah += self.cycle_depth_ah
            self.h.depth_count += 1
        was = "" if self.soc_known else f" (was unknown: {self.unknown_reason})"
        self.soc_known = True
        self.unknown_reason = ""
        self.used_ah = self.consumed_ah = self.cycle_depth_ah = 0.0
        self.h.syncs += 1
        self.h.last_full_ns = time_ns
        self.changed = True
        self.events.append(f"battery {s.name}: synchronised to 100 %{was}{how}")

    def synchronise_by_hand(self, time_ns: int) -> None:
        """The user says the battery is full now (``dcmon battery sync``, Victron's "Synchronise SoC to
        100 %"): synchronise, and forget the meters' counter baselines, so that what flowed before now (since
        the state was last saved) is not counted against the new 100 %."""
        self.synchronise(time_ns, " (by hand)")
        for m in self._meters.values():
            m.total_wh = m.counter_wh = m.last_ns = m.last_mono = None
            m.phase_known = False
        self._pending_ah = self._pending_wh = 0.0
        self._sync_since, self._sync_latched = None, False
        self._last_ns = time_ns

    def _lose(self, why: str) -> None:
        if self.soc_known:
            self.events.append(f"battery {self.settings.name}: state of charge lost ({why}); unknown until the "
                               f"next full charge")
        self.soc_known = False
        self.unknown_reason = f"state lost: {why}"
        self.used_ah = self.consumed_ah = self.cycle_depth_ah = 0.0
        self.changed = True

    def disabled_reason(self) -> str:
        names = ", ".join(sorted(self.disabled))
        return (f"its meter(s) {names} are disabled (enabled = false in [[sensors]]): not counted until enabled "
                f"again (their energy counters then bridge the gap)")

    def drain_events(self) -> list[str]:
        out, self.events = self.events, []
        return out

    # --------------------------------------------------------------------------------- reading
    def snapshot(self, time_ns: int | None = None, mono_s: float | None = None) -> BatteryState:
        """The state now (``time_ns``/``mono_s`` default to the last reading's)."""
        s = self.settings
        mono = self._last_mono if mono_s is None else mono_s
        now_ns = self._last_ns if time_ns is None else time_ns
        stale = tuple(n for n, m in self._meters.items() if mono is None or not self._fresh(m, mono))
        net = self._net_current(mono) if mono is not None else None
        vm = self._meters.get(self._voltage_sensor(mono)) if mono is not None else None
        volt = vm.voltage_v if vm is not None and mono is not None and self._fresh(vm, mono) else None
        if net is None:
            status: BatteryStatus = "unknown"
        elif net >= s.current_threshold_a:
            status = "charging"
        elif net <= -s.current_threshold_a:
            status = "discharging"
        else:
            status = "idle"
        shown = self.soc_known and not self.disabled
        soc = 100.0 * (1.0 - self.used_ah / s.capacity_ah) if shown else None
        ttg = None
        if soc is not None and net is not None and self._avg:
            avg = sum(x for _, x in self._avg) / len(self._avg) if s.ttg_window_min > 0 else net
            if avg <= -s.current_threshold_a:
                left_ah = (soc - s.discharge_floor_pct) / 100.0 * s.capacity_ah
                ttg = max(0.0, left_ah / (-avg * peukert_factor(s, -avg)) * 3600.0)
        h = self.h
        return BatteryState(
            name=s.name, status=status, soc_pct=soc, time_to_go_s=ttg,
            unknown_reason="" if shown else (self.disabled_reason() if self.disabled else self.unknown_reason),
            voltage_v=volt, current_a=net,
            power_w=(net * volt if net is not None and volt is not None else None),
            consumed_ah=self.consumed_ah if shown else None,
            charged_ah=h.charged_ah if s.can_count else h.through_ah,
            discharged_ah=h.discharged_ah,
            charged_kwh=(h.charged_wh if s.can_count else h.through_wh) / 1000.0,
            discharged_kwh=h.discharged_wh / 1000.0,
            deepest_discharge_ah=h.deepest_ah if h.syncs else None,
            last_discharge_ah=h.last_depth_ah,
            average_discharge_ah=h.depth_sum_ah / h.depth_count if h.depth_count else None,
            full_cycles=h.discharged_ah / s.capacity_ah,
            synchronisations=h.syncs,
            min_voltage_v=h.min_v, max_voltage_v=h.max_v,
            last_full_ns=h.last_full_ns,
            time_since_full_s=((now_ns - h.last_full_ns) / 1e9 if h.last_full_ns is not None and now_ns is not None
                               else None),
            stale_sensors=stale,
        )

    # ---------------------------------------------------------------------------- durable state
    def to_state(self, time_ns: int | None = None) -> dict[str, Any]:
        """The durable part, JSON-able (dcmon.battery_store keeps it), as of ``time_ns`` (default: the last
        reading's time). Clears ``changed``."""
        self.changed = False
        h = self.h
        return {
            "version": STATE_VERSION, "fingerprint": self.settings.fingerprint(),
            "saved_ns": self._last_ns if time_ns is None else time_ns,
            "soc_known": self.soc_known, "unknown_reason": self.unknown_reason,
            "used_ah": self.used_ah, "consumed_ah": self.consumed_ah, "cycle_depth_ah": self.cycle_depth_ah,
            "sync_latched": self._sync_latched,
            "pending_ah": self._pending_ah, "pending_wh": self._pending_wh,
            "history": {k: getattr(h, k) for k in h.__dataclass_fields__},
            "meters": {n: m.to_dict() for n, m in self._meters.items()},
        }

    @classmethod
    def restore(cls, settings: BatterySettings, state: Mapping[str, Any] | None, now_ns: int) -> BatteryMonitor:
        """A monitor from a saved state. The history is always kept; the state of charge only when the
        state is recent (``state_max_age_h``) and was made for the same capacity and meters."""
        mon = cls(settings)
        if not state:
            return mon
        try:
            hist = state.get("history", {})
            for k in mon.h.__dataclass_fields__:
                if k in hist:
                    setattr(mon.h, k, hist[k])
            saved_ns = state.get("saved_ns")
            same = state.get("fingerprint") == settings.fingerprint() and state.get("version") == STATE_VERSION
            age_s = (now_ns - saved_ns) / 1e9 if isinstance(saved_ns, int) else None
            meters = state.get("meters", {})
            if same:
                for n, m in mon._meters.items():
                    d = meters.get(n)
                    if d:
                        m.total_wh, m.counter_wh, m.last_ns = d["total_wh"], d["counter_wh"], d["last_ns"]
                        m.voltage_v, m.power_w = d["voltage_v"], d.get("power_w", 0.0)
                        m.phase_known = bool(d.get("phase_known", False))
            if not state.get("soc_known"):
                mon.unknown_reason = str(state.get("unknown_reason") or mon.unknown_reason)
            elif not same:
                mon._lose("the battery's capacity or meters changed since the state was saved")
            elif age_s is None or age_s < -60 or age_s > settings.state_max_age_h * 3600.0:
                mon._lose(f"the saved state is {'of unknown age' if age_s is None else f'{age_s / 3600:.1f} h old'}"
                          f" (more than state_max_age_h = {settings.state_max_age_h:g})")
            else:
                mon.soc_known = True
                mon.unknown_reason = ""
                mon.used_ah = float(state["used_ah"])
                mon.consumed_ah = float(state["consumed_ah"])
                mon.cycle_depth_ah = float(state.get("cycle_depth_ah", 0.0))
                mon._sync_latched = bool(state.get("sync_latched", False))
                mon._pending_ah = float(state.get("pending_ah", 0.0))
                mon._pending_wh = float(state.get("pending_wh", 0.0))
        except (KeyError, TypeError, ValueError) as e:
            log.warning("battery %s: the saved state is unreadable (%s): starting without it", settings.name, e)
            return cls(settings)
        mon.events.clear()
        mon.changed = False
        return mon


def check_batteries(batteries: list[BatterySettings], sensors: Iterable[str]) -> None:
    """Rules across batteries and sensors (``Config.check``): names unique, every meter named is a sensor.
    Raises Invalid located relative to the config's top (``batteries[n]...``)."""
    known = list(sensors)
    seen: set[str] = set()
    for n, b in enumerate(batteries):
        if b.name in seen:
            raise Invalid(f"battery name {b.name!r} is used twice", "give each battery its own name",
                          loc=("batteries", n, "name"))
        seen.add(b.name)
        for k in ("charge", "discharge", "battery_cable"):
            for i, x in enumerate(getattr(b, k)):
                if x not in known:
                    raise Invalid(f"no sensor named {x!r}",
                                  f"use the names of [[sensors]]: {', '.join(sorted(known)) or 'none configured'}",
                                  loc=("batteries", n, k, i))


def settings_list(tables: Iterable[Mapping[str, Any]], where: str = "config.toml",
                  sensors: Iterable[str] | None = None) -> list[BatterySettings]:
    """All ``[[batteries]]`` tables outside the config loader (which parses them as ``Config.batteries``).
    ``sensors``: the configured sensor names, to check that every meter named exists."""
    out = [BatterySettings.from_dict(t, where, key=f"batteries[{n}]") for n, t in enumerate(tables)]
    try:
        check_batteries(out, sensors if sensors is not None else [s for b in out for s in b.sensors])
    except Invalid as e:
        loc = "".join(f"[{p}]" if isinstance(p, int) else ("." if i else "") + str(p) for i, p in enumerate(e.loc))
        raise ConfigError(where, loc, e.problem, e.fix) from None
    return out


__all__ = ["BatteryMonitor", "BatterySettings", "BatteryState", "PRESETS", "limits", "peukert_factor",
           "check_batteries", "settings_list"]
