"""sd_notify and the progress-tied watchdog, received on real AF_UNIX datagram sockets.

No systemd runs here (PID 1 is not systemd), so the test plays systemd's part: it binds the socket that
``NOTIFY_SOCKET`` names and reads what dcmon sends, exactly as systemd would. The clock is injected so
the ping spacing is checked without sleeping.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import uuid

import pytest

from dcmon.systemd import JournalFormatter, Watchdog, notify, under_journal, watchdog_interval


class Receiver:
    """The manager's end: an AF_UNIX datagram socket, on a path or in the abstract namespace."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(1.0)

    def get(self) -> str:
        return self.sock.recv(4096).decode()

    def nothing(self) -> bool:
        """True when no datagram is waiting (checked without blocking)."""
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(1.0)
        return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def receiver(tmp_path):
    path = str(tmp_path / "notify.sock")
    r = Receiver(path)
    yield r, {"NOTIFY_SOCKET": path}
    r.close()


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_notify_to_path_socket(receiver):
    r, env = receiver
    assert notify("READY=1\nSTATUS=polling", env=env) is True
    assert r.get() == "READY=1\nSTATUS=polling"


def test_notify_to_abstract_socket():
    name = f"dcmon-test-{uuid.uuid4().hex}"
    r = Receiver(b"\0" + name.encode())
    try:
        assert notify("STATUS=abstract", env={"NOTIFY_SOCKET": "@" + name}) is True
        assert r.get() == "STATUS=abstract"
    finally:
        r.close()


def test_notify_outside_systemd_or_socket_gone_is_quiet(tmp_path):
    assert notify("READY=1", env={}) is False
    assert notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "missing.sock")}) is False
    assert notify("READY=1", env={"NOTIFY_SOCKET": "vsock:2:1234"}) is False


def test_notify_reads_os_environ_by_default(receiver, monkeypatch):
    r, env = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", env["NOTIFY_SOCKET"])
    assert notify("STATUS=from environ") is True
    assert r.get() == "STATUS=from environ"


def test_watchdog_interval_from_env():
    me = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "60000000"}) == 60.0
    assert watchdog_interval({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": me}) == 60.0
    assert watchdog_interval({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}) is None  # not ours
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


def test_ready_status_stopping(receiver):
    r, env = receiver
    wd = Watchdog(None, env=env)
    assert wd.ready("polling 2 sensors\non 1 bus")
    assert r.get() == "READY=1\nSTATUS=polling 2 sensors on 1 bus"  # one line: no injected assignment
    assert wd.status("spool 12 lines")
    assert r.get() == "STATUS=spool 12 lines"
    assert wd.stopping()
    assert r.get() == "STOPPING=1"


def test_ping_only_when_every_loop_progressed(receiver):
    r, env = receiver
    clock = FakeClock()
    wd = Watchdog.from_env({**env, "WATCHDOG_USEC": "60000000"}, loops=["poll:rs485", "send"])
    wd._clock = clock  # from_env builds with the real clock; the spacing rule is tested without sleeping
    assert wd.enabled and wd.interval_s == 60.0 and wd.min_gap_s == 15.0

    assert wd.maybe_ping() is False                    # nothing progressed yet
    wd.progress("poll:rs485")
    assert wd.stalled() == ["send"]
    assert wd.maybe_ping() is False                    # the sender has not moved
    assert r.nothing()
    wd.progress("send")
    assert wd.maybe_ping() is True
    assert r.get() == "WATCHDOG=1"

    # both move again, but too soon after the last ping: held back, not lost
    wd.progress("poll:rs485")
    wd.progress("send")
    clock.t += 5
    assert wd.maybe_ping() is False and r.nothing()
    clock.t += 10
    assert wd.maybe_ping() is True
    assert r.get() == "WATCHDOG=1"

    # a hung poll loop: the sender keeps going, yet no ping ever goes out again
    for _ in range(10):
        clock.t += 20
        wd.progress("send")
        assert wd.maybe_ping() is False
    assert r.nothing()
    assert wd.stalled() == ["poll:rs485"]


def test_register_forget_and_auto_register(receiver):
    r, env = receiver
    wd = Watchdog(60.0, env=env, clock=FakeClock())
    assert wd.maybe_ping() is False                    # no loop registered: nothing proves progress
    wd.register("poll:a")
    wd.register("poll:b")
    wd.progress("poll:a")
    wd.forget("poll:b")                                # taken out of service on purpose
    assert wd.maybe_ping() is True
    assert r.get() == "WATCHDOG=1"
    wd._clock.t += 100
    wd.progress("poll:a")
    wd.progress("send")                                # first report registers the loop
    assert wd.maybe_ping() is True
    wd._clock.t += 100
    wd.progress("poll:a")
    assert wd.maybe_ping() is False                    # "send" is now watched too
    assert wd.stalled() == ["send"]


def test_disabled_watchdog_never_pings(receiver):
    r, env = receiver
    wd = Watchdog.from_env(env, loops=["poll:rs485"])  # no WATCHDOG_USEC: systemd wants no pings
    assert not wd.enabled and wd.min_gap_s == 0.0
    wd.progress("poll:rs485")
    assert wd.maybe_ping() is False
    assert r.nothing()


def test_progress_from_threads(receiver):
    """Loops report from their own threads; the ping sees all of them."""
    import threading

    r, env = receiver
    wd = Watchdog(60.0, env=env, clock=FakeClock())
    names = [f"poll:bus{i}" for i in range(8)]
    for n in names:
        wd.register(n)
    threads = [threading.Thread(target=wd.progress, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wd.maybe_ping() is True
    assert r.get() == "WATCHDOG=1"


def test_journal_formatter_levels():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JournalFormatter())
    log = logging.getLogger("dcmon.test_journal")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    try:
        log.error("battery on bus rs485: no answer")
        log.warning("spool %d%% full", 90)
        log.info("started")
        log.debug("frame")
        log.info("two\nlines")
    finally:
        log.removeHandler(handler)
    assert stream.getvalue().splitlines() == [
        "<3>dcmon.test_journal: battery on bus rs485: no answer",
        "<4>dcmon.test_journal: spool 90% full",
        "<6>dcmon.test_journal: started",
        "<7>dcmon.test_journal: frame",
        "<6>dcmon.test_journal: two",
        "<6>lines",
    ]
    assert under_journal({"JOURNAL_STREAM": "8:1234"}) and not under_journal({})


def test_dcmon_run_notifies_systemd(tmp_path):
    """The real poller (`dcmon run --simulate`: simulated meters on a pty) under a watchdog of 2 s: READY=1
    once polling, WATCHDOG=1 as its loops progress, STOPPING=1 on SIGTERM, exit 0. The test is systemd."""
    import shutil
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    shutil.copy(root / "config.toml", tmp_path / "config.toml")
    sock_path = str(tmp_path / "notify.sock")
    r = Receiver(sock_path)
    r.sock.settimeout(15)
    env = {**os.environ, "NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "2000000",
           "DCMON_INFLUXDB_ENABLED": "false", "DCMON_POLLER_INTERVAL_S": "0.5",
           "DCMON_SPOOL_PATH": str(tmp_path / "spool.sqlite"), "DCMON_STATUS_PATH": str(tmp_path / "status.json")}
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen([sys.executable, "-m", "dcmon.cli", "run", "--simulate", "--config", str(tmp_path / "config.toml")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    got: list[str] = []
    try:
        got.append(r.get())
        deadline = time.monotonic() + 10
        while got.count("WATCHDOG=1") < 2 and time.monotonic() < deadline:
            got.append(r.get())
        proc.send_signal(signal.SIGTERM)
        while not got[-1].startswith("STOPPING=1") and time.monotonic() < deadline + 10:
            got.append(r.get())
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        r.close()
    assert got[0].startswith("READY=1\nSTATUS=polling 1 sensor"), (got, out)
    assert got.count("WATCHDOG=1") >= 2, (got, out)
    assert got[-1].startswith("STOPPING=1") and proc.returncode == 0, (got, out)
    assert "Traceback" not in out
