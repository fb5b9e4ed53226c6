"""What the battery tests share (test_battery_service, test_http_battery, test_mqtt_battery, test_watch_battery):
one battery, "house" (5 Ah), on two simulated PZEM-017s on a pty — a charger's meter at address 1 and a
load's at 2 — driven by dcmon.battery_sim's model; its configuration; the model's clock.

The model usually runs ``SPEED`` times faster than real time, so the BatteryService under test is given the
same sped-up monotonic clock (its charged-detection time and averaging window are in the model's seconds).
"""

from __future__ import annotations

import time

import pytest

from dcmon import poller as poller_mod
from dcmon.battery_sim import BatteryModel
from dcmon.models import PZEM017
from dcmon.simulator import SimMeter

SPEED = 300.0


class ModelClock:
    """The model's seconds: since this clock was made, ``speed`` times faster than the monotonic clock."""

    def __init__(self, speed: float = SPEED) -> None:
        self.t0, self.speed = time.monotonic(), speed

    def __call__(self, now: float) -> float:
        return (now - self.t0) * self.speed

    def now(self) -> float:
        return self(time.monotonic())


clock = ModelClock()   # the default one (a module's tests share it; meters() puts each model on it)


def meters(model: BatteryModel, on: ModelClock = clock) -> list[SimMeter]:
    """The charger's meter (1) and the load's (2), driven by ``model`` on the clock ``on``. The model's time
    starts now: else its first reading would simulate (and wait for) every second since the clock began."""
    model.t_s = on(time.monotonic())
    return [SimMeter(model=PZEM017, address=1, drive=model.drive("charge", on)),
            SimMeter(model=PZEM017, address=2, drive=model.drive("load", on))]


def config_text(*, port: str, spool: object, host: str | None = "testpi", influxdb: str | None = None,
                sensors: str = "", poller: str = "", extra: str = "") -> str:
    """config.toml for the rig: ``influxdb`` the lines of an [influxdb] table (None: no table), ``sensors``
    more [[sensors]] tables, ``poller`` more [poller] keys, ``extra`` more tables at the end."""
    head = f'[poller]\n{f"host = {host!r}" if host else ""}\nsettle_s = 0\n{poller}\n'
    ix = f"[influxdb]\n{influxdb}\n\n" if influxdb is not None else ""
    return (f'{head}\n{ix}[spool]\npath = "{spool}"\n\n'
            f'[buses.a]\nport = "{port}"\ntimeout_s = 0.15\nretries = 0\ngap_s = 0.005\n\n'
            '[[sensors]]\nname = "charger"\nbus = "a"\naddress = 1\n\n'
            '[[sensors]]\nname = "loads"\nbus = "a"\naddress = 2\n\n'
            f'{sensors}\n'
            '[[batteries]]\nname = "house"\ncapacity_ah = 5\ncharge = ["charger"]\ndischarge = ["loads"]\n'
            f'max_gap_s = 120\n\n{extra}')


@pytest.fixture
def no_rise_limit(monkeypatch):
    """The model runs 300× real time: its counters rise faster than the poller's plausibility check allows."""
    monkeypatch.setattr(poller_mod, "max_counter_rise", lambda model, seconds: float("inf"))
