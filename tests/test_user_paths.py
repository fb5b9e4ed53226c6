"""Every command, as an ordinary user would run it, against the installed layout.

The package is installed the way a user installs it (``deploy/install.sh --prefix`` into a temporary root,
the helpers of tests/test_deploy.py: real useradd, real venv, real pip), then each command runs as another
user with ``setpriv`` (the suite runs as root here and in CI):

- ``service``: the ``dcmon`` system user that install.sh created in the prefix (its uid and gid), umask 027 as
  the unit sets, running the poller (``run --simulate``) against a real InfluxDB (tests/servers.py);
- ``member``: ``nobody`` in the ``dcmon`` group (what docs/install.md offers for reading the status);
- ``other``: ``nobody`` with no groups.

The layout is the installed one: ``/etc/dcmon`` 0750 root:dcmon (files 0640), ``/var/lib/dcmon`` 0750
dcmon:dcmon, ``/run/dcmon`` 0750 dcmon:dcmon as systemd makes it for ``RuntimeDirectory=dcmon``. Inside the
prefix the absolute paths of the config are redirected the way the unit does (``DCMON_SPOOL_PATH``) plus
``DCMON_STATUS_PATH`` for the status file; the status lookup itself (``/run/dcmon`` closed to the user) is run
with ``SERVICE_STATUS`` pointed into the prefix.

Asserted for each: no traceback, the exit status, and for a refusal one last line saying what to do. The
config-file lookup (which file is picked without ``--config``) belongs to the configuration work: these tests
pass ``--config PATH`` (where the lookup test goes is marked at the end).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from test_deploy import Install, need, need_root, seed_root, snapshot_source

NOBODY = 65534
HINT = re.compile(r"sudo|group|--config|dialout|permission|readable|writable|chown", re.I)
DB = "dcmon_user_paths"


@dataclass
class Layout:
    base: Path
    root: Path
    uid: int
    gid: int
    influx_url: str

    @property
    def dcmon(self) -> str:
        return str(self.root / "opt/dcmon/venv/bin/dcmon")

    @property
    def python(self) -> str:
        return str(self.root / "opt/dcmon/venv/bin/python")

    @property
    def config(self) -> str:
        return str(self.root / "etc/dcmon/config.toml")

    @property
    def status(self) -> Path:
        return self.root / "run/dcmon/status.json"

    def env(self) -> dict[str, str]:
        return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(self.base / "work"),
                "PYTHONDONTWRITEBYTECODE": "1",
                "DCMON_SPOOL_PATH": str(self.root / "var/lib/dcmon/spool.sqlite"),   # as the unit sets it
                "DCMON_STATUS_PATH": str(self.status),
                "DCMON_INFLUXDB_URL": self.influx_url, "DCMON_INFLUXDB_DATABASE": DB}

    def as_user(self, who: str) -> list[str]:
        if who == "service":
            ids = [f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups"]
        elif who == "member":
            ids = [f"--reuid={NOBODY}", f"--regid={NOBODY}", f"--groups={self.gid}"]
        else:
            ids = [f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        return ["setpriv", *ids, "--", "sh", "-c", 'umask 027 && exec "$@"', "sh"]

    def run(self, who: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60,
            argv0: str | None = None) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([*self.as_user(who), argv0 or self.dcmon, *args], capture_output=True, text=True,
                           timeout=timeout, env=env or self.env(), cwd=self.base / "work")
        assert "Traceback" not in r.stdout + r.stderr, f"dcmon {' '.join(args)} as {who}:\n{r.stdout}\n{r.stderr}"
        return r

    def popen(self, who: str, *args: str) -> subprocess.Popen:
        return subprocess.Popen([*self.as_user(who), self.dcmon, *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=self.env(), cwd=self.base / "work")


@pytest.fixture(scope="module")
def layout(influxd):
    """deploy/install.sh --prefix into a world-traversable temporary root (pytest's own tmp is 0700 root)."""
    need_root()
    need("systemctl", "systemd")
    need("useradd", "passwd")
    need("setpriv", "util-linux")
    base = Path(tempfile.mkdtemp(prefix="dcmon-user-paths-"))
    try:
        base.chmod(0o755)
        root, src = base / "root", base / "src"
        src.mkdir()
        (base / "work").mkdir(mode=0o777)
        (base / "work").chmod(0o1777)
        seed_root(root)
        inst = Install(root, snapshot_source(src))
        with pytest.MonkeyPatch.context() as mp:
            # the system's python3, as on a Pi: a python3 under root's home (pyenv) would make a venv whose
            # interpreter other users cannot even start
            mp.setenv("PATH", "/usr/bin:/bin:/usr/sbin:/sbin:" + os.environ.get("PATH", ""))
            inst()
        user = inst.entry("passwd", "dcmon")
        uid, gid = int(user[2]), int(user[3])
        run = root / "run/dcmon"          # what systemd makes for RuntimeDirectory=dcmon, RuntimeDirectoryMode=0750
        run.mkdir(parents=True)
        os.chown(run, uid, gid)
        run.chmod(0o750)
        influxd.drop_db(DB)
        influxd.create_db(DB)
        yield Layout(base, root, uid, gid, influxd.url)
        influxd.drop_db(DB)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def one_line_hint(r: subprocess.CompletedProcess[str]) -> str:
    """The refusal: its last line says what to do."""
    lines = [ln for ln in (r.stderr + r.stdout).strip().splitlines() if ln.strip()]
    assert lines, "a refusal must say why"
    assert HINT.search(lines[-1]), f"the last line does not say what to do: {lines[-1]!r}"
    return lines[-1]


def start_simulate(layout: Layout, who: str, *args: str) -> tuple[subprocess.Popen, str]:
    proc = layout.popen(who, "simulate", *args)
    first = proc.stdout.readline()
    proc.stdout.readline()  # the "try:" line
    assert first.startswith("/dev/pts/"), first + (proc.stderr.read() if proc.poll() is not None else "")
    return proc, first.split()[0]


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
    proc.send_signal(sig)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return proc.returncode


def test_layout_is_the_installed_one(layout):
    etc = layout.root / "etc/dcmon"
    assert (etc.stat().st_mode & 0o777, etc.stat().st_gid) == (0o750, layout.gid)
    state = layout.root / "var/lib/dcmon"
    assert (state.stat().st_mode & 0o777, state.stat().st_uid) == (0o750, layout.uid)


def test_help_works_for_anyone(layout):
    for cmd in ("run", "status", "simulate", "scan", "read", "calibrate", "spool", "grafana-import", "check-config"):
        r = layout.run("other", cmd, "--help")
        assert r.returncode == 0 and "examples:" in r.stdout


def test_a_user_without_access_gets_one_line_and_an_exit_status(layout):
    """nobody, not in group dcmon: everything that needs /etc/dcmon is refused with one line, exit 2; the status
    with exit 3 (UNKNOWN) and what to do."""
    cfg = ["--config", layout.config]
    for args in (["check-config"], ["run", "--once"], ["run", "--test", "--simulate"], ["spool", "status"],
                 ["spool", "export"], ["read", "--sensor", "battery"], ["scan"], ["calibrate", "--point", "13.3,8.1"],
                 ["grafana-import"], ["shunt", "get"], ["reset-energy", "--yes"]):
        r = layout.run("other", *args, *cfg)
        assert r.returncode == 2, f"dcmon {' '.join(args)}: {r.returncode}\n{r.stderr}"
        assert "permission denied" in one_line_hint(r)
    r = layout.run("other", "status", *cfg)
    assert r.returncode == 3
    line = one_line_hint(r)
    assert line.startswith("DCMON UNKNOWN") and "sudo dcmon status" in line and "dcmon group" in line


def test_the_status_lookup_survives_a_closed_run_dcmon(layout):
    """`Path.exists()` on /run/dcmon/status.json raises PermissionError when /run/dcmon is closed: the lookup
    must take that as "the service's status is there" and say how to read it."""
    script = ("import sys, pathlib, dcmon.service as p; p.SERVICE_STATUS = pathlib.Path(sys.argv[1]); "
              "from dcmon.cli import main; sys.exit(main(['status', '--config', sys.argv[2]]))")
    env = {k: v for k, v in layout.env().items() if k != "DCMON_STATUS_PATH"}
    r = layout.run("other", "-c", script, str(layout.status), layout.config, env=env, argv0=layout.python)
    assert r.returncode == 3 and "permission denied" in one_line_hint(r)


def test_bench_tools_on_a_port_the_user_may_not_open(layout):
    """The service user's pty is like a serial port the user is not allowed to open (not in dialout)."""
    sim, port = start_simulate(layout, "service")
    try:
        for args in (["scan", "--port", port, "--range", "1-2"], ["read", "--port", port, "--address", "1"],
                     ["watch", "--port", port, "--address", "1", "--count", "1"],
                     ["shunt", "get", "--port", port, "--address", "1"]):
            r = layout.run("other", *args)
            assert r.returncode == 1, f"{args}: {r.returncode}\n{r.stderr}"
            assert "dialout" in one_line_hint(r)
    finally:
        stop(sim)


def test_simulate_and_the_bench_tools_as_an_ordinary_user(layout):
    """With no config in the current folder, `dcmon simulate` serves one PZEM-017; the tools read it."""
    sim, port = start_simulate(layout, "other")
    try:
        r = layout.run("other", "read", "--port", port, "--address", "1", "--json")
        assert r.returncode == 0 and '"voltage_v"' in r.stdout, r.stderr
        r = layout.run("other", "scan", "--port", port, "--range", "1-3")
        assert r.returncode == 0 and "found 1 meter" in r.stdout
        r = layout.run("other", "check-accuracy", "--port", port, "--address", "1", "--point", "13.2,8.0")
        assert r.returncode in (0, 1) and "spec:" in r.stdout
        r = layout.run("other", "read", "--port", port, "--address", "1", "--model", "pzem016")
        assert r.returncode == 1 and "another model" in r.stderr
    finally:
        assert stop(sim, signal.SIGINT) == 0


def test_status_exit_codes_for_running_stopped_and_killed(layout):
    """The poller as the service user; `dcmon status` as a member of group dcmon and as the service user: 0
    while it runs, 2 (CRITICAL) after a clean stop ("stopped") and after kill -9 (dead pid); 3 for others."""
    cfg = ["--config", layout.config]
    for how in (signal.SIGTERM, signal.SIGKILL):
        poller = layout.popen("service", "run", "--simulate", "--no-print", *cfg)
        try:
            deadline = time.monotonic() + 60
            while True:
                r = layout.run("member", "status", "--brief", *cfg)
                if r.returncode == 0 or time.monotonic() > deadline or poller.poll() is not None:
                    break
                time.sleep(0.5)
            assert r.returncode == 0, f"{r.stdout}{r.stderr}\n--- poller:\n{poller.stderr.read() if poller.poll() is not None else ''}"
            assert r.stdout.startswith("DCMON OK") and "1 of 1 sensor(s) up" in r.stdout
            assert layout.status.stat().st_mode & 0o777 == 0o640, "readable by the dcmon group, not by others"
            assert layout.run("service", "status", *cfg).returncode == 0
            assert layout.run("other", "status", *cfg).returncode == 3
            r = layout.run("member", "check-config", *cfg)
            assert r.returncode == 0, r.stderr
            # the member may look but not write: the spool belongs to the service user
            r = layout.run("member", "run", "--once", *cfg)
            assert r.returncode != 0 and HINT.search(r.stderr.strip().splitlines()[-1]), r.stderr
            r = layout.run("member", "run", "--test", "--simulate", *cfg)
            assert r.returncode == 0 and r.stdout.startswith("dc_power,"), r.stderr
        finally:
            rc = stop(poller, how)
        if how == signal.SIGTERM:
            assert rc == 0
        r = layout.run("member", "status", *cfg)
        assert r.returncode == 2, r.stdout
        assert ("stopped cleanly" if how == signal.SIGTERM else "is not running: killed or crashed") in r.stdout


def test_the_service_user_runs_everything(layout, influxd):
    cfg = ["--config", layout.config]
    r = layout.run("service", "run", "--once", "--simulate", *cfg)
    assert r.returncode == 0, r.stderr
    assert "all readings written" in r.stderr
    assert influxd.count("dc_power", db=DB) >= 1
    for args in (["spool", "status"], ["spool", "export"], ["spool", "quarantine", "list"], ["check-config"]):
        r = layout.run("service", *args, *cfg)
        assert r.returncode == 0, f"{args}: {r.stderr}"
    r = layout.run("service", "run", "--test", "--simulate", *cfg)
    assert r.returncode == 0 and r.stdout.count("dc_power,") == 1
    # a member of group dcmon may read the config, but SQLite must write beside the spool even to read it
    r = layout.run("member", "spool", "status", *cfg)
    assert r.returncode == 1 and "sudo -u" in one_line_hint(r) and "dcmon spool status" in r.stderr, r.stderr


# The configuration lookup (which config.toml is used without --config: $DCMON_CONFIG, the installed
# /etc/dcmon one, ./config.toml) is the configuration engineer's part of issue 11. Its user-path test goes
# here: `layout.run("other", "check-config")` from a folder with and without a config.toml, as each user.
