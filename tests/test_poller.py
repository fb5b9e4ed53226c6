"""The poller on the simulator (a real pty): decoding, timestamps, schedule, failures, settle, resets, shunt codes."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from dcmon import config
from dcmon.models import PZEM017
from dcmon.calibration import apply_calibration
from dcmon.poller import Poller, bus_loop, is_plausible, next_deadline
from dcmon.simulator import SimMeter, Simulator, meters_for

CFG = """
[poller]
interval_s = {interval}
settle_s = {settle}
apply_shunt_codes = {apply}
host = "testhost"

[buses.a]
port = "{port}"
timeout_s = 0.15
retries = 0
gap_s = 0.005

[[sensors]]
name = "battery"
bus = "a"
address = 1
shunt_a = 200
tags = {{ site = "lab" }}

[[sensors]]
name = "solar"
bus = "a"
address = 2
"""


def make_cfg(tmp_path, port, interval=1.0, settle=0.0, apply="false", extra=""):
    p = tmp_path / "config.toml"
    p.write_text(CFG.format(port=port, interval=interval, settle=settle, apply=apply) + extra)
    return config.load(p, env={})


def test_one_cycle_reads_both_meters_into_lines(tmp_path, sim):
    lines: list[str] = []
    cfg = make_cfg(tmp_path, sim.path)
    p = Poller(cfg, put=lines.extend)
    t0 = time.time_ns()
    readings = p.poll_bus_once("a")
    t1 = time.time_ns()
    p.close()
    assert [r.sensor for r in readings] == ["battery", "solar"]
    for r in readings:
        assert t0 <= r.time_ns <= t1                      # timestamped when taken
        assert r.tags["host"] == "testhost" and r.tags["bus"] == "a" and r.tags["model"] == "pzem017"
        f = r.fields
        assert 12 < f["voltage_v"] < 15 and f["current_a"] > 0
        assert abs(f["power_w"] - f["voltage_v"] * f["current_a"]) < 0.2
        assert f["energy_reset"] is False and f["calibrated"] is False
    assert readings[0].tags["site"] == "lab" and readings[0].tags["address"] == "1"
    assert len(lines) == 2 and lines[0].startswith("dc_power,address=1,bus=a,host=testhost,model=pzem017,sensor=battery,site=lab ")


def test_a_silent_meter_costs_only_its_timeout_and_is_reported_once(tmp_path, sim, caplog):
    sim.meter(1).silent = True
    lines: list[str] = []
    p = Poller(make_cfg(tmp_path, sim.path), put=lines.extend)
    t = time.monotonic()
    for _ in range(3):
        p.poll_bus_once("a")
    elapsed = time.monotonic() - t
    p.close()
    assert elapsed < 3 * (0.15 + 0.1) + 0.5               # timeout × tries per cycle, not more
    assert p.states["battery"].polls_failed == 3 and p.states["solar"].polls_ok == 3
    assert len(lines) == 3 and all("sensor=solar" in ln for ln in lines)
    warnings = [r.getMessage() for r in caplog.records if "battery" in r.getMessage() and r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "no answer" in warnings[0] and "address 1" in warnings[0]


def test_meter_coming_back_is_settled_before_its_readings_count(tmp_path, sim):
    lines: list[str] = []
    p = Poller(make_cfg(tmp_path, sim.path, settle=0.5), put=lines.extend)
    sim.meter(1).silent = True
    p.poll_bus_once("a")
    sim.meter(1).silent = False
    p.poll_bus_once("a")                                  # answers again: settling, discarded
    assert p.states["battery"].discarded == 1
    time.sleep(0.55)
    p.poll_bus_once("a")
    p.close()
    assert sum("sensor=battery" in ln for ln in lines) == 1


def test_garbage_after_power_up_is_discarded_by_the_plausibility_check():
    bad = {"voltage_v": 512.3, "current_a": 3.0, "power_w": 10.0, "energy_wh": 1.0}
    assert "range" in is_plausible(PZEM017, bad)
    assert "V × I" in is_plausible(PZEM017, {"voltage_v": 12.0, "current_a": 10.0, "power_w": 300.0, "energy_wh": 1.0})
    assert is_plausible(PZEM017, {"voltage_v": 13.44, "current_a": 0.1, "power_w": 1.3, "energy_wh": 2.0}) == ""


def test_energy_decrease_is_a_reset_not_negative_use(tmp_path, sim):
    lines: list[str] = []
    sim.meter(1).energy_wh = 5000.0
    p = Poller(make_cfg(tmp_path, sim.path), put=lines.extend)
    first = p.poll_bus_once("a")[0]
    sim.meter(1).energy_wh = 0.0                          # e.g. reset-energy from the bench
    second = p.poll_bus_once("a")[0]
    p.close()
    assert first.fields["energy_wh"] >= 5000 and first.fields["energy_reset"] is False
    assert second.fields["energy_wh"] < 10 and second.fields["energy_reset"] is True


def test_apply_shunt_codes_writes_and_reads_back(tmp_path, sim):
    assert sim.meter(1).holding[3] == 0                   # factory: 100 A
    p = Poller(make_cfg(tmp_path, sim.path, apply="true"), put=lambda lines: None)
    p.poll_bus_once("a")
    p.close()
    assert sim.meter(1).holding[3] == 2                   # 200 A
    assert sim.meter(2).holding[3] == 0                   # no shunt_a configured: left alone


def test_wrong_shunt_code_halves_the_current_like_the_real_meter(tmp_path):
    right, wrong = (SimMeter(PZEM017, a, true_shunt_a=200, seed=7) for a in (1, 2))
    right.holding[3] = 2
    with Simulator([right, wrong]) as s:
        cfg = make_cfg(tmp_path, s.path)
        p = Poller(cfg, put=lambda lines: None)
        a, b = p.poll_bus_once("a")
        p.close()
    assert 0.4 < b.fields["current_a"] / a.fields["current_a"] < 0.6


def test_calibration_is_applied_and_recorded(tmp_path, sim):
    extra = "\n[sensors.calibration]\nvoltage_gain = 1.01\ncurrent_gain = 0.98\ncurrent_offset = 0.05\n"
    cfg = make_cfg(tmp_path, sim.path, extra=extra)
    solar = cfg.sensors[1]
    raw = {"voltage_v": 12.0, "current_a": 10.0, "power_w": 120.0, "energy_wh": 7.0}
    cal = apply_calibration(raw, solar.calibration)
    assert cal["voltage_v"] == pytest.approx(12.12) and cal["current_a"] == pytest.approx(9.85)
    assert cal["power_w"] == pytest.approx(12.12 * 9.85, abs=0.01) and cal["energy_wh"] == 7.0
    p = Poller(cfg, put=lambda lines: None)
    readings = p.poll_bus_once("a")
    p.close()
    assert readings[1].fields["calibrated"] is True and readings[0].fields["calibrated"] is False


def test_schedule_uses_monotonic_deadlines_without_drift():
    assert next_deadline(100.0, 5.0, 100.1) == 105.0
    assert next_deadline(100.0, 5.0, 112.0) == 115.0      # an overrun skips missed slots
    assert next_deadline(100.0, 0.0, 123.0) == 123.0


def test_bus_loop_keeps_the_cadence(tmp_path, sim):
    times: list[float] = []
    cfg = make_cfg(tmp_path, sim.path, interval=0.2)
    p = Poller(cfg, put=lambda lines: times.append(time.monotonic()))
    stop = threading.Event()
    th = threading.Thread(target=bus_loop, args=(p, "a", stop))
    th.start()
    time.sleep(1.05)
    stop.set()
    th.join(5)
    p.close()
    assert 5 <= len(times) <= 7
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert all(0.15 < g < 0.25 for g in gaps), gaps
    drift = (times[-1] - times[0]) - 0.2 * (len(times) - 1)
    assert abs(drift) < 0.03, drift


def test_buses_are_polled_in_parallel(tmp_path):
    """Two buses, each with one meter that never answers: a cycle of both takes one timeout, not two."""
    sims = [Simulator(meters_for([("pzem017", 1)])).start() for _ in range(2)]
    try:
        for s in sims:
            s.meters[0].silent = True
        p = tmp_path / "c.toml"
        p.write_text("\n".join(f'[buses.b{i}]\nport = "{s.path}"\ntimeout_s = 0.4\nretries = 0\n'
                               f'[[sensors]]\nname = "m{i}"\nbus = "b{i}"\naddress = 1\n' for i, s in enumerate(sims)))
        cfg = config.load(p, env={})
        poller = Poller(cfg, put=lambda lines: None)
        t = time.monotonic()
        ths = [threading.Thread(target=poller.poll_bus_once, args=(b,)) for b in poller.buses]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        assert time.monotonic() - t < 0.75
        assert poller.cycles == 2          # counted under the lock by both bus threads
        poller.close()
    finally:
        for s in sims:
            s.stop()


def test_health_lines_describe_each_sensor_and_the_poller(tmp_path, sim):
    p = Poller(make_cfg(tmp_path, sim.path), put=lambda lines: None)
    sim.meter(2).silent = True
    p.poll_bus_once("a")
    p.close()
    lines = p.health_lines()
    assert any("sensor=battery" in ln and "polls_ok=1i" in ln and "up=true" in ln for ln in lines)
    assert any("sensor=solar" in ln and "polls_failed=1i" in ln and "up=false" in ln for ln in lines)
    assert any("sensor=_poller" in ln for ln in lines)


def test_adapter_unplugged_and_plugged_back(tmp_path, caplog):
    """The pty disappears (USB adapter pulled) and comes back under the same name: one line for each change,
    polling resumes by itself, and the meter is given its settle time again."""
    caplog.set_level(logging.INFO)
    link = str(tmp_path / "ttyRS485")
    sim = Simulator(meters_for([("pzem017", 1)]), link=link).start()
    p = tmp_path / "c.toml"
    p.write_text(f'[poller]\nsettle_s = 0.3\n[buses.a]\nport = "{link}"\ntimeout_s = 0.2\nretries = 0\n'
                 '[[sensors]]\nname = "m"\nbus = "a"\naddress = 1\n')
    poller = Poller(config.load(p, env={}), put=lambda lines: None)
    try:
        assert len(poller.poll_bus_once("a")) == 1
        sim.stop()
        for _ in range(3):
            assert poller.poll_bus_once("a") == []
        sim = Simulator(meters_for([("pzem017", 1)]), link=link).start()
        assert poller.poll_bus_once("a") == []            # answers again: settling
        time.sleep(0.35)
        assert len(poller.poll_bus_once("a")) == 1
    finally:
        poller.close()
        sim.stop()
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("not found" in m for m in msgs) == 1 and sum("is open again" in m for m in msgs) == 1
    assert poller.states["m"].polls_failed == 3
