"""What a user meets after installing, on the simulator (a real pty) and a real spool: the energy counter across
restarts, the shunt-code check at start-up, `run --once` / `run --test` exit codes and output, `status` as a
health check, `simulate` with no options, messages that say one thing once, and values at the meter's resolution.
The installed layout and other users: tests/test_user_paths.py."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dcmon import config
from dcmon.calibration import apply_calibration
from dcmon.cli import main
from dcmon.config import Calibration
from dcmon.models import PZEM017
from dcmon.poller import Poller
from dcmon.service_cli import STATUS_CRITICAL, STATUS_OK, STATUS_WARNING, assess
from dcmon.simulator import SimMeter, Simulator, meters_for

CFG = """
[poller]
interval_s = 1
settle_s = 0
apply_shunt_codes = {apply}
host = "testhost"

[influxdb]
enabled = false

[spool]
path = "{spool}"

[buses.a]
port = "{port}"
timeout_s = 0.1
retries = 0
gap_s = 0.005

[[sensors]]
name = "battery"
bus = "a"
address = 1
shunt_a = 200
"""


def write_cfg(tmp_path: Path, port: str, apply: str = "false", extra: str = "") -> Path:
    p = tmp_path / "config.toml"
    p.write_text(CFG.format(port=port, apply=apply, spool=tmp_path / "spool.sqlite") + extra)
    return p


def spool_lines(tmp_path: Path) -> list[str]:
    with sqlite3.connect(tmp_path / "spool.sqlite") as db:
        return [r[0] for r in db.execute("SELECT line FROM queue ORDER BY id")]


def commissioned(address: int = 1, shunt_a: int = 200, code_a: int | None = None, **kw) -> SimMeter:
    m = SimMeter(model=PZEM017, address=address, true_shunt_a=shunt_a, energy_wh=5000.0, **kw)
    m.holding[0x0003] = PZEM017.shunt_codes[code_a or shunt_a]
    return m


# ----------------------------------------------------------------------------------- energy counter

def test_energy_reset_while_stopped_is_flagged_after_restart(tmp_path, capsys):
    """The documented workflow: stop the poller, `dcmon reset-energy`, start it. The first reading after the
    restart must carry energy_reset=true, as a drop while running does; a restart without a reset must not."""
    with Simulator([commissioned()]) as sim:
        cfg = str(write_cfg(tmp_path, sim.path))
        assert main(["run", "--once", "--no-print", "--config", cfg]) == 0
        assert main(["run", "--once", "--no-print", "--config", cfg]) == 0   # a plain restart
        assert main(["reset-energy", "--port", sim.path, "--address", "1", "--yes"]) == 0
        assert main(["run", "--once", "--no-print", "--config", cfg]) == 0   # after the reset
    lines = spool_lines(tmp_path)
    assert len(lines) == 3
    assert "energy_reset=false" in lines[0] and "energy_reset=false" in lines[1], "a restart is not a reset"
    assert "energy_reset=true" in lines[2] and "energy_wh=0.0" in lines[2], lines[2]


def test_simulated_meters_start_afresh_without_a_false_reset(tmp_path):
    """`run --simulate` twice: each run's simulated meters are new (their counters start where the simulator
    starts them), so nothing is compared with, or stored over, the real meters' counters in the spool."""
    from dcmon.spool import Spool

    cfg = str(write_cfg(tmp_path, "/dev/null"))
    with Spool.open(tmp_path / "spool.sqlite", max_bytes=1 << 20, max_age_s=86400, durability="process") as sp:
        sp.save_counters({"battery": 99_999_999.0})       # what the real meter counted last time
    for _ in range(2):
        assert main(["run", "--once", "--simulate", "--no-print", "--config", cfg]) == 0
    lines = spool_lines(tmp_path)
    assert len(lines) == 2 and all("energy_reset=false" in line for line in lines), lines
    with Spool.open(tmp_path / "spool.sqlite", max_bytes=1 << 20, max_age_s=86400, durability="process") as sp:
        assert sp.load_counters() == {"battery": 99_999_999.0}, "the real meter's counter is kept as it was"


def test_counters_survive_in_the_spool_database(tmp_path):
    from dcmon.spool import Spool

    path = tmp_path / "spool.sqlite"
    with Spool.open(path, max_bytes=1 << 20, max_age_s=86400, durability="process") as sp:
        assert sp.load_counters() == {}
        sp.save_counters({"battery": 1234.0, "solar": 7.0})
        sp.save_counters({"battery": 1240.0})
    with Spool.open(path, max_bytes=1 << 20, max_age_s=86400, durability="process") as sp:
        assert sp.load_counters() == {"battery": 1240.0, "solar": 7.0}
        assert sp.count() == 0, "counters are not readings"


# --------------------------------------------------------------------------------------- shunt code

def test_mismatched_shunt_code_is_warned_once_at_start_up(tmp_path, caplog):
    """A 200 A shunt, the meter on the factory 100 A code, apply_shunt_codes = false: it reads half the
    current. Start-up says so once, with the factor and the command that fixes it; nothing is written."""
    meter = commissioned(shunt_a=200, code_a=100)
    with Simulator([meter]) as sim:
        cfg = config.load(write_cfg(tmp_path, sim.path), env={})
        p = Poller(cfg, put=lambda lines: None)
        with caplog.at_level(logging.INFO, logger="dcmon.poller"):
            for _ in range(3):
                p.poll_bus_once("a")
            warned = [r.getMessage() for r in caplog.records if "shunt" in r.getMessage()]
            assert len(warned) == 1, warned
            assert "0.5 ×" in warned[0] and "dcmon shunt set --sensor battery --amps 200" in warned[0]
            assert "shunt_a = 200" in warned[0] and "apply_shunt_codes" in warned[0]
            assert meter.holding[0x0003] == PZEM017.shunt_codes[100], "checking never writes"

            # the meter goes away, is fixed on the bench, and comes back: checked again, and it says so
            caplog.clear()
            meter.silent = True
            p.poll_bus_once("a")
            meter.holding[0x0003] = PZEM017.shunt_codes[200]
            meter.silent = False
            p.poll_bus_once("a")
            p.poll_bus_once("a")
            msgs = [r.getMessage() for r in caplog.records]
        p.close()
    assert any("now matches shunt_a = 200" in m for m in msgs), msgs
    assert sum("answers again (after 1 failed poll)" in m for m in msgs) == 1, msgs


def test_matching_shunt_code_says_nothing(tmp_path, caplog):
    with Simulator([commissioned(shunt_a=200)]) as sim:
        cfg = config.load(write_cfg(tmp_path, sim.path), env={})
        p = Poller(cfg, put=lambda lines: None)
        with caplog.at_level(logging.INFO, logger="dcmon.poller"):
            p.poll_bus_once("a")
        p.close()
    assert not [r for r in caplog.records if "shunt" in r.getMessage()]


def test_apply_shunt_codes_retry_is_logged_once_per_change(tmp_path, caplog):
    meter = commissioned(shunt_a=200, code_a=100, silent=True)
    with Simulator([meter]) as sim:
        cfg = config.load(write_cfg(tmp_path, sim.path, apply="true"), env={})
        p = Poller(cfg, put=lambda lines: None)
        with caplog.at_level(logging.INFO, logger="dcmon.poller"):
            for _ in range(2):      # two, not more: after 3 in a row the meter is backed off (polled every 5 s)
                p.poll_bus_once("a")
            assert sum("could not apply shunt code" in r.getMessage() for r in caplog.records) == 1
            meter.silent = False
            p.poll_bus_once("a")
            p.poll_bus_once("a")
        p.close()
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("shunt code set to 200 A and read back" in m for m in msgs) == 1, msgs
    assert meter.holding[0x0003] == PZEM017.shunt_codes[200]
    assert sum("answers again (after 2 failed polls)" in m for m in msgs) == 1, msgs


def test_answers_again_counts_this_outage_only(tmp_path, caplog):
    meter = commissioned()
    with Simulator([meter]) as sim:
        cfg = config.load(write_cfg(tmp_path, sim.path), env={})
        p = Poller(cfg, put=lambda lines: None)
        with caplog.at_level(logging.INFO, logger="dcmon.poller"):
            for outage in (2, 1):   # shorter than 3: after 3 in a row the meter is backed off
                meter.silent = True
                for _ in range(outage):
                    p.poll_bus_once("a")
                meter.silent = False
                p.poll_bus_once("a")
        p.close()
    again = [r.getMessage() for r in caplog.records if "answers again" in r.getMessage()]
    assert [re.search(r"after (\d+) failed", m).group(1) for m in again] == ["2", "1"], again


# ------------------------------------------------------------------------------------ run --once/--test

def test_run_once_fails_on_an_implausible_reading_and_honours_no_print(tmp_path, capsys):
    meter = commissioned(boot_garbage_s=60)         # nonsense with a valid CRC, as after power-up
    with Simulator([meter]) as sim:
        cfg = str(write_cfg(tmp_path, sim.path))
        rc = main(["run", "--once", "--no-print", "--config", cfg])
    out, err = capsys.readouterr()
    assert rc == 1
    assert out == "", "--no-print prints no readings"
    assert err.count("implausible reading discarded") == 1, err


def test_run_once_prints_by_default_and_fails_when_a_meter_is_silent(tmp_path, capsys):
    with Simulator([commissioned()]) as sim:
        cfg = write_cfg(tmp_path, sim.path, extra='\n[[sensors]]\nname = "solar"\nbus = "a"\naddress = 2\n')
        rc = main(["run", "--once", "--config", str(cfg)])
    out, err = capsys.readouterr()
    assert rc == 1 and out.startswith("battery") and err.count("sensor 'solar'") == 1, err


def test_run_test_prints_line_protocol_and_touches_nothing(tmp_path, capsys):
    with Simulator([commissioned()]) as sim:
        cfg = write_cfg(tmp_path, sim.path).read_text().replace("enabled = false", 'enabled = true\nurl = "http://127.0.0.1:9"')
        (tmp_path / "config.toml").write_text(cfg)
        rc = main(["run", "--test", "--config", str(tmp_path / "config.toml")])
    out, err = capsys.readouterr()
    assert rc == 0
    lines = out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dc_power,") and "sensor=battery" in lines[0]
    assert re.search(r" \d{19}$", lines[0]), "a nanosecond timestamp"
    assert not (tmp_path / "spool.sqlite").exists(), "--test must not create or touch the spool"
    assert "nothing was spooled or written" in err and "connection refused" not in err


def test_run_test_exits_1_when_a_meter_does_not_answer(tmp_path, capsys):
    with Simulator([commissioned(silent=True)]) as sim:
        rc = main(["run", "--test", "--config", str(write_cfg(tmp_path, sim.path))])
    out, err = capsys.readouterr()
    assert rc == 1 and out == "" and "sensor 'battery'" in err and "no answer" in err


# --------------------------------------------------------------------------------- line protocol floats

def test_calibrated_values_keep_the_meters_resolution(tmp_path):
    cal = Calibration(voltage_gain=1.008203, current_gain=1.0125, current_offset=0.013)
    raw = {"voltage_v": 13.41, "current_a": 12.17, "power_w": 163.2, "energy_wh": 5000.0}
    out = apply_calibration(raw, cal, PZEM017)
    for name, places in (("voltage_v", 2), ("current_a", 2), ("power_w", 1)):
        assert out[name] == round(out[name], places), f"{name} = {out[name]!r} claims digits the meter never gave"
    with Simulator([commissioned()]) as sim:
        extra = "\n[sensors.calibration]\nvoltage_gain = 1.008203\ncurrent_gain = 1.0125\ncurrent_offset = 0.013\n"
        cfg = config.load(write_cfg(tmp_path, sim.path, extra=extra), env={})
        lines: list[str] = []
        p = Poller(cfg, put=lines.extend)
        for _ in range(5):
            p.poll_bus_once("a")
        p.close()
    for line in lines:
        fields = dict(kv.split("=") for kv in line.split(" ")[1].split(","))
        for name, places in (("voltage_v", 2), ("current_a", 2), ("power_w", 1)):
            digits = fields[name].partition(".")[2]
            assert len(digits) <= places, f"{name}={fields[name]} in {line}"


# ------------------------------------------------------------------------------------------- status

NOW = 1_800_000_000.0


def record(**over) -> dict:
    data = {"time": NOW - 2, "pid": os.getpid(), "state": "running", "influxdb_enabled": True,
            "buses": {"a": {"port": "/dev/x", "error": ""}},
            "sensors": {"battery": {"bus": "a", "up": True, "last_error": "", "polls_ok": 3, "polls_failed": 0}},
            "spool": {"depth": 0, "oldest_time_ns": None}, "sender_error": ""}
    data.update(over)
    return data


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("over, code, says", [
    ({}, STATUS_OK, ""),
    ({"state": "stopped"}, STATUS_CRITICAL, "stopped cleanly"),
    ({"pid": "dead"}, STATUS_CRITICAL, "is not running"),
    ({"time": NOW - 120}, STATUS_CRITICAL, "120 s old"),
    ({"sensors": {"battery": {"bus": "a", "up": False, "last_error": "no answer within 0.1 s"}}},
     STATUS_WARNING, "sensor 'battery' is down: no answer"),
    ({"buses": {"a": {"port": "/dev/x", "error": "serial port /dev/x not found"}},
      "sensors": {"battery": {"bus": "a", "up": None, "last_error": ""}}}, STATUS_WARNING, "not found"),
    ({"spool": {"depth": 720, "oldest_time_ns": int((NOW - 3600) * 1e9)}, "sender_error": "connection refused"},
     STATUS_WARNING, "720 reading(s) wait in the spool, the oldest 60 min old: connection refused"),
    ({"spool": {"depth": 720, "oldest_time_ns": int((NOW - 3600) * 1e9)}, "influxdb_enabled": False},
     STATUS_OK, ""),
])
def test_status_verdicts(over, code, says):
    if over.get("pid") == "dead":
        over = {**over, "pid": dead_pid()}
    got, problems = assess(record(**over), now=NOW)
    assert got == code, problems
    assert says in " ".join(problems)


def test_status_command_running_stopped_and_killed(tmp_path):
    """The real poller as a process: `dcmon status` exits 0 while it runs, 2 once it stopped (and says
    "stopped"), 2 after a kill -9 (the pid is dead), 2 with no status at all."""
    env = {**os.environ, "DCMON_STATUS_PATH": str(tmp_path / "run" / "status.json")}
    cfg = str(write_cfg(tmp_path, "/dev/null-not-used"))
    status = [sys.executable, "-m", "dcmon.cli", "status", "--config", cfg]

    def check() -> tuple[int, str]:
        r = subprocess.run(status, env=env, capture_output=True, text=True, timeout=30)
        assert "Traceback" not in r.stderr + r.stdout
        return r.returncode, r.stdout.splitlines()[0] if r.stdout else r.stderr

    assert check()[0] == STATUS_CRITICAL
    for how in ("stop", "kill"):
        proc = subprocess.Popen([sys.executable, "-m", "dcmon.cli", "run", "--simulate", "--no-print", "--config", cfg],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                code, line = check()
                if code == STATUS_OK:
                    break
                time.sleep(0.5)
            assert code == STATUS_OK, line
            assert line.startswith("DCMON OK: poller pid") and "1 of 1 sensor(s) up" in line
            proc.send_signal(signal.SIGTERM if how == "stop" else signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        code, line = check()
        assert code == STATUS_CRITICAL, line
        assert ("stopped cleanly" if how == "stop" else "is not running: killed or crashed") in line


# ----------------------------------------------------------------------------------------- simulate

def start_simulate(args: list[str], cwd: Path) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen([sys.executable, "-m", "dcmon.cli", "simulate", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = []
    while True:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if line.startswith("try:"):
            break
    return proc, lines


def stop_simulate(proc: subprocess.Popen) -> tuple[int, str]:
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=10)
    return proc.returncode, err


def test_simulate_with_no_options_and_no_config_serves_one_pzem017(tmp_path):
    proc, lines = start_simulate([], tmp_path)
    try:
        assert lines and "PZEM-017 at address 1" in lines[0], lines
        port = lines[0].split()[0]
        assert lines[-1].startswith(f"try: dcmon read --port {port} --address 1")
        assert main(["read", "--port", port, "--address", "1", "--json"]) == 0
    finally:
        rc, err = stop_simulate(proc)
    assert rc == 0 and "no configuration at config.toml" in err and "Traceback" not in err


def test_simulate_serves_the_configured_meters_steadily(tmp_path, capsys):
    cfg = write_cfg(tmp_path, "/dev/ttyUSB9", extra='\n[[sensors]]\nname = "solar"\nbus = "a"\naddress = 2\n')
    proc, lines = start_simulate(["--steady", "--config", str(cfg)], tmp_path)
    try:
        assert "bus 'a'" in lines[0] and "sensor 'battery'" in lines[0] and "sensor 'solar'" in lines[0], lines
        assert "steady 13.20 V 8.00 A" in lines[0]
        port = lines[0].split()[0]
        capsys.readouterr()
        reads = []
        for _ in range(2):
            assert main(["read", "--port", port, "--address", "1", "--json"]) == 0
            reads.append(json.loads(capsys.readouterr().out)["values"])
        assert reads[0]["voltage_v"] == reads[1]["voltage_v"] == 13.2
        assert reads[0]["current_a"] == reads[1]["current_a"] == 8.0
        # commissioning.md's check-accuracy example, reproduced exactly
        rc = main(["check-accuracy", "--port", port, "--address", "1", "--point", "13.31,8.10"])
        out = capsys.readouterr().out
        assert rc == 1
        doc = (Path(__file__).resolve().parent.parent / "docs" / "commissioning.md").read_text()
        for line in out.splitlines()[:4]:
            assert line in doc, f"commissioning.md does not show this line of the output: {line!r}"
    finally:
        rc, err = stop_simulate(proc)
    assert rc == 0, err


def test_simulate_with_a_wrong_shunt_code_is_caught_by_the_poller(tmp_path, caplog):
    cfg_path = write_cfg(tmp_path, "/dev/ttyUSB9")
    proc, lines = start_simulate(["--shunt-code", "100", "--config", str(cfg_path)], tmp_path)
    try:
        assert "shunt code 100 A on a 200 A shunt" in lines[0], lines
        cfg = config.load(write_cfg(tmp_path, lines[0].split()[0]), env={})
        p = Poller(cfg, put=lambda lines: None)
        with caplog.at_level(logging.WARNING, logger="dcmon.poller"):
            p.poll_bus_once("a")
        p.close()
    finally:
        stop_simulate(proc)
    assert any("0.5 × the true value" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------------------- messages

def test_scan_of_a_port_names_the_framing_without_an_empty_field(tmp_path, capsys):
    with Simulator(meters_for([("pzem017", 1)])) as sim:
        assert main(["scan", "--port", sim.path, "--range", "1-2"]) == 0
    err = capsys.readouterr().err
    assert f"scanning {sim.path} (9600 8N2) addresses 1-2" in err and "(," not in err


def test_exception_02_on_a_read_suggests_the_model(capsys):
    with Simulator(meters_for([("pzem017", 1)])) as sim:
        rc = main(["read", "--port", sim.path, "--address", "1", "--model", "pzem016"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1
    assert "exception 02" in err and "another model" in err and "--model" in err


def test_read_with_one_configured_sensor_does_not_ask_which(tmp_path, capsys):
    with Simulator([commissioned()]) as sim:
        rc = main(["read", "--json", "--config", str(write_cfg(tmp_path, sim.path))])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert json.loads(cap.out)["sensor"] == "battery"


def test_database_not_found_is_said_once_with_the_spool_count(tmp_path, influxd, capsys):
    """One cause, one sentence: the sink names the missing database; the sender (or --once) adds, once, that
    the readings are kept, with their number."""
    from dcmon.outputs.influx import InfluxSink
    from dcmon.sender import Sender
    from dcmon.spool import Spool

    with Simulator([commissioned()]) as sim:
        text = write_cfg(tmp_path, sim.path).read_text().replace(
            "enabled = false", f'enabled = true\nurl = "{influxd.url}"\ndatabase = "no_such_db"')
        (tmp_path / "config.toml").write_text(text)
        rc = main(["run", "--once", "--no-print", "--config", str(tmp_path / "config.toml")])
    err = capsys.readouterr().err
    assert rc == 0, "the readings are safe in the spool"
    assert "database 'no_such_db' not found;" in err and err.count("in the spool") == 1, err
    assert err.count("not found") == 1, "InfluxDB's own 'database not found' is not repeated"  
    cfg = config.load(tmp_path / "config.toml", env={})
    with Spool.open(tmp_path / "spool.sqlite", max_bytes=1 << 20, max_age_s=86400) as sp:
        sink = InfluxSink(cfg.influxdb)
        try:
            Sender(sp, sink).flush(timeout_s=0.5)   # main() above set up logging to stderr, as the service has it
        finally:
            sink.close()
    said = [line for line in capsys.readouterr().err.splitlines() if "no_such_db" in line]
    assert len(said) == 1 and said[0].count("in the spool") == 1 and "(1 queued)" in said[0], said
