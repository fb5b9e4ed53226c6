#!/usr/bin/env python3
"""Spool benchmark (prints numbers and ratios; not a test).

1. Backfill: a spool holding N readings (default 1,000,000) drains into a real influxd (started here on a
   free loopback port, like tests/servers.py), beside posting the same line protocol directly in
   5,000-line batches to the same influxd, in the same run (direct, spool, direct again: the mean of the
   two direct runs is the reference, so the server's own background work after the first run is shared).
   Target: the drain reaches at least 50 % of the direct rate.
2. Write cost at 8 meters × 1 Hz, for both durability levels: bytes written per reading and commits
   (and fsyncs, counted with strace when it is installed) per reading, with InfluxDB up (each cycle is
   put, sent and acked) and down (each cycle is only put). Each case runs in a child process so that
   /proc/self/io counts only its own writes: ``wchar`` = bytes handed to write() (what SQLite wrote: WAL
   frames and checkpoints), ``write_bytes`` = bytes the kernel accounted to the block layer.
3. The WAL bound (issue 19): the same write cost with the WAL checkpointed at 256 pages (1 MiB, shipped:
   the WAL is counted against the cap, so it must stay small) beside 1000 pages (SQLite's default, 4 MiB,
   what the spool used before), side by side in the same run.

    .venv/bin/python bench/bench_spool.py               # the full run (a few minutes)
    .venv/bin/python bench/bench_spool.py --quick        # smoke test: 20,000 lines, 300 cycles

Prints a ``RATIO …`` line with PASS/MISS; exits 0 (a benchmark reports, it does not fail CI).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

import httpx  # noqa: E402

from dcmon.config import InfluxConfig  # noqa: E402
from dcmon.outputs.influx import InfluxSink  # noqa: E402
from dcmon.reading import encode_fields, encode_head  # noqa: E402
from dcmon.sender import Sender  # noqa: E402
from dcmon.spool import Spool  # noqa: E402

METERS = 8
BATCH = 5000


def readings(n: int, t_end_ns: int) -> list[str]:
    """n realistic dc_power lines: 8 meters polled at 1 Hz, ending at t_end_ns. Each meter's head
    (measurement and tags) is encoded once, as the poller does."""
    cycles = (n + METERS - 1) // METERS
    t0 = t_end_ns - cycles * 1_000_000_000
    heads = [encode_head("dc_power", {"sensor": f"battery{m + 1}", "model": "pzem017", "address": str(m + 1),
                                      "bus": "rs485a", "host": "raspberrypi"}) for m in range(METERS)]
    out = []
    for c in range(cycles):
        t = t0 + c * 1_000_000_000
        for m in range(METERS):
            if len(out) == n:
                break
            v = 12.0 + (c % 600) / 100 + m / 10
            a = 1.0 + (c % 97) / 10
            fields = encode_fields({"voltage_v": round(v, 2), "current_a": round(a, 2), "power_w": round(v * a, 1),
                                    "energy_wh": float(c), "high_voltage_alarm": False, "low_voltage_alarm": False,
                                    "calibrated": False, "energy_reset": False})
            out.append(f"{heads[m]} {fields} {t}")
    return out


# ------------------------------------------------------------------------------------------- backfill

def post_direct(url: str, db: str, lines: list[str]) -> float:
    """Post in 5,000-line batches with a plain httpx client; returns seconds."""
    with httpx.Client(base_url=url, timeout=60) as client:
        t = time.perf_counter()
        for i in range(0, len(lines), BATCH):
            body = ("\n".join(lines[i:i + BATCH]) + "\n").encode()
            r = client.post("/write", params={"db": db, "precision": "ns"}, content=body)
            r.raise_for_status()
        return time.perf_counter() - t


def drain_spool(url: str, db: str, spool: Spool) -> float:
    sink = InfluxSink(InfluxConfig(url=url, database=db, timeout_s=30))
    sender = Sender(spool, sink, batch_lines=BATCH)
    t = time.perf_counter()
    ok = sender.flush(timeout_s=3600)
    elapsed = time.perf_counter() - t
    sink.close()
    if not ok:
        raise SystemExit(f"the spool did not drain: {sender.last_error}")
    return elapsed


def backfill(n: int, work: Path) -> None:
    from servers import Influxd  # tests/servers.py

    print(f"== backfill: {n:,} readings ==")
    t = time.perf_counter()
    lines = readings(n, time.time_ns())
    print(f"generated {n:,} lines ({sum(map(len, lines)) / n:.0f} bytes each) in {time.perf_counter() - t:.1f} s")
    spool = Spool.open(work / "backfill.sqlite", max_bytes=4 << 30, max_age_s=3650 * 86400)
    t = time.perf_counter()
    for i in range(0, n, BATCH):
        spool.put(lines[i:i + BATCH])
    fill = time.perf_counter() - t
    print(f"spool filled in {fill:.1f} s ({n / fill:,.0f} lines/s, {spool.file_bytes() / 2**20:.0f} MiB on disk)")

    srv = Influxd(work / "influxd").start()
    try:
        for db in ("direct1", "spool", "direct2"):
            srv.create_db(db)
        d1 = post_direct(srv.url, "direct1", lines)
        print(f"direct #1: {n / d1:>10,.0f} lines/s  ({d1:.1f} s)")
        ds = drain_spool(srv.url, "spool", spool)
        print(f"spool    : {n / ds:>10,.0f} lines/s  ({ds:.1f} s; peek + POST + delete per batch)")
        d2 = post_direct(srv.url, "direct2", lines)
        print(f"direct #2: {n / d2:>10,.0f} lines/s  ({d2:.1f} s)")
        direct_rate = n / ((d1 + d2) / 2)
        ratio = (n / ds) / direct_rate
        counts = {db: srv.count("dc_power", db=db) for db in ("direct1", "spool", "direct2")}
        print(f"points in InfluxDB: {counts} (expected {n:,} each)")
        print(f"RATIO spool drain vs direct post: {ratio * 100:.0f} % (target ≥ 50 %) "
              f"{'PASS' if ratio >= 0.5 and all(c == n for c in counts.values()) else 'MISS'}")
    finally:
        srv.stop()
        spool.close()


# ------------------------------------------------------------------------------------------- write cost

class NullSink:
    """Takes every batch: the cost case measures the spool's disk writes, not the network."""

    where = "null sink"

    def __init__(self) -> None:
        self.writes = 0

    def write(self, lines: list[str]) -> None:
        self.writes += 1


def _io() -> dict[str, int]:
    out = {}
    for row in Path("/proc/self/io").read_text().splitlines():
        k, v = row.split(":")
        out[k] = int(v)
    return out


def cost_child(durability: str, online: str, cycles: str, path: str, wal_pages: str = "0") -> None:
    """Runs in its own process: ``cycles`` poll cycles of 8 readings, as fast as they go. Prints JSON."""
    n = int(cycles)
    lines = readings(n * METERS, time.time_ns())
    extra = {"wal_pages": int(wal_pages)} if int(wal_pages) else {}
    spool = Spool.open(Path(path), max_bytes=256 << 20, max_age_s=365 * 86400, durability=durability, **extra)
    sender = Sender(spool, NullSink())  # type: ignore[arg-type]
    commits = [0]
    spool._db.set_trace_callback(  # type: ignore[union-attr]  # count the transactions SQLite commits
        lambda sql: commits.__setitem__(0, commits[0] + (sql.strip().upper() == "COMMIT")))
    before = _io()
    t = time.perf_counter()
    for c in range(n):
        spool.put(lines[c * METERS:(c + 1) * METERS])  # what the poller does each cycle
        if online == "up" or (online == "up-5s" and c % 5 == 4):
            sender.send_once()  # what the poked sender thread does next (or every 5th cycle)
    spool.close()  # includes the final checkpoint into the main file
    elapsed = time.perf_counter() - t
    after = _io()
    print(json.dumps({"wchar": after["wchar"] - before["wchar"], "write_bytes": after["write_bytes"] - before["write_bytes"],
                      "commits": commits[0], "readings": n * METERS, "seconds": elapsed}))


def _strace_counts(path: Path) -> dict[str, int]:
    counts = {}
    for row in path.read_text().splitlines():
        parts = row.split()
        if len(parts) >= 5 and parts[-1] in ("fsync", "fdatasync", "write", "pwrite64"):
            counts[parts[-1]] = int(parts[3])
    return counts


def write_cost(cycles: int, work: Path) -> None:
    strace = shutil.which("strace")
    print(f"\n== spool write cost: {METERS} meters x 1 Hz, {cycles} cycles ({cycles * METERS:,} readings) ==")
    print(f"{'durability':<10} {'InfluxDB':<8} {'wchar/reading':>14} {'block/reading':>14} {'commits/reading':>16}"
          f" {'fsyncs/reading':>15} {'MB/day (wchar)':>15} {'ms/cycle':>9}")
    for durability in ("process", "power"):
        for online in ("up", "up-5s", "down"):
            db = work / f"cost-{durability}-{online}.sqlite"
            cmd = [sys.executable, str(Path(__file__).resolve()), "_cost", durability, online, str(cycles), str(db)]
            trace = work / f"strace-{durability}-{online}.txt"
            if strace:
                cmd = [strace, "-f", "-qq", "-c", "-o", str(trace), "-e", "trace=fsync,fdatasync,write,pwrite64"] + cmd
            r = subprocess.run(cmd, capture_output=True, text=True, check=True)
            res = json.loads(r.stdout.strip().splitlines()[-1])
            n = res["readings"]
            syncs = "-"
            if strace:
                c = _strace_counts(trace)
                syncs = f"{(c.get('fsync', 0) + c.get('fdatasync', 0)) / n:.3f}"
            per_day = res["wchar"] / n * METERS * 86400 / 1e6
            print(f"{durability:<10} {online:<8} {res['wchar'] / n:>14,.0f} {res['write_bytes'] / n:>14,.0f} "
                  f"{res['commits'] / n:>16.3f} {syncs:>15} {per_day:>15,.0f} {res['seconds'] / cycles * 1000:>9.2f}")
    print("up = sent after every cycle (on each poke); up-5s = sent every 5th cycle (Sender min_send_interval_s=5); "
          "down = InfluxDB unreachable, the backlog grows")
    print("wchar = bytes SQLite handed to write(); block = /proc write_bytes (page-cache pages dirtied; the "
          "fast run lets the kernel merge rewrites of the same WAL pages, so this is a lower bound)")


def wal_bound_cost(cycles: int, work: Path) -> None:
    """The WAL bound's price: the shipped 256-page WAL beside SQLite's 1000-page default, same run."""
    from dcmon.spool import WAL_PAGES

    print(f"\n== WAL bound: write cost with the WAL checkpointed at {WAL_PAGES} pages (shipped) vs 1000 "
          f"(SQLite's default, before), durability process, {cycles} cycles ==")
    print(f"{'WAL pages':<10} {'InfluxDB':<8} {'wchar/reading':>14} {'block/reading':>14} {'MB/day (wchar)':>15}")
    res: dict[tuple[int, str], float] = {}
    for online in ("up", "down"):
        for pages in (WAL_PAGES, 1000):
            db = work / f"wal-{pages}-{online}.sqlite"
            cmd = [sys.executable, str(Path(__file__).resolve()), "_cost", "process", online, str(cycles), str(db),
                   str(pages)]
            r = subprocess.run(cmd, capture_output=True, text=True, check=True)
            out = json.loads(r.stdout.strip().splitlines()[-1])
            n = out["readings"]
            res[(pages, online)] = out["wchar"] / n
            print(f"{pages:<10} {online:<8} {out['wchar'] / n:>14,.0f} {out['write_bytes'] / n:>14,.0f} "
                  f"{out['wchar'] / n * METERS * 86400 / 1e6:>15,.0f}")
    for online in ("up", "down"):
        a, b = res[(WAL_PAGES, online)], res[(1000, online)]
        print(f"RATIO WAL bound cost, InfluxDB {online}: {a:,.0f} / {b:,.0f} bytes per reading = {a / b:.2f}x "
              f"({a - b:+,.0f} bytes per reading)")


def main() -> None:
    if len(sys.argv) in (6, 7) and sys.argv[1] == "_cost":
        cost_child(*sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=1_000_000, help="readings in the backfill (default 1,000,000)")
    ap.add_argument("--cycles", type=int, default=3600, help="poll cycles in the write-cost runs (default 3600 = 1 h)")
    ap.add_argument("--quick", action="store_true", help="20,000 lines and 300 cycles (smoke test)")
    ap.add_argument("--skip-backfill", action="store_true")
    ap.add_argument("--skip-cost", action="store_true")
    ap.add_argument("--dir", help="work folder (default: a temporary folder under /var/tmp, on disk)")
    args = ap.parse_args()
    if args.quick:
        args.lines, args.cycles = 20_000, 300
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-spool-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start; "
          f"python {sys.version.split()[0]}, sqlite {__import__('sqlite3').sqlite_version}; work folder {work}")
    try:
        if not args.skip_backfill:
            backfill(args.lines, work)
        if not args.skip_cost:
            write_cost(args.cycles, work)
            wal_bound_cost(args.cycles, work)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
