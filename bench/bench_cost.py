#!/usr/bin/env python3
"""What the poller costs: CPU per reading, peak memory, CPU at a typical load, start-up imports (issue 8).

Run:  .venv/bin/python bench/bench_cost.py [--seconds 60] [--quick]

Everything measured is a real ``dcmon run`` process (``python -m dcmon.cli run``): its CPU time from /proc
(all its threads: bus loops, sender, main loop) and its peak RSS (VmHWM). The meters are dcmon.simulator
ptys in a child process and the database a real influxd on 127.0.0.1 (tests/servers.py), so neither's CPU
counts. Readings are counted where they end up: in influxd.

Two workloads, each run by three variants of the poller, all six processes side by side over the same
``--seconds`` (together they use well under one of the two cores):
- 32 meters on 4 buses, zero-latency simulators, ``interval_s = 0`` (as fast as the buses go), the rest
  as shipped: CPU per reading (CPU seconds / readings that reached influxd) and peak RSS;
- 8 meters × 1 Hz on one bus with the wire timing of 9600 8N2 and a 10 ms meter turnaround (stricter than
  zero latency: pymodbus polls the port while it waits): CPU as % of one core.
Variants: ``shipped``; ``recv``: bench_bus's expected-length receive patched into dcmon.bus.Bus (the change
proposed for bus.py); ``recv+batch``: also no immediate send on every spooled cycle (``Sender.poke`` does
nothing, so the sender sends on its 5 s tick: one HTTP request per 5 s instead of one per bus cycle).

Start-up: wall time of ``import dcmon.cli``, of building its command tree (every ``dcmon`` command pays it)
and of everything ``dcmon run`` imports, each beyond ``python -c pass``; where that time goes.

Prints ``RATIO …`` lines with PASS/MISS; exits 0 once it could measure (a benchmark reports, it does not
fail CI), 1 with one line if it could not run (no influxd, simulator would not start).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))      # servers.Influxd: the same real influxd the tests use

from bench_bus import simulators  # noqa: E402  (same directory)
from servers import Influxd  # noqa: E402

TARGET_CPU_MS, TARGET_RSS_MB, TARGET_IDLE_PCT = 1.0, 50.0, 1.0
RUN_IMPORTS = "import dcmon.cli as c; c.build_parser(); import dcmon.spool, dcmon.sender, dcmon.influx, dcmon.systemd"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# ---------------------------------------------------------------------------------------- /proc

def cpu_seconds(pid: int) -> float:
    """CPU time of every live thread of ``pid``, from schedstat (ns); all of the poller's threads live for
    the whole run, so nothing is lost to threads that exited."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


def peak_rss_mb(pid: int) -> float:
    m = re.search(r"^VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(m.group(1)) / 1024 if m else float("nan")


# -------------------------------------------------------------------------------------- imports

def wall(code: str, repeats: int) -> float:
    """Best wall time of ``python -c code`` (a fresh interpreter each time, as a start-up is)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        best = min(best, time.perf_counter() - t)
    return best


def heaviest_imports(code: str, top: int = 6) -> list[tuple[str, float]]:
    """Packages by the import time of their own modules (``python -X importtime`` self times, summed by
    top-level package, dcmon by module: pydantic's time is pydantic's even when dcmon.config imported it), in ms."""
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True).stderr
    by_pkg: dict[str, float] = defaultdict(float)
    for line in err.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line)
        if m:
            name = m.group(2)
            key = name if name.startswith("dcmon.") else name.split(".")[0].lstrip("_")
            by_pkg[key] += int(m.group(1)) / 1000
    return sorted(by_pkg.items(), key=lambda kv: -kv[1])[:top]


def startup_report(*, quick: bool) -> str:
    repeats = 1 if quick else 3
    base = wall("pass", repeats)
    run_all = wall(RUN_IMPORTS, repeats)
    if quick:
        return (f"start-up (wall, one try, beyond `python -c pass` = {base * 1000:.0f} ms): everything `dcmon run` "
                f"imports {(run_all - base) * 1000:.0f} ms")
    cli = wall("import dcmon.cli", repeats)
    tree = wall("import dcmon.cli as c; c.build_parser()", repeats)
    rss = subprocess.run([sys.executable, "-c", RUN_IMPORTS + "; import resource; "
                          "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                         capture_output=True, text=True, check=True).stdout.split()[-1]
    return (f"start-up, best of {repeats} (wall, beyond `python -c pass` = {base * 1000:.0f} ms): import dcmon.cli "
            f"{(cli - base) * 1000:.0f} ms; its command tree (every dcmon command) {(tree - base) * 1000:.0f} ms; "
            f"everything `dcmon run` imports {(run_all - base) * 1000:.0f} ms, after which RSS is "
            f"{int(rss) / 1024:.1f} MB\n"
            "  where (self time by package, -X importtime): "
            + ", ".join(f"{k} {v:.0f} ms" for k, v in heaviest_imports(RUN_IMPORTS)))


# ----------------------------------------------------------------------------------- the poller

CONFIG = """
[poller]
interval_s = {interval}
host = "bench"

[spool]
path = "{spool}"

[influxdb]
url = "{url}"
database = "dcmon"
"""


def write_config(tmp: Path, name: str, paths: list[str], meters: int, interval: float, url: str) -> Path:
    text = CONFIG.format(interval=interval, spool=tmp / f"{name}.sqlite", url=url)
    for b, path in enumerate(paths):
        text += f'\n[buses.b{b}]\nport = "{path}"\n'
        for a in range(1, meters + 1):
            text += f'\n[[sensors]]\nname = "{name}_{b}_{a}"\nbus = "b{b}"\naddress = {a}\n'
    p = tmp / f"{name}.toml"
    p.write_text(text)
    return p


# The variants, side by side: the shipped command, and the same command with prototypes patched in first.
VARIANTS: dict[str, str] = {
    "shipped": "",
    "recv": "import bench_bus; bench_bus.patch_bus_class()",
    "recv+batch": ("import bench_bus; bench_bus.patch_bus_class(); import dcmon.sender; "
                   "dcmon.sender.Sender.poke = lambda self: None"),
}


class PollerProcess:
    """One ``dcmon run`` process, as shipped or with a variant's patches applied before dcmon.cli runs."""

    def __init__(self, cfg: Path, prefix: str, tmp: Path, *, patches: str = "") -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DCMON_")}
        env["DCMON_STATUS_PATH"] = str(tmp / f"{prefix}.status.json")
        args = ["run", "--config", str(cfg), "--no-print", "--log-level", "warning"]
        if patches:
            boot = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); {patches}; "
                    f"import dcmon.cli; dcmon.cli.run_main()")
            cmd = [sys.executable, "-c", boot, *args]
        else:
            cmd = [sys.executable, "-m", "dcmon.cli", *args]
        self.prefix = prefix
        self.status_path = Path(env["DCMON_STATUS_PATH"])
        self.log_path = tmp / f"{prefix}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def readings_taken(self, influx: Influxd, start_ns: int, end_ns: int) -> int:
        """Its readings in influxd whose time (taken when the meter answered) is in [start, end)."""
        return influx.count("dc_power", where=f"""WHERE "sensor" =~ /^{self.prefix}_/ """
                                                f"AND time >= {start_ns} AND time < {end_ns}")

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until its status file shows a good poll (start-up is not what is measured)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                sensors = json.loads(self.status_path.read_text()).get("sensors", {})
                if sum(s.get("polls_ok", 0) for s in sensors.values()) > 0:
                    return
            except (OSError, ValueError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace").strip().splitlines()
                raise SystemExit(f"bench: `dcmon run` did not start polling: {tail[-1] if tail else 'no output'}")
            time.sleep(0.1)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            status = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            status = self.proc.wait()
        self._log.close()
        return status


@dataclass
class Run:
    readings: int
    seconds: float
    cpu_s: float
    rss_mb: float
    exit_status: int

    @property
    def cpu_ms_per_reading(self) -> float:
        return 1000 * self.cpu_s / self.readings if self.readings else float("inf")

    @property
    def cpu_pct(self) -> float:
        return 100 * self.cpu_s / self.seconds


def measure(pollers: list[PollerProcess], influx: Influxd, seconds: float, settle_s: float = 1.0) -> list[Run]:
    """Measure running pollers side by side over the same window, stop them (SIGTERM: they flush), then
    count in influxd the readings each took within the window: a variant that sends late still counts
    all of its readings, and one that lost any is seen to."""
    try:
        for p in pollers:
            p.wait_ready()
        time.sleep(settle_s)                 # past start-up: imports, spool open, first connections
        start_ns, t0 = time.time_ns(), time.monotonic()
        cpu0 = [cpu_seconds(p.proc.pid) for p in pollers]
        time.sleep(seconds)
        end_ns, t1 = time.time_ns(), time.monotonic()
        cpu1 = [cpu_seconds(p.proc.pid) for p in pollers]
        rss = [peak_rss_mb(p.proc.pid) for p in pollers]
    finally:
        statuses = [p.stop() for p in pollers]
    return [Run(p.readings_taken(influx, start_ns, end_ns), t1 - t0, c1 - c0, r, st)
            for p, c0, c1, r, st in zip(pollers, cpu0, cpu1, rss, statuses)]


# ----------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[attr-defined]
    # SIGTERM unwinds like Ctrl-C, so influxd (its own session) and the pollers are stopped on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="measuring time (default 60)")
    ap.add_argument("--quick", action="store_true", help="1 s, one import timing (smoke test)")
    args = ap.parse_args(argv)
    seconds = 1.0 if args.quick else args.seconds
    names = list(VARIANTS)

    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start")
    with tempfile.TemporaryDirectory(prefix="dcmon-bench-") as tmpdir, contextlib.ExitStack() as stack:
        tmp = Path(tmpdir)
        if args.quick:   # beside influxd's start-up, which it then slows: good enough to see that it runs
            imports = stack.enter_context(concurrent.futures.ThreadPoolExecutor(1)).submit(startup_report, quick=True)
        else:
            print(startup_report(quick=False))
        try:
            influx = Influxd(tmp / "influxd").start()
        except RuntimeError as e:
            print(f"bench: cannot start influxd: {str(e).splitlines()[0]}", file=sys.stderr)
            return 1
        stack.callback(influx.stop)
        influx.create_db("dcmon")
        fast = stack.enter_context(simulators(4 * len(names), list(range(1, 9)), timing=False))
        wired = stack.enter_context(simulators(len(names), list(range(1, 9)), timing=True, turnaround_s=0.010))
        if args.quick:
            print(imports.result())
        pollers = []
        for i, name in enumerate(names):
            cfg = write_config(tmp, f"cost{i}", fast[4 * i:4 * i + 4], 8, 0.0, influx.url)
            pollers.append(PollerProcess(cfg, f"cost{i}", tmp, patches=VARIANTS[name]))
        for i, name in enumerate(names):
            cfg = write_config(tmp, f"idle{i}", wired[i:i + 1], 8, 1.0, influx.url)
            pollers.append(PollerProcess(cfg, f"idle{i}", tmp, patches=VARIANTS[name]))
        runs = measure(pollers, influx, seconds, settle_s=0.2 if args.quick else 2.0)
        cost, idle = runs[:len(names)], runs[len(names):]

    print(f"\n{'all ' + str(len(pollers)) + ' pollers side by side, ' + format(seconds, 'g') + ' s':<46}"
          + "".join(f"{n:>13}" for n in names))
    rows = [
        ("32 meters, 4 buses, zero latency, interval 0", None),
        ("  readings into influxd a second", [f"{r.readings / r.seconds:.0f}" for r in cost]),
        ("  poller CPU, % of one core", [f"{r.cpu_pct:.1f}" for r in cost]),
        ("  poller CPU a reading, ms", [f"{r.cpu_ms_per_reading:.3f}" for r in cost]),
        ("  peak RSS, MB", [f"{r.rss_mb:.1f}" for r in cost]),
        ("8 meters × 1 Hz, 9600 8N2 timing", None),
        ("  readings into influxd a second", [f"{r.readings / r.seconds:.2f}" for r in idle]),
        ("  poller CPU, % of one core", [f"{r.cpu_pct:.2f}" for r in idle]),
        ("  poller CPU a reading, ms", [f"{r.cpu_ms_per_reading:.3f}" for r in idle]),
        ("  peak RSS, MB", [f"{r.rss_mb:.1f}" for r in idle]),
        ("exit status after SIGTERM", [f"{a.exit_status}/{b.exit_status}" for a, b in zip(cost, idle)]),
    ]
    for label, cells in rows:
        print(f"{label:<46}" + "".join(f"{c:>13}" for c in cells or []))
    print()
    for name, c, d in zip(names, cost, idle):
        print(f"RATIO CPU per reading, {name} (poll, decode, spool, encode, send): {c.cpu_ms_per_reading:.3f} ms "
              f"(target ≤ {TARGET_CPU_MS:g} ms) {verdict(c.cpu_ms_per_reading <= TARGET_CPU_MS)}")
        print(f"RATIO peak RSS with 32 meters, {name}: {c.rss_mb:.1f} MB (target ≤ {TARGET_RSS_MB:g} MB) "
              f"{verdict(c.rss_mb <= TARGET_RSS_MB)}")
        print(f"RATIO CPU at 8 meters × 1 Hz, {name}: {d.cpu_pct:.2f} % of one core over {d.seconds:.0f} s "
              f"(target ≤ {TARGET_IDLE_PCT:g} %) {verdict(d.cpu_pct <= TARGET_IDLE_PCT)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        sys.exit(130)
