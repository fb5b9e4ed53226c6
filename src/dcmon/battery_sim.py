"""A battery model for the simulator and the tests: known capacity, Peukert exponent and charge efficiency,
a charger (constant current, then constant voltage, so the current tails off as it fills) and a load, and
two PZEM-017 meters: one on the charger's cable, one on the load's.

The model's state of charge is the remaining capacity at the rated (20 h) rate, the definition the
estimator uses, so the two can be compared directly:
- charging: every Ah into the battery stores ``efficiency`` Ah (the rest is lost as heat and gas; at 100 %
  nothing more is stored, the tail current is all lost);
- discharging at I: every Ah out uses (I / I_rated)^(peukert − 1) Ah of rated capacity.
Voltage = open-circuit voltage(SoC) + net current × internal resistance; the open-circuit voltage rises
steeply in the last per cent, where a real battery's charge acceptance ends.

Time can run at any speed: ``advance(dt)`` for simulated time in tests, or ``drive(meter_kind, clock)``
for a ``dcmon.simulator.Drive`` that follows a (sped-up) clock on the pty.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from .models import MODELS, decode, encode
from .simulator import Drive

# open-circuit voltage of a 12 V battery by state of charge (0..1), before the top knee
_OCV = {
    "lead-acid": ((0.0, 11.6), (0.2, 11.9), (0.5, 12.2), (0.8, 12.5), (1.0, 12.75)),
    "lifepo4": ((0.0, 10.0), (0.1, 12.8), (0.3, 13.1), (0.7, 13.25), (0.9, 13.35), (1.0, 13.4)),
}
# how far above that the voltage climbs in the last per cent (acceptance ends): reaches the charger's CV
_KNEE = {"lead-acid": 1.62, "lifepo4": 0.78}


@dataclass
class BatteryModel:
    capacity_ah: float = 100.0
    nominal_v: float = 12.0
    chemistry: str = "lead-acid"
    peukert: float = 1.25
    efficiency: float = 0.95
    rated_hours: float = 20.0
    soc: float = 0.6                    # true state of charge, 0..1
    resistance_ohm: float = 0.0         # per 12 V (0: 1 Ω·Ah / capacity, 0.01 Ω for 100 Ah)
    charger_max_a: float = 0.0          # 0 = charger off
    absorption_v: float = 0.0           # per 12 V: the charger's constant-voltage stage (0: 14.4 / LiFePO4 14.2)
    load_a: float = 0.0
    t_s: float = 0.0                    # simulated time
    charge_wh: float = 0.0              # true energy through each meter's cable (what the meter integrates)
    load_wh: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if not self.resistance_ohm:
            self.resistance_ohm = 1.0 / self.capacity_ah
        if not self.absorption_v:
            self.absorption_v = 14.2 if self.chemistry == "lifepo4" else 14.4

    @property
    def scale(self) -> float:
        return self.nominal_v / 12.0

    def ocv(self, soc: float | None = None) -> float:
        x = self.soc if soc is None else soc
        pts = _OCV[self.chemistry]
        v = pts[-1][1]
        for (x0, v0), (x1, v1) in zip(pts, pts[1:]):
            if x <= x1:
                v = v0 + (v1 - v0) * (max(x, x0) - x0) / (x1 - x0)
                break
        return (v + _KNEE[self.chemistry] * math.exp((x - 1.0) / 0.01)) * self.scale

    def charger_a(self) -> float:
        """The charger's current: its maximum, or less where the battery's voltage reaches absorption."""
        if self.charger_max_a <= 0:
            return 0.0
        r = self.resistance_ohm * self.scale
        cv = (self.absorption_v * self.scale - self.ocv()) / r + self.load_a
        return max(0.0, min(self.charger_max_a, cv))

    def net_a(self) -> float:
        return self.charger_a() - self.load_a

    def voltage(self) -> float:
        return self.ocv() + self.net_a() * self.resistance_ohm * self.scale

    def peukert_factor(self, current_a: float) -> float:
        return (current_a / (self.capacity_ah / self.rated_hours)) ** (self.peukert - 1.0) if current_a > 0 else 1.0

    def advance(self, dt_s: float, step_s: float = 1.0) -> None:
        """Run the model for dt_s of simulated time (in steps of at most step_s)."""
        with self.lock:
            while dt_s > 1e-12:
                h = min(step_s, dt_s)
                dt_s -= h
                ich, v = self.charger_a(), self.voltage()
                net = ich - self.load_a
                if net > 0:
                    self.soc = min(1.0, self.soc + net * self.efficiency * h / 3600.0 / self.capacity_ah)
                elif net < 0:
                    used = -net * self.peukert_factor(-net) * h / 3600.0
                    self.soc = max(0.0, self.soc - used / self.capacity_ah)
                self.charge_wh += v * ich * h / 3600.0
                self.load_wh += v * self.load_a * h / 3600.0
                self.t_s += h

    def time_to_floor_s(self, floor_pct: float, load_a: float | None = None) -> float:
        """The model's own time to go at a constant net discharge current."""
        i = self.load_a if load_a is None else load_a
        left = (self.soc - floor_pct / 100.0) * self.capacity_ah
        return max(0.0, left / (i * self.peukert_factor(i)) * 3600.0)

    def sample(self, which: str) -> tuple[float, float, float]:
        """(voltage, current, energy) as seen by the ``"charge"`` or ``"load"`` meter."""
        with self.lock:
            v = self.voltage()
            if which == "charge":
                return v, self.charger_a(), self.charge_wh
            return v, self.load_a, self.load_wh

    def drive(self, which: str, clock: Callable[[float], float]) -> Drive:
        """A simulator Drive for one of the two meters; ``clock(monotonic)`` gives simulated seconds."""

        def sample(now: float) -> tuple[float, float, float]:
            t = clock(now)
            if t > self.t_s:
                self.advance(t - self.t_s)
            return self.sample(which)

        return Drive(sample)


# --simulate's demonstration battery: nearly full with the charger on, so that it synchronises a few
# minutes after the start (SoC known), then an hour's cycle of charging and discharging, in real time
DEMO_SOC = 0.995
DEMO_CHARGE_S = 15 * 60      # charger on for this long at the start of every hour ...
DEMO_CYCLE_S = 60 * 60       # ... and off for the rest of it: the load discharges, time to go shows


def demo_drives(capacity_ah: float, nominal_v: float, chemistry: str, charge: list[str], discharge: list[str],
                start: float) -> dict[str, Drive]:
    """``dcmon run --simulate`` with a ``[[batteries]]`` table: a BatteryModel behind the battery's meters
    (the first charge meter carries the charger, 0.1 C; the first discharge meter the load, 0.02 C; any
    other meter of the battery reads 0 A at the battery's voltage), on the monotonic clock from ``start``."""
    model = BatteryModel(capacity_ah=capacity_ah, nominal_v=nominal_v, chemistry=chemistry,
                         peukert=1.05 if chemistry == "lifepo4" else 1.25,
                         efficiency=0.99 if chemistry == "lifepo4" else 0.95, soc=DEMO_SOC,
                         load_a=0.02 * capacity_ah)
    full_a = 0.1 * capacity_ah

    def at(which: str) -> Callable[[float], tuple[float, float, float]]:
        def sample(now: float) -> tuple[float, float, float]:
            t = max(0.0, now - start)
            with model.lock:
                behind = t - model.t_s
            while behind > 1e-9:    # advance in stretches that do not cross a switch of the charger
                with model.lock:
                    phase = model.t_s % DEMO_CYCLE_S
                    model.charger_max_a = full_a if phase < DEMO_CHARGE_S else 0.0
                    edge = (DEMO_CHARGE_S if phase < DEMO_CHARGE_S else DEMO_CYCLE_S) - phase
                step = min(behind, max(edge, 1e-6))
                model.advance(step)
                behind -= step
            v, i, e = model.sample("charge" if which == "charge" else "load")
            return (v, i, e) if which in ("charge", "load") else (v, 0.0, 0.0)
        return sample

    drives: dict[str, Drive] = {}
    for n, name in enumerate(charge):
        drives[name] = Drive(at("charge" if n == 0 else "idle"))
    for n, name in enumerate(discharge):
        drives.setdefault(name, Drive(at("load" if n == 0 else "idle")))
    return drives


def pzem_reading(v: float, i: float, energy_wh: float, model: str = "pzem017") -> dict[str, object]:
    """What the meter would report for these true values, through the real register encoding and
    decoding: 0.01 V, 0.01 A, 0.1 W, whole Wh (the counter truncates)."""
    m = MODELS[model]
    res_v, res_i = 0.01, 0.01
    vq, iq = round(v / res_v) * res_v, round(i / res_i) * res_i
    vals = {"voltage_v": vq, "current_a": iq, "power_w": vq * iq, "energy_wh": math.floor(energy_wh),
            "high_voltage_alarm": False, "low_voltage_alarm": False}
    return dict(decode(m, encode(m, vals)))


__all__ = ["BatteryModel", "demo_drives", "pzem_reading"]
