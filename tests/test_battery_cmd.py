"""`dcmon battery sync NAME`: the battery is full now (Victron's "Synchronise SoC to 100 %"), on the real state
file (dcmon.battery_store), with the real service (`dcmon run --simulate`) for the refusal while it runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from battery_rig import config_text
from dcmon import config
from dcmon.battery import BatteryMonitor
from dcmon.battery_service import BatteryService
from dcmon.battery_store import BatteryStore, store_path
from dcmon.cli import main

T_NS = 1_800_000_000 * 10**9


def write(tmp, extra: str = ""):
    path = tmp / "config.toml"
    path.write_text(config_text(port=str(tmp / "ttyNONE"), spool=tmp / "spool.sqlite", influxdb="enabled = false",
                                extra=extra))
    return path


def env(tmp) -> dict[str, str]:
    return {**os.environ, "DCMON_STATUS_PATH": str(tmp / "status.json"), "PYTHONUNBUFFERED": "1"}


def test_sync_sets_100_percent_keeps_the_history_and_does_not_count_what_flowed_before(tmp_path, monkeypatch,
                                                                                     capsys):
    """A saved state: unknown (never synchronised), 3 Ah discharged in its history, the load meter's counter
    at 100 Wh. Sync: known, 100 %, the history kept. The load meter then reads 150 Wh: those 50 Wh flowed
    before the sync (since the save), so they are not taken off the new 100 %."""
    monkeypatch.setenv("DCMON_STATUS_PATH", str(tmp_path / "status.json"))
    path = write(tmp_path)
    cfg = config.load(path, env={})
    (bat,) = cfg.batteries
    mon = BatteryMonitor(bat)
    for k in range(1, 4):
        for name, amps, wh in (("charger", 0.0, 0), ("loads", 1.0, 100)):
            mon.update(name, T_NS + k * 5 * 10**9, 5.0 * k, {"voltage_v": 12.5, "current_a": amps,
                                                             "power_w": 12.5 * amps, "energy_wh": wh})
    mon.h.discharged_ah = 3.0
    with BatteryStore.open(store_path(cfg)) as store:
        store.save({"house": mon.to_state()})
    assert main(["battery", "sync", "--config", str(path)]) == 0
    err = capsys.readouterr().err
    assert "battery house: synchronised to 100 % by hand (was unknown); history kept (1 synchronisation(s))" in err
    svc = BatteryService.from_config(cfg)
    assert svc is not None
    try:
        st = svc.status()["house"]
        assert st["soc_pct"] == 100.0 and st["discharged_ah"] == 3.0 and st["synchronisations"] == 1
        m = svc.monitors["house"]
        now = time.time_ns()
        for k, wh in enumerate((150, 150, 151)):   # 150: what the meter counted before the sync; then 1 Wh
            for name, amps, e in (("charger", 0.0, 0), ("loads", 1.0, wh)):
                m.update(name, now + k * 5 * 10**9, 1000.0 + 5 * k, {"voltage_v": 12.5, "current_a": amps,
                                                                     "power_w": 12.5 * amps, "energy_wh": e})
        snap = m.snapshot()
        assert snap.consumed_ah is not None and snap.consumed_ah < 0.1, snap.consumed_ah   # not 50 Wh / 12.5 V = 4 Ah
        assert snap.soc_pct is not None and snap.soc_pct > 98
    finally:
        svc.close()


def test_sync_refuses_while_the_service_runs_and_for_a_battery_that_cannot_count(tmp_path):
    path = write(tmp_path, extra='[[sensors]]\nname = "shunt"\nbus = "a"\naddress = 3\n'
                                 '[[batteries]]\nname = "van"\ncapacity_ah = 100\nbattery_cable = ["shunt"]\n')
    r = subprocess.run([sys.executable, "-m", "dcmon.cli", "battery", "sync", "van", "--config", str(path)],
                       capture_output=True, text=True, timeout=60, env=env(tmp_path))
    assert r.returncode == 1 and "cannot be estimated with these meters" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "dcmon.cli", "battery", "sync", "--config", str(path)],
                       capture_output=True, text=True, timeout=60, env=env(tmp_path))
    assert r.returncode == 2 and "which battery? give its name: dcmon battery sync NAME" in r.stderr, r.stderr
    svc = subprocess.Popen([sys.executable, "-m", "dcmon.cli", "run", "--simulate", "--no-print", "--config",
                            str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env(tmp_path))
    try:
        deadline = time.monotonic() + 30
        while True:
            assert time.monotonic() < deadline and svc.poll() is None, "the service wrote no status"
            try:
                if json.loads((tmp_path / "status.json").read_text()).get("state") == "running":
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        r = subprocess.run([sys.executable, "-m", "dcmon.cli", "battery", "sync", "house", "--config", str(path)],
                           capture_output=True, text=True, timeout=60, env=env(tmp_path))
    finally:
        svc.send_signal(signal.SIGTERM)
        svc.communicate(timeout=30)
    assert r.returncode == 1, r.stderr
    assert r.stderr.count("\n") == 1 and "the service is running (pid" in r.stderr and "systemctl stop dcmon" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: chown to the folder's owner")
def test_run_as_root_the_state_file_stays_the_service_users(tmp_path, monkeypatch):
    """`sudo dcmon battery sync house` on an installed layout: the folder belongs to the service's user
    (dcmon; here nobody), and so must the state file, new or not, or the service could not write it."""
    monkeypatch.setenv("DCMON_STATUS_PATH", str(tmp_path / "status.json"))
    var = tmp_path / "var"
    var.mkdir()
    os.chown(var, 65534, 65534)
    path = tmp_path / "config.toml"
    path.write_text(config_text(port="/dev/null", spool=var / "spool.sqlite", influxdb="enabled = false"))
    assert main(["battery", "sync", "house", "--config", str(path)]) == 0
    files = sorted(p.name for p in var.iterdir())
    assert files == ["battery.sqlite"], files
    st = (var / "battery.sqlite").stat()
    assert (st.st_uid, st.st_gid) == (65534, 65534)
