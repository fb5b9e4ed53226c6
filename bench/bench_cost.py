#!/usr/bin/env python3
"""What the poller costs: CPU per reading, peak memory, CPU and disk writes at a typical load, start-up (issue 8).

Run:  .venv/bin/python bench/bench_cost.py [--seconds 60] [--quick]

Everything measured is a real ``dcmon run`` process: its CPU time from /proc (all its threads: bus loops,
sender, main loop), its peak RSS (VmHWM) and the bytes it caused to be written to disk (``write_bytes`` of
/proc/<pid>/io: page-cache pages it dirtied, each counted once until the kernel writes it back; a page
rewritten before writeback reaches the disk once, so this is close to what an SD card sees). The spools live
on a real disk (under /var/tmp), the status files on tmpfs (as /run/dcmon on the Pi). The meters are
dcmon.simulator ptys in a child process and the database a real influxd on 127.0.0.1 (tests/servers.py), so
neither's CPU counts. Readings are counted where they end up: in influxd, by their timestamps.

Two workloads, each run with the sender's ``min_send_interval_s`` at 0 (shipped default: a send after every
spooled bus cycle) and at 5 s (at most one HTTP request per 5 s; the spool then holds more rows between
sends), all four processes side by side over the same ``--seconds``:
- 32 meters on 4 buses, zero-latency simulators, ``interval_s = 0`` (as fast as the buses go): CPU per
  reading (CPU seconds / readings that reached influxd) and peak RSS;
- 8 meters × 1 Hz on one bus with the wire timing of 9600 8N2 and a 10 ms meter turnaround: CPU as % of one
  core, and disk bytes per reading (the SD-card cost).
``min_send_interval_s`` is not in the config file: the 5 s process sets the Sender's default before
dcmon.cli runs.

Beside them, the same two workloads with a second output, "InfluxDB + MQTT": ``[mqtt]`` on a real mosquitto
with ``stream = true``, so every reading also goes into a second spool (spool-mqtt.sqlite) drained by a second
sender, and each reading is also published as its meter's state. Compared with "InfluxDB alone" (the shipped
variant above): CPU per reading, peak RSS, and disk writes per reading (what the second spool costs the SD card).

Start-up: wall time of ``import dcmon.cli``, of building its command tree (every ``dcmon`` command pays it)
and of everything ``dcmon run`` imports, each beyond ``python -c pass``, with a bytecode cache as an
installed package has (this checkout runs with PYTHONDONTWRITEBYTECODE=1: the tree is also timed without);
then where the command tree's time goes, import by import.

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
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))      # servers.Influxd: the same real influxd the tests use

from bench_bus import simulators  # noqa: E402  (same directory)
from servers import Influxd, Mosquitto  # noqa: E402

TARGET_CPU_MS, TARGET_RSS_MB, TARGET_IDLE_PCT = 1.0, 50.0, 1.0
NO_EXIT = "; import os; os._exit(0)"     # leave without tearing the modules down: what the exit costs
RUN_IMPORTS = "import dcmon.cli as c; c.build_parser(); import dcmon.spool, dcmon.sender, dcmon.outputs.influx, dcmon.systemd"
SEND_INTERVALS = (0.0, 5.0)           # Sender(min_send_interval_s=...): shipped default, and batched


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


def write_bytes(pid: int) -> int:
    """Bytes the process caused to be written to block devices (pages dirtied; tmpfs and sockets not)."""
    m = re.search(r"^write_bytes:\s+(\d+)", Path(f"/proc/{pid}/io").read_text(), re.M)
    return int(m.group(1)) if m else 0


def fs_type(path: Path) -> str:
    """The file system ``path`` is on (the longest mount point that contains it)."""
    best, kind = "", "?"
    for row in Path("/proc/mounts").read_text().splitlines():
        _, mount, fstype, *_ = row.split()
        if (str(path) + "/").startswith(mount.rstrip("/") + "/") and len(mount) > len(best):
            best, kind = mount, fstype
    return kind


def peak_rss_mb(pid: int) -> float:
    m = re.search(r"^VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(m.group(1)) / 1024 if m else float("nan")


# -------------------------------------------------------------------------------------- imports

# Imported one after another in a fresh interpreter, each step timed: where `dcmon --help` spends its time
# (dcmon.cli's command modules import these at their top, so every dcmon command pays all of them).
STEPS = """
import importlib, json, time
out = {}
def step(label, fn):
    t = time.perf_counter(); fn(); out[label] = (time.perf_counter() - t) * 1000
step("dcmon.models", lambda: importlib.import_module("dcmon.models"))
step("dcmon.config (dataclasses + dcmon.schema)", lambda: importlib.import_module("dcmon.config"))
step("pymodbus.client (via dcmon.bus)", lambda: importlib.import_module("pymodbus.client"))
step("httpx (via dcmon.tools.grafana)", lambda: importlib.import_module("httpx"))
step("tomlkit (via dcmon.calibration)", lambda: importlib.import_module("tomlkit"))
step("the rest of dcmon + the argparse tree", lambda: importlib.import_module("dcmon.cli").build_parser())
print(json.dumps(out))
"""


def cached_env(cache: Path) -> dict[str, str]:
    """Environment with a bytecode cache (as an installed package has: pip compiles .pyc at install time)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(cache)
    return env


def walls(runs: dict[str, tuple[str, dict[str, str] | None]], repeats: int) -> dict[str, float]:
    """Best wall time of each ``python -c code`` (a fresh interpreter each time, as a start-up is), taken
    round-robin so that a machine whose speed drifts slows them all alike. ``runs``: name → (code, env)."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, (code, env) in runs.items():
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, env=env, stdout=subprocess.DEVNULL)
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def tree_steps(repeats: int, env: dict[str, str]) -> dict[str, float]:
    """Each STEPS step's best time over ``repeats`` fresh interpreters, in ms."""
    best: dict[str, float] = {}
    for _ in range(repeats):
        got = json.loads(subprocess.run([sys.executable, "-c", STEPS], env=env, capture_output=True, text=True,
                                        check=True).stdout)
        for k, v in got.items():
            best[k] = min(best.get(k, v), v)
    return best


def startup_report(cache: Path, *, quick: bool) -> str:
    env = cached_env(cache)
    subprocess.run([sys.executable, "-c", RUN_IMPORTS], check=True, env=env)   # fill the bytecode cache
    repeats = 1 if quick else 7
    tree = "import dcmon.cli as c; c.build_parser()"
    runs: dict[str, tuple[str, dict[str, str] | None]] = {"base": ("pass", env), "run": (RUN_IMPORTS, env)}
    if not quick:
        runs |= {"cli": ("import dcmon.cli", env), "tree": (tree, env), "tree, no exit": (tree + NO_EXIT, env),
                 "base, no cache": ("pass", None), "tree, no cache": (tree, None)}
    ms = {k: 1000 * v for k, v in walls(runs, repeats).items()}
    base = ms["base"]
    if quick:
        return (f"start-up (wall, one try, with a bytecode cache, beyond `python -c pass` = {base:.0f} ms): "
                f"everything `dcmon run` imports {ms['run'] - base:.0f} ms")
    rss = subprocess.run([sys.executable, "-c", RUN_IMPORTS + "; import resource; "
                          "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                         capture_output=True, text=True, check=True, env=env).stdout.split()[-1]
    steps = tree_steps(repeats, env)
    return (f"start-up, best of {repeats} (wall, with a bytecode cache, beyond `python -c pass` = {base:.0f} ms): "
            f"import dcmon.cli {ms['cli'] - base:.0f} ms; its command tree (every dcmon command, --help too) "
            f"{ms['tree'] - base:.0f} ms, of which {ms['tree'] - ms['tree, no exit']:.0f} ms is the interpreter's "
            f"exit tearing those modules down ({ms['tree, no cache'] - ms['base, no cache']:.0f} ms without a "
            f"bytecode cache, as this checkout runs); everything `dcmon run` imports {ms['run'] - base:.0f} ms, "
            f"after which RSS is {int(rss) / 1024:.1f} MB\n"
            f"  where the command tree's import time goes (in this order, in one interpreter, best of {repeats}; "
            f"sum {sum(steps.values()):.0f} ms): " + ", ".join(f"{k} {v:.0f} ms" for k, v in steps.items()))


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


def write_config(disk: Path, name: str, paths: list[str], meters: int, interval: float, url: str,
                 extra: str = "") -> Path:
    text = CONFIG.format(interval=interval, spool=disk / f"{name}.sqlite", url=url) + extra
    for b, path in enumerate(paths):
        text += f'\n[buses.b{b}]\nport = "{path}"\n'
        for a in range(1, meters + 1):
            text += f'\n[[sensors]]\nname = "{name}_{b}_{a}"\nbus = "b{b}"\naddress = {a}\n'
    p = disk / f"{name}.toml"
    p.write_text(text)
    return p


def variant_name(send_interval_s: float) -> str:
    return f"min_send_interval_s = {send_interval_s:g}" + (" (shipped)" if send_interval_s == 0 else "")


class PollerProcess:
    """One ``dcmon run`` process, its Sender's ``min_send_interval_s`` set before dcmon.cli runs (the config
    file has no such setting). Both variants start the same way, so they pay the same."""

    def __init__(self, cfg: Path, prefix: str, runtime: Path, *, send_interval_s: float) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DCMON_")}
        env["DCMON_STATUS_PATH"] = str(runtime / f"{prefix}.status.json")   # tmpfs, as /run/dcmon
        args = ["run", "--config", str(cfg), "--no-print", "--log-level", "warning"]
        boot = (f"import dcmon.sender; dcmon.sender.Sender.__init__.__kwdefaults__['min_send_interval_s'] = "
                f"{send_interval_s!r}; import dcmon.cli; dcmon.cli.run_main()")
        self.prefix = prefix
        self.status_path = Path(env["DCMON_STATUS_PATH"])
        self.log_path = runtime / f"{prefix}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-c", boot, *args], env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)

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
    disk_bytes: int
    exit_status: int

    @property
    def cpu_ms_per_reading(self) -> float:
        return 1000 * self.cpu_s / self.readings if self.readings else float("inf")

    @property
    def cpu_pct(self) -> float:
        return 100 * self.cpu_s / self.seconds

    @property
    def bytes_per_reading(self) -> float:
        return self.disk_bytes / self.readings if self.readings else float("inf")


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
        io0 = [write_bytes(p.proc.pid) for p in pollers]
        time.sleep(seconds)
        end_ns, t1 = time.time_ns(), time.monotonic()
        cpu1 = [cpu_seconds(p.proc.pid) for p in pollers]
        io1 = [write_bytes(p.proc.pid) for p in pollers]
        rss = [peak_rss_mb(p.proc.pid) for p in pollers]
    finally:
        statuses = [p.stop() for p in pollers]
    return [Run(p.readings_taken(influx, start_ns, end_ns), t1 - t0, c1 - c0, r, w1 - w0, st)
            for p, c0, c1, w0, w1, r, st in zip(pollers, cpu0, cpu1, io0, io1, rss, statuses)]


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
    names = [variant_name(v) for v in SEND_INTERVALS]

    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start")
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(prefix="dcmon-bench-", dir="/var/tmp") as disk_dir, \
            tempfile.TemporaryDirectory(prefix="dcmon-bench-", dir=shm if shm.is_dir() else None) as run_dir, \
            contextlib.ExitStack() as stack:
        disk, runtime = Path(disk_dir), Path(run_dir)
        if args.quick:   # beside influxd's start-up, which it then slows: good enough to see that it runs
            imports = stack.enter_context(concurrent.futures.ThreadPoolExecutor(1)).submit(
                startup_report, runtime / "pyc", quick=True)
        else:
            print(startup_report(runtime / "pyc", quick=False))
        print(f"spools in {disk} ({fs_type(disk)}), status files in {runtime} ({fs_type(runtime)})")
        try:
            influx = Influxd(disk / "influxd").start()
        except RuntimeError as e:
            print(f"bench: cannot start influxd: {str(e).splitlines()[0]}", file=sys.stderr)
            return 1
        stack.callback(influx.stop)
        influx.create_db("dcmon")
        try:
            broker = Mosquitto(disk / "mosquitto").start()
        except RuntimeError as e:
            print(f"bench: cannot start mosquitto: {str(e).splitlines()[0]}", file=sys.stderr)
            return 1
        stack.callback(broker.stop)
        mqtt = f'\n[mqtt]\nenabled = true\nurl = "{broker.url}"\nstream = true\n'
        fast = stack.enter_context(simulators(4 * len(names) + 4, list(range(1, 9)), timing=False))
        wired = stack.enter_context(simulators(len(names) + 1, list(range(1, 9)), timing=True, turnaround_s=0.010))
        if args.quick:
            print(imports.result())
        pollers = []
        for i, v in enumerate(SEND_INTERVALS):
            cfg = write_config(disk, f"cost{i}", fast[4 * i:4 * i + 4], 8, 0.0, influx.url)
            pollers.append(PollerProcess(cfg, f"cost{i}", runtime, send_interval_s=v))
        for i, v in enumerate(SEND_INTERVALS):
            cfg = write_config(disk, f"idle{i}", wired[i:i + 1], 8, 1.0, influx.url)
            pollers.append(PollerProcess(cfg, f"idle{i}", runtime, send_interval_s=v))
        n = len(names)
        cfg = write_config(disk, "mqcost0", fast[4 * n:4 * n + 4], 8, 0.0, influx.url, mqtt)
        pollers.append(PollerProcess(cfg, "mqcost0", runtime, send_interval_s=0.0))
        cfg = write_config(disk, "mqidle0", wired[n:n + 1], 8, 1.0, influx.url, mqtt)
        pollers.append(PollerProcess(cfg, "mqidle0", runtime, send_interval_s=0.0))
        runs = measure(pollers, influx, seconds, settle_s=0.2 if args.quick else 2.0)
        cost, idle, (mq_cost, mq_idle) = runs[:n], runs[n:2 * n], runs[2 * n:]

    width = 30
    print(f"\n{'all ' + str(len(pollers)) + ' pollers side by side, ' + format(seconds, 'g') + ' s':<46}"
          + "".join(f"{n:>{width}}" for n in names))
    rows = [
        ("32 meters, 4 buses, zero latency, interval 0", None),
        ("  readings into influxd a second", [f"{r.readings / r.seconds:.0f}" for r in cost]),
        ("  poller CPU, % of one core", [f"{r.cpu_pct:.1f}" for r in cost]),
        ("  poller CPU a reading, ms", [f"{r.cpu_ms_per_reading:.3f}" for r in cost]),
        ("  peak RSS, MB", [f"{r.rss_mb:.1f}" for r in cost]),
        ("  disk writes a reading, bytes", [f"{r.bytes_per_reading:,.0f}" for r in cost]),
        ("8 meters × 1 Hz, 9600 8N2 timing", None),
        ("  readings into influxd a second", [f"{r.readings / r.seconds:.2f}" for r in idle]),
        ("  poller CPU, % of one core", [f"{r.cpu_pct:.2f}" for r in idle]),
        ("  poller CPU a reading, ms", [f"{r.cpu_ms_per_reading:.3f}" for r in idle]),
        ("  peak RSS, MB", [f"{r.rss_mb:.1f}" for r in idle]),
        ("  disk writes a reading, bytes", [f"{r.bytes_per_reading:,.0f}" for r in idle]),
        ("  disk writes a day at this rate, MB", [f"{r.disk_bytes / r.seconds * 86400 / 1e6:,.0f}" for r in idle]),
        ("exit status after SIGTERM", [f"{a.exit_status}/{b.exit_status}" for a, b in zip(cost, idle)]),
    ]
    for label, cells in rows:
        print(f"{label:<46}" + "".join(f"{c:>{width}}" for c in cells or []))
    print()
    (c0, d0), (c5, d5) = zip(cost, idle)
    print(f"trade-off, min_send_interval_s {SEND_INTERVALS[0]:g} → {SEND_INTERVALS[1]:g} s at 8 meters × 1 Hz: "
          f"CPU {d0.cpu_pct:.2f} → {d5.cpu_pct:.2f} % of one core ({d0.cpu_ms_per_reading:.3f} → "
          f"{d5.cpu_ms_per_reading:.3f} ms a reading), disk writes {d0.bytes_per_reading:,.0f} → "
          f"{d5.bytes_per_reading:,.0f} bytes a reading; at 32 meters, interval 0: CPU "
          f"{c0.cpu_ms_per_reading:.3f} → {c5.cpu_ms_per_reading:.3f} ms a reading, disk writes "
          f"{c0.bytes_per_reading:,.0f} → {c5.bytes_per_reading:,.0f} bytes a reading")
    both = ["InfluxDB alone", "InfluxDB + MQTT (stream)"]
    print(f"\n{'second output, min_send_interval_s = 0':<46}" + "".join(f"{n:>{width}}" for n in both))
    for label, pair in [
        ("32 meters, 4 buses, zero latency, interval 0", None),
        ("  readings a second into influxd", [f"{r.readings / r.seconds:.0f}" for r in (c0, mq_cost)]),
        ("  poller CPU a reading, ms", [f"{r.cpu_ms_per_reading:.3f}" for r in (c0, mq_cost)]),
        ("  peak RSS, MB", [f"{r.rss_mb:.1f}" for r in (c0, mq_cost)]),
        ("  disk bytes written a reading", [f"{r.bytes_per_reading:,.0f}" for r in (c0, mq_cost)]),
        ("8 meters × 1 Hz, 9600 8N2 timing", None),
        ("  poller CPU, % of one core", [f"{r.cpu_pct:.2f}" for r in (d0, mq_idle)]),
        ("  poller CPU a reading, ms", [f"{r.cpu_ms_per_reading:.3f}" for r in (d0, mq_idle)]),
        ("  peak RSS, MB", [f"{r.rss_mb:.1f}" for r in (d0, mq_idle)]),
        ("  disk bytes written a reading", [f"{r.bytes_per_reading:,.0f}" for r in (d0, mq_idle)]),
        ("exit status after SIGTERM, both workloads", [f"{c0.exit_status}/{d0.exit_status}",
                                                       f"{mq_cost.exit_status}/{mq_idle.exit_status}"]),
    ]:
        print(f"{label:<46}" + "".join(f"{c:>{width}}" for c in pair or []))
    print(f"RATIO CPU per reading, InfluxDB + MQTT / InfluxDB alone (32 meters): "
          f"{mq_cost.cpu_ms_per_reading / c0.cpu_ms_per_reading:.2f}×; at 8 meters × 1 Hz: "
          f"{mq_idle.cpu_ms_per_reading / d0.cpu_ms_per_reading:.2f}×")
    print(f"RATIO disk writes per reading, InfluxDB + MQTT / InfluxDB alone (8 meters × 1 Hz): "
          f"{mq_idle.bytes_per_reading / d0.bytes_per_reading:.2f}× ({d0.bytes_per_reading:,.0f} → "
          f"{mq_idle.bytes_per_reading:,.0f} bytes)")
    print(f"RATIO peak RSS with 32 meters, InfluxDB + MQTT: {mq_cost.rss_mb:.1f} MB (target ≤ {TARGET_RSS_MB:g} MB) "
          f"{verdict(mq_cost.rss_mb <= TARGET_RSS_MB)}")
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
