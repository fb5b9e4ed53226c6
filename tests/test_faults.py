"""Fault tests against the real influxd: an outage while readings are spooled, SIGKILL at random moments,
a corrupt spool at start-up. No fakes: real SQLite files, real processes, the real InfluxDB 1.x.

This file is also the child program of the kill test (``python test_faults.py child ...``): a small writer
that puts synthetic readings into the spool one cycle at a time (8 lines per transaction, like 8 meters)
while a Sender thread drains it, logging "P <t>" before each put and "C <t>" once the put returned, so
the test knows which cycles were certainly committed (C) and which might have been (P).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from dcmon.config import InfluxConfig
from dcmon.outputs.influx import InfluxSink
from dcmon.reading import encode_line
from dcmon.sender import Sender
from dcmon.spool import Spool

PER_CYCLE = 8
HERE = Path(__file__).resolve()


def cycle_lines(t: int) -> list[str]:
    """One poll cycle: 8 meters, each its own series, all stamped with the cycle's time."""
    return [encode_line("dc_power", {"sensor": f"m{i}"}, {"voltage_v": 12.0 + i / 10, "cycle": t}, t)
            for i in range(PER_CYCLE)]


def open_spool(path: Path) -> Spool:
    return Spool.open(path, max_bytes=64 << 20, max_age_s=30 * 86400)


def sink_for(url: str, db: str) -> InfluxSink:
    return InfluxSink(InfluxConfig(url=url, database=db, timeout_s=2.0))


def points(influx, db: str) -> list[tuple[int, str, int]]:
    """Every point as (time, sensor, cycle field)."""
    series = influx.query('SELECT "cycle" FROM "dc_power" GROUP BY "sensor"', db)
    return [(t, s["tags"]["sensor"], c) for s in series for t, c in s["values"]]


# ---------------------------------------------------------------------------------------------- (a) outage

def test_outage_loses_nothing_and_duplicates_nothing(own_influxd, tmp_path, caplog):
    influx = own_influxd
    influx.create_db("f")
    caplog.set_level(logging.INFO)
    spool = open_spool(tmp_path / "spool.sqlite")
    sink = sink_for(influx.url, "f")
    sender = Sender(spool, sink, min_backoff_s=0.1, max_backoff_s=0.5)  # short back-off: a quick test
    stop = threading.Event()
    thread = threading.Thread(target=sender.run, args=(stop,))
    thread.start()
    put = 0
    depth_during_outage = 0
    t = time.time_ns()

    def poll_for(seconds: float) -> None:
        nonlocal put, t
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t += 1_000_000  # 1 ms apart: distinct timestamps, as real readings are
            spool.put(cycle_lines(t))
            sender.poke()
            put += PER_CYCLE
            time.sleep(0.01)

    try:
        poll_for(0.5)
        influx.stop()
        poll_for(1.5)
        depth_during_outage = spool.stats().depth
        influx.start()
        poll_for(0.5)
        deadline = time.monotonic() + 20
        while spool.stats().depth and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        thread.join(5)
        sink.close()
    assert depth_during_outage >= 100 * PER_CYCLE // 2  # readings piled up in the spool meanwhile
    assert spool.stats().depth == 0
    spool.close()
    pts = points(influx, "f")
    assert len(pts) == put  # no loss, and no duplicates
    assert len({(ts, s) for ts, s, _ in pts}) == put
    assert any("keeping readings in the spool" in r.getMessage() for r in caplog.records)
    assert any("reachable again" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------- (b) SIGKILL

def _child_run(spool_path: str, url: str, db: str, log_path: str, cycles: str) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    spool = open_spool(Path(spool_path))
    sink = sink_for(url, db)
    sender = Sender(spool, sink, batch_lines=50)  # small batches: more send/ack windows to be killed in
    stop = threading.Event()
    thread = threading.Thread(target=sender.run, args=(stop,), daemon=True)
    thread.start()
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, b"R 0\n")  # ready: the kills that matter come after this
    n = int(cycles)  # 0 = until killed
    i = 0
    while n == 0 or i < n:
        t = time.time_ns()
        os.write(fd, f"P {t}\n".encode())
        spool.put(cycle_lines(t))
        os.write(fd, f"C {t}\n".encode())
        sender.poke()
        i += 1
        time.sleep(0.004)
    stop.set()
    thread.join()
    ok = sender.flush(20)
    spool.close()
    return 0 if ok else 3


def _child(spool: Path, url: str, db: str, log: Path, cycles: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE), "child", str(spool), url, db, str(log), str(cycles)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _ready_count(log: Path) -> int:
    try:
        return log.read_bytes().count(b"R 0\n")
    except FileNotFoundError:
        return 0


def test_sigkill_loop_every_committed_reading_arrives_once(influxd, fresh_db, tmp_path):
    spool_path, log = tmp_path / "spool.sqlite", tmp_path / "cycles.log"
    seed = int(os.environ.get("DCMON_FAULT_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    started = time.monotonic()
    fork = multiprocessing.get_context("fork")  # a forked child starts in milliseconds, not a second
    for _ in range(15):
        ready_before = _ready_count(log)
        child = fork.Process(target=_child_run, args=(str(spool_path), influxd.url, fresh_db, str(log), "0"))
        child.start()
        if rng.random() < 0.2:
            time.sleep(rng.uniform(0.0, 0.03))  # in start-up: opening the spool, the first sends
        else:  # while putting and sending: wait for this child's "ready", then a random moment
            deadline = time.monotonic() + 15
            while _ready_count(log) <= ready_before and child.is_alive() and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.02, 0.6))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL
        if time.monotonic() - started > 30:
            break
    final = _child(spool_path, influxd.url, fresh_db, log, 5)  # a clean run sends what is left
    out, _ = final.communicate(timeout=60)
    assert final.returncode == 0, f"seed {seed}: {out}"

    entries = [line.split() for line in log.read_text().splitlines() if not line.startswith("R")]
    intended = {int(t) for kind, t in entries if kind == "P"}
    committed = {int(t) for kind, t in entries if kind == "C"}
    pts = points(influxd, fresh_db)
    arrived = {ts for ts, _, _ in pts}
    assert len(committed) > 100, f"seed {seed}: the children did not get going"
    assert committed <= arrived, f"seed {seed}: {len(committed - arrived)} committed cycles lost"
    assert arrived <= intended, f"seed {seed}: points that were never put"
    assert len(pts) == len({(ts, s) for ts, s, _ in pts}) == PER_CYCLE * len(arrived), f"seed {seed}"
    assert all(ts == c for ts, _, c in pts)  # each point is exactly the line that was spooled
    assert not list(tmp_path.glob("*.corrupt-*")), "a kill corrupted the spool"
    sp = open_spool(spool_path)
    assert sp.count() == 0
    sp.close()


# ---------------------------------------------------------------------------------------------- (c) corrupt

def test_corrupt_spool_at_startup_is_moved_aside_and_work_goes_on(influxd, fresh_db, tmp_path):
    spool_path, log = tmp_path / "var" / "spool.sqlite", tmp_path / "cycles.log"
    spool_path.parent.mkdir()
    spool_path.write_bytes(b"SQLite format 3\x00" + os.urandom(8192))  # a header, then garbage
    cfg = tmp_path / "config.toml"
    cfg.write_text('[spool]\npath = "var/spool.sqlite"\n')

    # the inspecting command does not touch it: one line, what is wrong and what to do, exit 1
    r = subprocess.run([sys.executable, "-m", "dcmon.cli", "--config", str(cfg), "spool", "status"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "moves it aside" in r.stderr and str(spool_path) in r.stderr

    child = _child(spool_path, influxd.url, fresh_db, log, 20)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 0, out
    aside = list(spool_path.parent.glob("spool.sqlite.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"SQLite format 3")
    said = [line for line in out.splitlines() if "moved it to" in line]
    assert len(said) == 1 and str(aside[0]) in said[0]
    assert influxd.count("dc_power", "cycle", db=fresh_db) == 20 * PER_CYCLE

    r = subprocess.run([sys.executable, "-m", "dcmon.cli", "--config", str(cfg), "spool", "status"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "queued       0" in r.stdout


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == "child":
    sys.exit(_child_run(*sys.argv[2:]))
