"""BatteryService in the loop the service will run: the real Poller reads two simulated PZEM-017s on a real
pty (a charger's meter and a load's meter, driven by dcmon.battery_sim's battery model on a sped-up clock),
BatteryService turns the readings into ``battery`` points, and the real writer (dcmon.outputs.influx.InfluxSink)
puts them into a real influxd.

The model runs ``SPEED`` times faster than real time, so the service is given the same sped-up monotonic
clock (its charged-detection time and averaging window are in the model's seconds); wall-clock stamps stay
the poller's own.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from dcmon import config
from dcmon.battery_service import BatteryService, status_lines, store_path
from dcmon.battery_sim import BatteryModel
from dcmon.errors import ConfigError
from dcmon.outputs.influx import InfluxSink
from dcmon.poller import Poller
from dcmon.simulator import Simulator

from battery_rig import clock, config_text, meters, no_rise_limit  # noqa: F401 - no_rise_limit: a fixture


class Rig:
    """Model + simulator + Poller + BatteryService (+ a sink); ``cycle()`` is one poll cycle of the service."""

    def __init__(self, tmp: Path, port: str, model: BatteryModel, url: str = "http://127.0.0.1:1", db: str = "x",
                 extra: str = "") -> None:
        self.model = model
        (tmp / "config.toml").write_text(config_text(port=port, spool=tmp / "spool.sqlite",
                                                     influxdb=f'url = "{url}"\ndatabase = "{db}"') + extra)
        self.cfg = config.load(tmp / "config.toml", env={})
        self.reading_lines: list[str] = []          # the poller's own dc_power lines
        self.poller = Poller(self.cfg, put=self.reading_lines.extend)
        self.svc = self.service()
        self.points: list[str] = []

    def service(self) -> BatteryService:
        svc = BatteryService.from_config(self.cfg, mono=lambda: clock(time.monotonic()))
        assert svc is not None
        return svc

    def cycle(self) -> list[str]:
        readings = self.poller.poll_bus_once("a")
        lines = self.svc.on_readings(readings)
        self.points.extend(lines)
        return lines

    def sim_t(self) -> float:
        return clock(time.monotonic())

    def close(self) -> None:
        self.svc.close()
        self.poller.close()


def run_until_synced_then_discharge(rig: Rig, discharge_s: float = 1800.0) -> None:
    """Charge until the service synchronises, then switch the charger off and draw 1 A for ``discharge_s``."""
    model = rig.model
    start = rig.sim_t()
    while rig.svc.status()["house"]["soc_pct"] is None:
        rig.cycle()
        assert rig.sim_t() - start < 3 * 3600, "never synchronised"
    with model.lock:
        model.charger_max_a, model.load_a = 0.0, 1.0
    end = rig.sim_t() + discharge_s
    while rig.sim_t() < end:
        rig.cycle()


def battery_points(influxd, db: str) -> list[dict]:
    series = influxd.query('SELECT * FROM "battery" GROUP BY *', db)
    assert len(series) == 1
    cols, tags = series[0]["columns"], series[0]["tags"]
    return [{**tags, **dict(zip(cols, v))} for v in series[0]["values"]]


# ------------------------------------------------------------------------------------------------ tests

def test_points_in_influxdb_unknown_before_the_first_sync_known_after_and_a_restart_keeps_them(
        tmp_path, influxd, fresh_db, no_rise_limit, caplog):
    caplog.set_level(logging.INFO, logger="dcmon")
    model = BatteryModel(capacity_ah=5, soc=0.97, charger_max_a=1.5, load_a=0.3)
    with Simulator(meters(model)) as sim:
        rig = Rig(tmp_path, sim.path, model, influxd.url, fresh_db)
        sink = InfluxSink(rig.cfg.influxdb)
        try:
            first = rig.cycle()
            assert len(first) == 1, "one point per battery per cycle"
            run_until_synced_then_discharge(rig)
            before = rig.svc.status()["house"]
            sink.write(rig.points)
            n_before = len(rig.points)
            # restart: close (saves), a new service from the same store, a few more cycles
            rig.svc.close()
            assert store_path(rig.cfg) == tmp_path / "battery.sqlite" and store_path(rig.cfg).exists()
            rig.svc = rig.service()
            after = rig.svc.status()["house"]
            rig.points.clear()
            for _ in range(5):
                rig.cycle()
            sink.write(rig.points)
            last = rig.svc.status()["house"]
        finally:
            sink.close()
            rig.close()
    with model.lock:
        true_soc = model.soc * 100
    # the log: what the meters can tell, once at start-up, and the synchronisation as an INFO line
    assert caplog.text.count("battery house: net current = charger - loads") == 2
    assert "battery house: synchronised to 100 %" in caplog.text
    # the restart kept the state of charge and the history
    assert after["soc_pct"] == pytest.approx(before["soc_pct"], abs=1e-6)
    assert after["synchronisations"] == before["synchronisations"] == 1
    assert after["discharged_ah"] == pytest.approx(before["discharged_ah"]) and after["discharged_ah"] > 0.3
    assert after["last_full_ns"] == before["last_full_ns"]
    assert last["soc_pct"] == pytest.approx(true_soc, abs=2.0) and last["status"] == "discharging"
    assert last["time_to_go_s"] == pytest.approx(model.time_to_floor_s(50.0), rel=0.10)
    # what InfluxDB holds
    pts = battery_points(influxd, fresh_db)
    assert len(pts) == n_before + 5
    assert {p["host"] for p in pts} == {"testpi"} and {p["battery"] for p in pts} == {"house"}
    unknown = [p for p in pts if not p["soc_known"]]
    known = [p for p in pts if p["soc_known"]]
    assert unknown and known and max(p["time"] for p in unknown) < min(p["time"] for p in known)
    assert all(p["soc_pct"] is None and p["unknown_reason"] == "not synchronised yet" for p in unknown)
    # InfluxDB's JSON shows a float field holding exactly 100.0 (right after a synchronisation) as 100
    assert all(isinstance(p["soc_pct"], (int, float)) and not isinstance(p["soc_pct"], bool)
               and 0 <= p["soc_pct"] <= 100 for p in known)
    assert pts[-1]["soc_pct"] == pytest.approx(last["soc_pct"], abs=0.5)
    assert pts[-1]["net_current_a"] == pytest.approx(-1.0, abs=0.05)
    assert pts[-1]["synchronisations"] == 1 and pts[-1]["time_to_go_s"] > 0
    for f in ("charged_ah", "discharged_ah", "charged_kwh", "consumed_ah", "voltage_v", "full_cycles"):
        assert isinstance(pts[-1][f], float), f


def test_only_batteries_whose_meters_were_read_get_a_point(tmp_path, no_rise_limit):
    model = BatteryModel(capacity_ah=5, soc=0.5, load_a=0.5)
    with Simulator(meters(model)) as sim:
        rig = Rig(tmp_path, sim.path, model)
        try:
            readings = rig.poller.poll_bus_once("a")
            assert len(readings) == 2
            lines = rig.svc.on_readings(readings)
            assert len(lines) == 1 and lines[0].startswith("battery,battery=house,host=testpi ")
            assert "soc_known=false" in lines[0] and "soc_pct" not in lines[0]
            assert rig.svc.on_readings([]) == []
            sim.meter(2).silent = True
            lines = rig.svc.on_readings(rig.poller.poll_bus_once("a"))        # only the charger answered
            assert len(lines) == 1
        finally:
            rig.close()
    assert rig.svc.on_readings(readings) == []                                # closed: nothing more


def test_a_battery_that_cannot_count_writes_a_short_reason():
    from dcmon.battery import BatteryMonitor, BatterySettings
    from dcmon.battery_service import influx_fields
    mon = BatteryMonitor(BatterySettings.preset("van", 100, battery_cable=["shunt"]))
    mon.update("shunt", 10**18, 1.0, {"voltage_v": 12.5, "current_a": 3.0, "power_w": 37.5, "energy_wh": 10})
    f = influx_fields(mon.snapshot())
    assert f["unknown_reason"] == "one meter on the battery cable (shunt)" and f["soc_known"] is False
    assert "soc_pct" not in f and "net_current_a" not in f and f["voltage_v"] == 12.5


def test_no_batteries_no_service(tmp_path):
    (tmp_path / "config.toml").write_text('[buses.a]\nport = "/dev/null"\n[[sensors]]\nname = "x"\nbus = "a"\naddress = 1\n')
    assert BatteryService.from_config(config.load(tmp_path / "config.toml", env={})) is None


@pytest.mark.parametrize("battery,key,text", [
    ('charge = ["charger"]\ndischarge = ["lodas"]', "batteries[0].discharge[0]", "no sensor named 'lodas'"),
    ('charge = ["charger"]\ndischarge = ["loads"]\npeukert = 2', "batteries[0].peukert", "from 1 to 1.5"),
    ('charge = ["charger"]\ndischarge = ["loads"]\ncapacity = 100', "batteries[0].capacity", "capacity_ah"),
    ('charge = "charger"', "batteries[0].charge", "must be a list"),
])
def test_the_config_rejects_a_bad_battery_before_any_io(tmp_path, battery, key, text):
    (tmp_path / "config.toml").write_text(
        '[buses.a]\nport = "/dev/does-not-exist"\n'
        '[[sensors]]\nname = "charger"\nbus = "a"\naddress = 1\n[[sensors]]\nname = "loads"\nbus = "a"\naddress = 2\n'
        f'[[batteries]]\nname = "house"\ncapacity_ah = 100\n{battery}\n')
    with pytest.raises(ConfigError) as ei:
        config.load(tmp_path / "config.toml", env={})
    assert ei.value.key == key and text in str(ei.value) and ei.value.fix
    assert ei.value.file == str(tmp_path / "config.toml")
    assert not (tmp_path / "battery.sqlite").exists()


def test_the_docs_section_and_two_batteries_sharing_a_meter(tmp_path):
    (tmp_path / "config.toml").write_text(
        '[buses.a]\nport = "/dev/null"\n'
        '[[sensors]]\nname = "solar"\nbus = "a"\naddress = 1\n[[sensors]]\nname = "loads"\nbus = "a"\naddress = 2\n'
        '[[batteries]]\nname = "house"\ncapacity_ah = 200\nchemistry = "LiFePO4"\nnominal_v = 24\n'
        'charge = ["solar"]\ndischarge = ["loads"]\n'
        '[[batteries]]\nname = "house"\ncapacity_ah = 100\nbattery_cable = ["loads"]\n')
    with pytest.raises(ConfigError, match=r"batteries\[1\]\.name: battery name 'house' is used twice"):
        config.load(tmp_path / "config.toml", env={})
    text = (tmp_path / "config.toml").read_text().replace('name = "house"\ncapacity_ah = 100', 'name = "van"\ncapacity_ah = 100')
    (tmp_path / "config.toml").write_text(text)
    cfg = config.load(tmp_path / "config.toml", env={})
    house, van = cfg.batteries
    assert (house.chemistry, house.peukert, house.charge_efficiency_pct, house.discharge_floor_pct,
            house.charged_voltage_v) == ("lifepo4", 1.05, 99.0, 10.0, 28.0)
    assert not van.can_count


def test_status_lines_for_dcmon_status():
    now = 1_800_000_000 * 10**9
    known = {"soc_pct": 87.34, "status": "discharging", "current_a": -4.2, "voltage_v": 12.61,
             "time_to_go_s": 5 * 3600 + 12 * 60, "discharge_floor_pct": 50.0, "consumed_ah": 25.4,
             "last_full_ns": now - 3 * 3600 * 10**9, "synchronisations": 3, "charged_ah": 120.0,
             "discharged_ah": 140.5, "stale_sensors": []}
    unknown = {"soc_pct": None, "unknown_reason": "not synchronised yet", "status": "charging", "current_a": 3.1,
               "voltage_v": 13.9, "time_to_go_s": None, "consumed_ah": None, "last_full_ns": None,
               "synchronisations": 0, "charged_ah": 1.0, "discharged_ah": 0.0, "stale_sensors": []}
    cable = {**unknown, "status": "unknown", "current_a": None,
             "unknown_reason": "battery van: one meter on the battery cable (shunt). A PZEM-017's current has no sign"}
    lines = status_lines({"house": known, "boat": unknown, "van": cable}, now_ns=now)
    assert lines[0] == "battery house: SoC 87.3 %, discharging -4.20 A 12.61 V, time to go 5 h 12 min to 50 %"
    assert lines[1].startswith("  25.4 Ah consumed, last full charge 3 h 00 min ago (")
    assert "3 synchronisation(s)" in lines[1]
    assert lines[2] == "battery boat: SoC unknown (not synchronised yet), charging +3.10 A 13.90 V, time to go -"
    assert "Ah consumed unknown, never fully charged since set-up" in lines[3]
    assert lines[4].startswith("battery van: SoC unknown (one meter on the battery cable (shunt)), unknown 13.90 V")
    assert status_lines({}) == []


def test_a_real_status_record_formats(tmp_path, no_rise_limit):
    model = BatteryModel(capacity_ah=5, soc=0.5, load_a=0.5)
    with Simulator(meters(model)) as sim:
        rig = Rig(tmp_path, sim.path, model)
        try:
            for _ in range(3):
                rig.cycle()
            record = json.loads(json.dumps({"batteries": rig.svc.status()}))   # as status.json carries it
        finally:
            rig.close()
    (head, detail) = status_lines(record["batteries"])
    assert head.startswith("battery house: SoC unknown (not synchronised yet), discharging -0.50 A 1")
    assert detail.startswith("  Ah consumed unknown, never fully charged since set-up, 0 synchronisation(s)")


def test_the_running_service_feeds_the_batteries(tmp_path, capsys):
    """`dcmon run` itself (not a test rig): with [[batteries]] configured, each cycle's spooled lines carry a
    `battery` point, the state is stored beside the spool, and `dcmon status` shows the battery."""
    from dcmon.cli import main
    from dcmon.spool import Spool

    cfg = tmp_path / "config.toml"
    cfg.write_text(f"""
[influxdb]
enabled = false
[spool]
path = "{tmp_path}/spool.sqlite"
[buses.house]
port = "/dev/null"
[[sensors]]
name = "solar"
bus = "house"
address = 1
[[sensors]]
name = "loads"
bus = "house"
address = 2
[[batteries]]
name = "house"
capacity_ah = 100
nominal_v = 12
chemistry = "lead-acid"
charge = ["solar"]
discharge = ["loads"]
""")
    assert main(["run", "--once", "--simulate", "--no-print", "--config", str(cfg)]) == 0
    with Spool.open(tmp_path / "spool.sqlite", max_bytes=2**24, max_age_s=86400) as spool:
        lines = [line for _, line in spool.peek(100)]
    battery = [line for line in lines if line.startswith("battery,")]
    assert len(battery) == 1, lines
    assert "battery=house" in battery[0] and "soc_known=false" in battery[0], battery[0]
    assert (tmp_path / "battery.sqlite").exists()
    capsys.readouterr()


def test_a_disabled_meter_shows_no_soc_and_check_config_lists_the_batteries(tmp_path, capsys):
    """A battery may name a sensor that is switched off (enabled = false, e.g. a meter out for repair): the
    service starts (the other meters are still polled), says once why, and shows the state of charge as
    unknown rather than a number frozen at the time the meter stopped; check-config lists each battery."""
    from dcmon.battery import BatteryMonitor
    from dcmon.cli import main

    path = tmp_path / "config.toml"
    path.write_text(
        f'[influxdb]\nenabled = false\n[spool]\npath = "{tmp_path}/spool.sqlite"\n[buses.a]\nport = "/dev/null"\n'
        '[[sensors]]\nname = "charger"\nbus = "a"\naddress = 1\n'
        '[[sensors]]\nname = "loads"\nbus = "a"\naddress = 2\nenabled = false\n'
        '[[batteries]]\nname = "house"\ncapacity_ah = 100\ncharge = ["charger"]\ndischarge = ["loads"]\n')
    cfg = config.load(path, env={})
    assert "battery house: 100 Ah 12 V lead-acid, charge charger; discharge loads (disabled)" in cfg.describe()
    assert main(["check-config", "--config", str(path)]) == 0
    assert "battery house: 100 Ah 12 V lead-acid" in capsys.readouterr().out
    svc = BatteryService.from_config(cfg)   # (main() above set up dcmon's logging to stderr)
    assert svc is not None
    try:
        assert "WARNING battery house: its meter(s) loads are disabled (enabled = false" in capsys.readouterr().err
        mon: BatteryMonitor = svc.monitors["house"]
        mon.synchronise(10**18)   # a state of charge known before the meter was switched off
        st = mon.snapshot()
        assert st.soc_pct is None and st.consumed_ah is None and "loads are disabled" in st.unknown_reason
        mon.disabled = set()      # enabled again: the kept state shows
        assert mon.snapshot().soc_pct == 100.0
    finally:
        svc.close()


def test_a_slow_poller_does_not_make_every_meter_stale_between_polls(tmp_path, capsys):
    """interval_s = 60 (a common "log once a minute" setting) with the default max_gap_s = 60: each meter's
    previous reading is a little over 60 s old at every poll, so the battery would flap between known and
    stale. The service allows 3 poll intervals and says so once."""
    from dcmon.cli import main

    path = tmp_path / "config.toml"
    path.write_text(config_text(port="/dev/null", spool=tmp_path / "spool.sqlite", influxdb="enabled = false",
                                poller="interval_s = 130"))
    assert main(["check-config", "--config", str(path)]) == 0   # (sets up dcmon's logging to stderr)
    capsys.readouterr()
    svc = BatteryService.from_config(config.load(path, env={}))
    assert svc is not None
    try:
        # (the rig's battery has max_gap_s = 120; the default 60 behaves the same with interval_s = 60)
        assert "max_gap_s 120 s is raised to 390 s (3 poll intervals of 130 s)" in capsys.readouterr().err
        mon = svc.monitors["house"]
        t = 0.0
        for k in range(10):   # polls 130.4 s apart, the two meters 0.1 s apart
            t += 130.4
            for name, amps, dt in (("charger", 2.0, 0.0), ("loads", 0.5, 0.1)):
                mon.update(name, 10**18 + int((t + dt) * 1e9), t + dt,
                           {"voltage_v": 12.8, "current_a": amps, "power_w": 12.8 * amps, "energy_wh": 0})
                if k:   # (both meters read once)
                    assert mon.snapshot().stale_sensors == () and mon.snapshot().current_a == pytest.approx(1.5)
    finally:
        svc.close()


def test_dcmon_status_warns_when_a_battery_is_at_its_floor():
    """Victron's SoC alarm without Grafana: the status verdict is WARNING (exit 1) when a battery's known state of
    charge is at or below its discharge floor; unknown is not low; above the floor is OK."""
    import os as _os

    from dcmon.service_cli import STATUS_OK, STATUS_WARNING, assess

    def rec(soc):
        return {"pid": _os.getpid(), "time": time.time(), "state": "running", "sensors": {}, "buses": {},
                "batteries": {"house": {"soc_pct": soc, "discharge_floor_pct": 50.0}}}
    code, problems = assess(rec(48.2))
    assert code == STATUS_WARNING and problems == [
        "battery 'house' is at 48.2 %, at or below its discharge floor (50 %): charge it"]
    assert assess(rec(50.0))[0] == STATUS_WARNING
    assert assess(rec(50.1)) == (STATUS_OK, [])
    assert assess(rec(None)) == (STATUS_OK, [])
