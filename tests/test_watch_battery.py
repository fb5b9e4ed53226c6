"""`dcmon watch --battery NAME` with real parts: two simulated PZEM-017s on a real pty (a charger's meter and a
load's meter, driven by dcmon.battery_sim's battery model in real time), the real CLI in a fresh interpreter,
the real service (`dcmon run`) writing the status watch follows, and the real battery-state file (written by
dcmon.battery_store, as the service does) that watch must read and never write.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dcmon import config
from dcmon.battery import BatteryMonitor
from dcmon.battery_sim import BatteryModel
from dcmon.battery_store import BatteryStore
from dcmon.bus import check_port
from dcmon.cli import main
from dcmon.errors import BusError
from dcmon.simulator import SimMeter, Simulator

from battery_rig import ModelClock, config_text
from battery_rig import meters as rig_meters


LINE = re.compile(r"^(\d\d:\d\d:\d\d) battery house: (SoC [^,]+), (\w+)(?: ([+-]\d+\.\d\d) A)?(?: (\d+\.\d\d) V)?")


def write_config(tmp: Path, port: str, extra: str = "") -> Path:
    path = tmp / "config.toml"
    path.write_text(config_text(port=port, spool=tmp / "spool.sqlite", host=None, influxdb="enabled = false") + extra)
    return path


def meters(model: BatteryModel) -> list[SimMeter]:
    return rig_meters(model, ModelClock(speed=1.0))   # real time: what watch prints is what the model is now


def env(tmp: Path) -> dict[str, str]:
    # the status lookup of `dcmon status`: $DCMON_STATUS_PATH first (never the machine's /run/dcmon)
    return {**os.environ, "DCMON_STATUS_PATH": str(tmp / "status.json"), "PYTHONUNBUFFERED": "1"}


def watch(tmp: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dcmon.cli", "watch", "--config", str(tmp / "config.toml"), *args],
                          capture_output=True, text=True, timeout=timeout, env=env(tmp))


def parse(line: str) -> dict[str, str | None]:
    m = LINE.match(line)
    assert m, f"not a battery line: {line!r}"
    return dict(zip(("stamp", "soc", "status", "current", "voltage"), m.groups()))


def fingerprint(folder: Path) -> dict[str, str]:
    """Every battery-state file (and any -wal/-shm beside it) with a hash of its bytes."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("battery.sqlite*"))}


def save_state(cfg_path: Path, *, used_ah: float, age_s: float) -> int:
    """What the service leaves in battery.sqlite: a monitor synchronised to 100 %, then ``used_ah`` taken out,
    saved ``age_s`` ago. Returns the saved time (ns)."""
    cfg = config.load(cfg_path, env={})
    mon = BatteryMonitor(cfg.batteries[0])
    saved_ns = time.time_ns() - int(age_s * 1e9)
    mon.synchronise(saved_ns - 3600 * 10**9)
    mon.used_ah = mon.consumed_ah = used_ah
    with BatteryStore.open(cfg.resolve(cfg.spool.path).with_name("battery.sqlite")) as store:
        assert store.save({"house": mon.to_state(saved_ns)})
    return saved_ns


def record(tmp: Path, *, state: str = "running", t: float | None = None, soc: float | None = 55.0,
           current: float = -2.0, batteries: bool = True) -> None:
    """A status record in the format the service writes (dcmon.service.Service.status_record, with the
    battery entry of BatteryService.status()), by this (live) process, written as the service does (replace)."""
    entry = {"name": "house", "status": "discharging", "soc_pct": soc, "time_to_go_s": 3 * 3600.0 + 60,
             "unknown_reason": "" if soc is not None else "not synchronised yet", "voltage_v": 12.34,
             "current_a": current, "power_w": current * 12.34, "consumed_ah": 2.25, "stale_sensors": [],
             "capacity_ah": 5.0, "discharge_floor_pct": 50.0, "can_count": True}
    data = {"pid": os.getpid(), "time": time.time() if t is None else t, "state": state,
            "buses": {"a": {"port": "x"}},
            "sensors": {"charger": {"bus": "a", "up": True}, "loads": {"bus": "a", "up": True}},
            "batteries": {"house": entry} if batteries else {}}
    tmp_file = tmp / "status.json.tmp"
    tmp_file.write_text(json.dumps(data))
    os.replace(tmp_file, tmp / "status.json")


# --------------------------------------------------------------------------- the service is not running

def test_watch_reads_the_meters_itself_from_the_saved_state_and_writes_nothing(tmp_path):
    """No service: watch opens the battery's two meters, shows the simulator's net current and voltage, and the
    state of charge from the service's saved state (80 %, 1 Ah used of 5), with the model's time to go; the
    state file is left byte for byte as it was, and nothing is created beside it."""
    model = BatteryModel(capacity_ah=5, soc=0.8, charger_max_a=0.0, load_a=1.5)
    with Simulator(meters(model)) as sim:
        cfg = write_config(tmp_path, sim.path)
        saved_ns = save_state(cfg, used_ah=1.0, age_s=30)
        before = fingerprint(tmp_path)
        files_before = sorted(p.name for p in tmp_path.iterdir())
        r = watch(tmp_path, "--battery", "house", "--count", "3", "--interval", "0.3")
        volts = model.voltage()
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3, r.stdout
    for line in lines:
        got = parse(line)
        assert got["status"] == "discharging" and got["current"] == "-1.50", line
        assert abs(float(got["voltage"] or 0) - volts) <= 0.011, (line, volts)
        soc = float(str(got["soc"]).split()[1])
        assert 79.9 <= soc <= 80.0, line
        assert line.endswith(", 1.00 Ah consumed"), line
    # time to go at 1.5 A from 80 % to the 50 % floor, as the model itself computes it (Peukert 1.25)
    want = model.time_to_floor_s(50.0)
    m = re.search(r"time to go (?:(\d+) h )?(\d+) min to 50 %", lines[-1])
    assert m, lines[-1]
    got_s = int(m.group(1) or 0) * 3600 + int(m.group(2)) * 60
    assert abs(got_s - want) <= max(60, 0.05 * want), (lines[-1], want)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(saved_ns / 1e9))
    assert f"saved state of {stamp}" in r.stderr and "watch does not save it" in r.stderr, r.stderr
    assert "service is not running" in r.stderr
    assert fingerprint(tmp_path) == before, "watch changed the service's battery state"
    assert sorted(p.name for p in tmp_path.iterdir()) == files_before, "watch left files beside the state"


def test_a_meter_that_does_not_answer_is_named_and_watch_goes_on(tmp_path, monkeypatch, capsys):
    model = BatteryModel(capacity_ah=5, soc=0.8, load_a=1.5)
    monkeypatch.setenv("DCMON_STATUS_PATH", str(tmp_path / "status.json"))
    with Simulator(meters(model)[:1]) as sim:            # only the charger's meter is there
        cfg = write_config(tmp_path, sim.path)
        rc = main(["watch", "--config", str(cfg), "--battery", "house", "--count", "2", "--interval", "0.1"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    lines = out.splitlines()
    assert len(lines) == 2, out
    for line in lines:
        assert parse(line)["status"] == "unknown" and "(not read lately: loads)" in line, line
        assert "; sensor 'loads': bus 'a' address 2: " in line and "no answer" in line, line
        assert "sensor 'charger':" not in line
    assert "no saved state" in err and "unknown until the next full charge" in err


def test_a_port_that_cannot_be_opened_at_start_is_one_line(tmp_path):
    write_config(tmp_path, str(tmp_path / "ttyNONE"))
    r = watch(tmp_path, "--battery", "house", "--count", "2", "--interval", "0.1")
    assert r.returncode == 1 and r.stdout == ""
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("dcmon: error: bus 'a': serial port") and "not found" in last, r.stderr
    assert "Traceback" not in r.stderr


# ------------------------------------------------------------------------------- following the service

def test_watch_follows_a_running_service_without_opening_the_port(tmp_path):
    """`dcmon run --simulate` is the real service (its meters on a pty of its own): the configured port does
    not exist, so a watch that opened it would say so. Each line watch prints is a status record's battery
    entry, one per record; once the service stops, a new watch reads the (missing) port itself."""
    cfg = write_config(tmp_path, str(tmp_path / "ttyNONE"))
    status = tmp_path / "status.json"
    svc = subprocess.Popen([sys.executable, "-m", "dcmon.cli", "run", "--simulate", "--no-print", "--interval", "1",
                            "--config", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(tmp_path))
    records: dict[str, dict] = {}
    try:
        deadline = time.monotonic() + 30
        while True:
            assert time.monotonic() < deadline, "the service wrote no status with a battery"
            assert svc.poll() is None, svc.communicate()
            try:
                data = json.loads(status.read_text())
            except (OSError, ValueError):
                data = {}
            if (data.get("batteries") or {}).get("house", {}).get("current_a") is not None:
                break
            time.sleep(0.2)
        w = subprocess.Popen([sys.executable, "-m", "dcmon.cli", "watch", "--config", str(cfg), "--battery", "house",
                              "--count", "2", "--interval", "0.5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env(tmp_path))
        while w.poll() is None:             # what the service published meanwhile, by its time stamp
            try:
                data = json.loads(status.read_text())
                records[time.strftime("%H:%M:%S", time.localtime(data["time"]))] = data
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.1)
        out, err = w.communicate(timeout=30)
        try:   # the record watch's last line came from (watch may exit before the loop above saw it)
            data = json.loads(status.read_text())
            records[time.strftime("%H:%M:%S", time.localtime(data["time"]))] = data
        except (OSError, ValueError, KeyError):
            pass
    finally:
        svc.send_signal(signal.SIGTERM)
        svc.communicate(timeout=30)
    assert w.returncode == 0, err
    assert "following the running service" in err and "not found" not in out + err, (out, err)
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0][:8] != lines[1][:8], out    # one line per status record
    for line in lines:
        got = parse(line)
        rec = records.get(str(got["stamp"]))
        assert rec is not None, (line, sorted(records))
        b = rec["batteries"]["house"]
        assert got["current"] == f"{b['current_a']:+.2f}" and got["voltage"] == f"{b['voltage_v']:.2f}", (line, b)
        assert got["soc"] == "SoC unknown (not synchronised yet)" and got["status"] == b["status"]
    # the service has stopped (status "stopped"): watch now opens the port itself, and says why it cannot
    assert json.loads(status.read_text())["state"] == "stopped"
    r = watch(tmp_path, "--battery", "house", "--count", "1")
    assert r.returncode == 1 and "the poller stopped cleanly" in r.stderr and "not found" in r.stderr, r.stderr


def test_watch_hands_the_port_to_a_service_that_starts_and_takes_it_back_when_it_stops(tmp_path):
    """Direct → follow → direct, driven by status records the test writes as the service does: when the
    service starts, watch lets go of the port at once (the port is free again) and shows the service's
    state, a line per record; when it stops, watch waits the restart grace and reads the meters again."""
    model = BatteryModel(capacity_ah=5, soc=0.8, load_a=1.5)
    with Simulator(meters(model)) as sim:
        cfg = write_config(tmp_path, sim.path)
        script = ("import sys; import dcmon.tools.battery_watch as w; w.RESTART_GRACE_S = 0.5; "
                  "from dcmon.cli import main; sys.exit(main(sys.argv[1:]))")
        proc = subprocess.Popen([sys.executable, "-c", script, "watch", "--config", str(cfg), "--battery", "house",
                                 "--interval", "0.1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env(tmp_path))
        lines: list[str] = []
        buf = b""

        def until(pred, what: str, start: int = 0, timeout: float = 15) -> str:
            nonlocal buf
            deadline = time.monotonic() + timeout
            while True:
                for line in lines[start:]:
                    if pred(line):
                        return line
                left = deadline - time.monotonic()
                assert left > 0, f"watch never printed {what}: {lines[-5:]}"
                r, _, _ = select.select([proc.stdout], [], [], left)
                if r:
                    chunk = os.read(proc.stdout.fileno(), 4096)
                    assert chunk, f"watch ended: {proc.communicate()}"
                    buf += chunk
                    *done, buf = buf.split(b"\n")
                    lines.extend(x.decode() for x in done)

        try:
            until(lambda x: "-1.50 A" in x, "a line from the meters")
            with pytest.raises(BusError, match="in use by another program"):
                check_port(sim.path)                              # watch holds the port
            n_direct = len(lines)
            record(tmp_path, soc=55.0)
            until(lambda x: "SoC 55.0 %" in x, "the service's first record")
            check_port(sim.path)                                  # ... and let go of it for the service
            record(tmp_path, soc=54.0, t=time.time() + 1)
            until(lambda x: "SoC 54.0 %" in x, "the service's second record")
            time.sleep(0.5)                                       # 5 refreshes, no new record: no new line
            record(tmp_path, state="stopped", t=time.time() + 2)
            n_follow = len(lines)
            until(lambda x: "-1.50 A" in x, "lines from the meters again", start=n_follow)
        finally:
            proc.send_signal(signal.SIGINT)                       # Ctrl-C: exit 0, quietly
            rest, err = proc.communicate(timeout=15)
    lines += (buf + rest).decode().splitlines()
    assert proc.returncode == 0, err
    followed = lines[n_direct:n_follow]
    assert [parse(x)["soc"] for x in followed] == ["SoC 55.0 %", "SoC 54.0 %"], followed
    assert "discharging -2.00 A 12.34 V, time to go 3 h 01 min to 50 %, 2.25 Ah consumed" in followed[0]
    assert all(parse(x)["current"] == "-1.50" for x in lines[:n_direct] + lines[n_follow:]), lines
    text = err.decode()
    assert "the port is its again" in text and "not running any more" in text, text
    assert "Traceback" not in text and "interrupted" not in text, text


def test_a_running_service_without_the_battery(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DCMON_STATUS_PATH", str(tmp_path / "status.json"))
    cfg = write_config(tmp_path, str(tmp_path / "ttyNONE"))
    record(tmp_path, batteries=False)
    rc = main(["watch", "--config", str(cfg), "--battery", "house", "--count", "1"])
    out, err = capsys.readouterr()
    assert rc == 1 and out == ""
    assert err.strip().splitlines()[-1] == (f"dcmon: error: the running service (pid {os.getpid()}) has no battery "
                                            f"'house': it was started before the battery was configured; restart it "
                                            f"(sudo systemctl restart dcmon), then watch again")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not hasattr(os, "chown"),
                    reason="needs root and setpriv (util-linux) to drop the permission override")
def test_a_status_this_user_may_not_read_is_one_line(tmp_path):
    """The installed service's status is 0750 dcmon:dcmon: watch cannot tell whether the service holds the
    port, and says how to look (root here, without the capability that overrides file permissions)."""
    write_config(tmp_path, str(tmp_path / "ttyNONE"))
    record(tmp_path)
    status = tmp_path / "status.json"
    os.chown(status, 65534, 65534)
    status.chmod(0o600)
    r = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-m",
                        "dcmon.cli", "watch", "--config", str(tmp_path / "config.toml"), "--battery", "house",
                        "--count", "1"], capture_output=True, text=True, timeout=60, env=env(tmp_path))
    assert r.returncode == 1 and r.stdout == "", r
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"dcmon: error: cannot read {status}: permission denied"), r.stderr
    assert "sudo dcmon watch --battery" in line and "dcmon group" in line


# ------------------------------------------------------------------------------------------ the command line

def test_unknown_or_missing_batteries(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DCMON_STATUS_PATH", str(tmp_path / "status.json"))
    cfg = write_config(tmp_path, str(tmp_path / "ttyNONE"))
    assert main(["watch", "--config", str(cfg), "--battery", "hosue"]) == 2
    err = capsys.readouterr().err
    assert "no battery named 'hosue' (did you mean 'house'? batteries: house)" in err, err
    assert main(["watch", "--config", str(cfg), "--battery", "van"]) == 2
    assert "no battery named 'van' (batteries: house)" in capsys.readouterr().err
    cfg.write_text(cfg.read_text().split("[[batteries]]")[0])
    assert main(["watch", "--config", str(cfg), "--battery", "house"]) == 2
    err = capsys.readouterr().err
    assert "batteries: no batteries configured (add a [[batteries]] table" in err, err


@pytest.mark.parametrize("extra, text", [(["--sensor", "loads"], "not both"), (["--address", "2"], "not both"),
                                         (["--port", "/dev/ttyUSB0"], "leave out --port"),
                                         (["--bus", "a"], "leave out --bus")])
def test_battery_and_a_meter_option(tmp_path, monkeypatch, capsys, extra, text):
    monkeypatch.setenv("DCMON_STATUS_PATH", str(tmp_path / "status.json"))
    cfg = write_config(tmp_path, str(tmp_path / "ttyNONE"))
    assert main(["watch", "--config", str(cfg), "--battery", "house", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dcmon watch: ") and text in err and len(err.strip().splitlines()) == 1, err


def test_without_a_meter_named_the_only_battery_is_watched(tmp_path, monkeypatch, capsys):
    """Two sensors and one battery: `dcmon watch` alone has one sensible answer. Two batteries: it asks."""
    monkeypatch.setenv("DCMON_STATUS_PATH", str(tmp_path / "status.json"))
    model = BatteryModel(capacity_ah=5, soc=0.8, load_a=1.5)
    with Simulator(meters(model)) as sim:
        cfg = write_config(tmp_path, sim.path)
        assert main(["watch", "--config", str(cfg), "--count", "1"]) == 0
        out, err = capsys.readouterr()
        assert parse(out.strip())["current"] == "-1.50", out
        assert "battery 'house', the only one configured" in err
        # --bus names the meters' bus: a meter is meant, and which one is still the question it always was
        assert main(["watch", "--config", str(cfg), "--bus", "a", "--count", "1"]) == 2
        assert "give --sensor NAME" in capsys.readouterr().err
    cfg.write_text(cfg.read_text() + '\n[[batteries]]\nname = "van"\ncapacity_ah = 100\nbattery_cable = ["loads"]\n')
    assert main(["watch", "--config", str(cfg)]) == 2
    assert "which meter or battery? give --sensor NAME, --address N or --battery NAME (batteries in" in capsys.readouterr().err
