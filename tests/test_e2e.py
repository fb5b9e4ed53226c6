"""End to end with real parts: simulator on a pty → poller → spool → real InfluxDB (v1) / VictoriaMetrics (v2 API),
and the bad inputs a user meets: missing port, no permission, InfluxDB unreachable, wrong credentials, silent meter."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dcmon import config
from dcmon.service import run
from dcmon.simulator import Simulator, meters_for

ROOT = Path(__file__).resolve().parent.parent

TEMPLATE = """
[poller]
interval_s = 0.2
settle_s = 0
host = "e2e"
health_interval_s = 0

[spool]
path = "{spool}"

[influxdb]
url = "{url}"
api = {api}
database = "{db}"
org = "o"
bucket = "{db}"
token = "{token}"
timeout_s = 2

[buses.rs485]
port = "{port}"
timeout_s = 0.2
retries = 0

[[sensors]]
name = "battery"
bus = "rs485"
address = 1
shunt_a = 100

[[sensors]]
name = "solar"
bus = "rs485"
address = 2
tags = {{ site = "roof" }}
"""


def write_cfg(tmp_path: Path, *, url: str, port: str = "/dev/null", api: int = 1, db: str = "dcmon",
              token: str = "", extra: str = "") -> Path:
    p = tmp_path / "config.toml"
    p.write_text(TEMPLATE.format(spool=tmp_path / "spool.sqlite", url=url, api=api, db=db, token=token, port=port) + extra)
    return p


def spool_depth(tmp_path: Path) -> int:
    """Lines still queued, read from the file itself (the spool's own table ``queue``)."""
    with sqlite3.connect(tmp_path / "spool.sqlite") as c:
        return c.execute("SELECT count(*) FROM queue").fetchone()[0]


def test_once_simulator_to_real_influxdb_v1(tmp_path, influxd, fresh_db, sim, capsys):
    cfg = config.load(write_cfg(tmp_path, url=influxd.url, port=sim.path, db=fresh_db), env={})
    assert run(cfg, once=True) == 0
    out = capsys.readouterr().out
    assert "battery" in out and "solar" in out and " V " in out
    rows = influxd.query('SELECT voltage_v, current_a, power_w, energy_wh, low_voltage_alarm, energy_reset, '
                         'sensor, site, address, bus, host, model FROM dc_power', fresh_db)
    got = {d["sensor"]: d for d in (dict(zip(rows[0]["columns"], r)) for r in rows[0]["values"])}
    assert set(got) == {"battery", "solar"}
    b = got["battery"]
    assert 12 < b["voltage_v"] < 15 and b["current_a"] > 0 and abs(b["power_w"] - b["voltage_v"] * b["current_a"]) < 0.2
    assert b["low_voltage_alarm"] is False and b["energy_reset"] is False
    assert (b["address"], b["bus"], b["host"], b["model"]) == ("1", "rs485", "e2e", "pzem017")
    assert got["solar"]["site"] == "roof"
    assert abs(b["time"] - time.time_ns()) < 30e9
    assert spool_depth(tmp_path) == 0                          # acknowledged lines leave the spool


def test_once_v2_write_api_into_victoriametrics(tmp_path, victoria, sim):
    cfg = config.load(write_cfg(tmp_path, url=victoria.url, port=sim.path, api=2, db="b2", token="secret-token"), env={})
    assert run(cfg, once=True) == 0
    series = victoria.export('{__name__="dc_power_voltage_v",host="e2e"}', series=2)
    assert {s["metric"]["sensor"] for s in series} == {"battery", "solar"}
    assert all(12 < s["values"][-1] < 15 for s in series)


def test_influxdb_unreachable_keeps_readings_in_the_spool(tmp_path, sim, caplog):
    dead = "http://127.0.0.1:9"                                # discard port: nothing listens
    cfg = config.load(write_cfg(tmp_path, url=dead, port=sim.path), env={})
    assert run(cfg, once=True) == 0                            # polling worked; sending did not
    assert spool_depth(tmp_path) == 2
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "connection refused" in text and "spool" in text


def test_readings_spooled_while_down_arrive_later(tmp_path, influxd, fresh_db, sim):
    p = write_cfg(tmp_path, url="http://127.0.0.1:9", port=sim.path, db=fresh_db)
    assert run(config.load(p, env={}), once=True) == 0
    assert spool_depth(tmp_path) == 2
    p.write_text(p.read_text().replace("http://127.0.0.1:9", influxd.url))
    assert run(config.load(p, env={}), once=True) == 0
    assert influxd.count("dc_power", db=fresh_db) == 4 and spool_depth(tmp_path) == 0


def test_wrong_database_is_reported_and_data_kept(tmp_path, influxd, sim, caplog):
    cfg = config.load(write_cfg(tmp_path, url=influxd.url, port=sim.path, db="does_not_exist"), env={})
    run(cfg, once=True)
    assert spool_depth(tmp_path) == 2
    assert any("does_not_exist" in r.getMessage() and "not found" in r.getMessage() for r in caplog.records)


def test_wrong_credentials_are_reported_without_the_secret(tmp_path, sim, caplog):
    """influxd with auth enabled: a wrong password gives 401, a clear line, no secret in the logs."""
    from servers import Influxd
    import httpx

    srv = Influxd(tmp_path / "authdb")
    srv.conf.write_text(srv.conf.read_text().replace("[http]\n  enabled = true", "[http]\n  enabled = true\n  auth-enabled = true"))
    srv.start()
    try:
        httpx.post(f"{srv.url}/query", params={"q": "CREATE USER admin WITH PASSWORD 'right-pass' WITH ALL PRIVILEGES"}).raise_for_status()
        extra = ""
        p = write_cfg(tmp_path, url=srv.url, port=sim.path, extra=extra)
        p.write_text(p.read_text().replace('database = "dcmon"', 'database = "dcmon"\nusername = "admin"\npassword = "wrong-pass-123"'))
        run(config.load(p, env={}), once=True)
        assert spool_depth(tmp_path) == 2
        msgs = " ".join(r.getMessage() for r in caplog.records)
        assert "401" in msgs and "username/password" in msgs
        assert "wrong-pass-123" not in msgs
    finally:
        srv.stop()


def _dcmon(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dcmon.cli", *args], capture_output=True, text=True, timeout=60, **kw)


def test_missing_serial_port_once_is_one_clear_line(tmp_path):
    p = write_cfg(tmp_path, url="http://127.0.0.1:9", port="/dev/serial/by-id/usb-nothing-here")
    r = _dcmon(["run", "--once", "--config", str(p)])
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert "/dev/serial/by-id/usb-nothing-here not found" in r.stderr and "--simulate" in r.stderr


def test_port_without_permission_says_dialout(tmp_path, sim):
    """Root ignores file permissions, so the poller runs without CAP_DAC_OVERRIDE (setpriv) against a pty owned
    by another user with mode 0600, like /dev/ttyUSB0 (root:dialout 0660) for a user outside dialout."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv (util-linux) to drop the permission override")  # CI runs as root
    os.chown(sim.path, 65534, 65534)
    os.chmod(sim.path, 0o600)
    p = write_cfg(tmp_path, url="http://127.0.0.1:9", port=sim.path)
    r = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-m", "dcmon.cli",
                        "run", "--once", "--config", str(p)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    assert "no permission" in r.stderr and "dialout" in r.stderr and "Traceback" not in r.stderr


def test_meter_that_never_answers_names_meter_and_causes(tmp_path):
    with Simulator(meters_for([("pzem017", 1)])) as s:
        s.meters[0].silent = True
        p = write_cfg(tmp_path, url="http://127.0.0.1:9", port=s.path)
        r = _dcmon(["run", "--once", "--config", str(p)])
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if "battery" in ln]
    assert len(lines) == 1, r.stderr
    assert "address 1" in lines[0] and "no answer" in lines[0] and "A/B" in lines[0]


def test_quick_start_command_runs_on_the_simulator_and_stops_cleanly(tmp_path):
    """The README's first command, with a config whose InfluxDB is absent: readings printed and spooled,
    SIGINT stops it with exit 0."""
    p = write_cfg(tmp_path, url="http://127.0.0.1:9")
    proc = subprocess.Popen(["python3", str(ROOT / "scripts" / "poll_to_influx.py"), "--simulate", "--config", str(p)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.count("battery") >= 3 and "Traceback" not in err
    assert sum("connection refused" in ln for ln in err.splitlines()) == 1, err   # said once, not per reading
    assert spool_depth(tmp_path) >= 6


@pytest.mark.parametrize("model", ["pzem003", "pzem004t", "pzem014", "pzem016"])
def test_every_model_end_to_end_into_influxdb(tmp_path, influxd, fresh_db, model):
    """Each model's simulator, its own framing (AC 8N1, DC 8N2), decoded and written to its measurement."""
    with Simulator(meters_for([(model, 7)])) as s:
        p = tmp_path / "config.toml"
        p.write_text(f'[poller]\nsettle_s = 0\nhealth_interval_s = 0\n[spool]\npath = "{tmp_path}/spool.sqlite"\n'
                     f'[influxdb]\nurl = "{influxd.url}"\ndatabase = "{fresh_db}"\n'
                     f'[buses.b]\nport = "{s.path}"\ntimeout_s = 0.3\n'
                     f'[[sensors]]\nname = "m"\nbus = "b"\naddress = 7\nmodel = "{model}"\n')
        cfg = config.load(p, env={})
        assert cfg.stopbits("b") == (1 if model != "pzem003" else 2)
        assert run(cfg, once=True) == 0
    ac = model != "pzem003"
    rows = influxd.query(f'SELECT * FROM {"ac_power" if ac else "dc_power"}', fresh_db)
    got = dict(zip(rows[0]["columns"], rows[0]["values"][0]))
    assert got["model"] == model and got["address"] == "7"
    if ac:
        assert 220 < got["voltage_v"] < 240 and got["frequency_hz"] == 50.0 and got["power_factor"] == 1.0
        assert abs(got["power_w"] - got["voltage_v"] * got["current_a"]) < 0.5 and got["power_alarm"] is False
    else:
        assert 12 < got["voltage_v"] < 15 and got["current_a"] <= 10.0


def test_running_poller_writes_health_and_publishes_status(tmp_path, influxd, fresh_db, sim, monkeypatch, capsys):
    """The main job in its long-running mode (in a thread, stopped by its event, as SIGTERM would): readings and
    its own health reach InfluxDB, and `dcmon status` shows each sensor and the spool."""
    import threading

    from dcmon.cli import main

    status = tmp_path / "status.json"
    monkeypatch.setenv("DCMON_STATUS_PATH", str(status))
    p = write_cfg(tmp_path, url=influxd.url, port=sim.path, db=fresh_db)
    p.write_text(p.read_text().replace("health_interval_s = 0", "health_interval_s = 1"))
    sim.meter(2).silent = True
    stop = threading.Event()
    th = threading.Thread(target=run, args=(config.load(p, env={}),), kwargs={"stop": stop})
    th.start()
    deadline = time.monotonic() + 20
    while not (status.exists() and influxd.count("dcmon_health", "polls_ok", db=fresh_db) >= 2) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert main(["status", "--config", str(p)]) == 1      # WARNING: a sensor (solar) is down
    out = capsys.readouterr().out
    stop.set()
    th.join(30)
    assert not th.is_alive()
    assert "battery" in out and " up " in out and "solar" in out and "DOWN" in out and "no answer" in out
    assert "spool:" in out
    health = influxd.query('SELECT last(polls_ok), last(polls_failed), last(up) FROM dcmon_health GROUP BY sensor', fresh_db)
    by_sensor = {s["tags"]["sensor"]: s["values"][0][1:] for s in health}
    assert by_sensor["battery"][0] >= 1 and by_sensor["battery"][2] is True
    assert by_sensor["solar"][1] >= 1 and by_sensor["solar"][2] is False
    poller_row = influxd.query('SELECT last(spool_depth), last(sent_points) FROM dcmon_health WHERE sensor = \'_poller\'', fresh_db)
    assert poller_row and poller_row[0]["values"][0][2] >= 1
    assert influxd.count("dc_power", db=fresh_db) >= 3
