#!/usr/bin/env python3
"""Bus throughput against the RS485 wire limit, and scaling over parallel buses (issue 8).

Run:  .venv/bin/python bench/bench_bus.py [--seconds 10] [--meters 10] [--turnaround 0.010] [--quick]

The meters are dcmon.simulator instances with ``timing=True``, one pty per bus, in a child process (so their
CPU is not ours); the poller is dcmon's own Poller + bus_loop at interval 0, in this process. Timing model of
one read, 9600 8N2 (11 bits a character, 1.146 ms):

    request 8 chars | 3.5-char silence (the meter sees the frame end) | turnaround | reply 21 chars
    | 3.5-char silence before the next request (Bus.gap_s)

= (8 + 21 + 2 × 3.5) chars + turnaround. ``Simulator(timing=True)`` models the request, its end-of-frame
silence, ``turnaround_s`` and the reply itself; the Bus is given ``gap_s = 3.5 chars``. A calibration line
checks the simulator's real request→reply time against the model before anything is measured.

Side by side: the Bus as shipped (``dcmon.bus._RtuClient`` receives a reply by its expected length: two
blocking reads, no polling), the same Bus with pymodbus's stock receive put back as a reference (it polls
``in_waiting`` every 4 character times and returns only after one poll sees no new byte), and the shipped
default ``gap_s = 0.02``. A short instrumented run of each receive says where the time goes (the "why" lines).
Rates are counted between read completions (the first and last in the window), not over a fixed window
that would cut a read in half.

Line noise (issue 12), each on its own simulated line (``dcmon.simulator.LineFaults``) in the same child: the
median bus time of a read of one meter through ``dcmon.bus.Bus`` with 1 and 3 junk bytes before the reply, the
adapter's echo of the request, a foreign-address reply first, a reply cut short after 10 bytes and then the good
one, beside a clean read, for the shipped receive and pymodbus's stock one; the target is on the time beyond the
extra bytes' own wire time. A dead meter: the healthy meters' reads/s on a bus of 8 with one silent (measured once
its back-off began) against the same bus with all 8 healthy × 7/8, with the poller before issue 12 (every meter
every cycle, retries + 1 tries) as the reference row.

Prints ``RATIO <what>: <numbers> (target …) PASS|MISS`` lines for the shipped Bus; always exits 0 once it
could measure (a benchmark reports, it does not fail CI); 1 with one line if it could not run at all.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import selectors
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import serial
from pymodbus.client import ModbusSerialClient

from dcmon import config, schema
from dcmon import poller as poller_mod
from dcmon.bus import Bus, BusSettings
from dcmon.errors import BusError, DeviceError
from dcmon.meter import read_values
from dcmon.models import PZEM017
from dcmon.poller import Poller, bus_loop
from dcmon.simulator import crc16

BAUD = 9600
CHAR_S = 11 / BAUD              # 8N2: start + 8 data + 2 stop bits
REQUEST_CHARS, REPLY_CHARS = 8, 21  # read 8 input registers of a PZEM-017: 01 04 0000 0008 CRC / 01 04 10 <16> CRC
SILENCE_CHARS = 3.5
TARGET_PCT = 97.0               # issue 12: the clean line stays at ≥ 97 % of the wire limit
TARGET_SCALING_PER_BUS = 0.9     # 4 buses: ≥ 3.6 × one bus


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def wire_time_s(turnaround_s: float) -> float:
    """One read at the wire limit: both frames, both 3.5-character silences, the meter's turnaround."""
    return (REQUEST_CHARS + REPLY_CHARS + 2 * SILENCE_CHARS) * CHAR_S + turnaround_s


# ------------------------------------------------------------------------------------- simulators

SERVE = """
import json, sys
from dcmon.simulator import Simulator, meters_for
count, addresses, timing, turnaround_s, scenarios = json.loads(sys.argv[1])
sims = [Simulator(meters_for([("pzem017", a) for a in addresses]), timing=timing, turnaround_s=turnaround_s).start()
        for _ in range(count)]
for spec in scenarios:           # one more simulator per line-fault scenario (issue 12)
    sim = Simulator(meters_for([("pzem017", a) for a in spec.get("addresses", addresses)]), timing=timing,
                    turnaround_s=turnaround_s).start()
    sim.echo = bool(spec.get("echo"))
    for a, f in spec.get("faults", {}).items():
        sim.faults(int(a)).update(f)
    for a in spec.get("silent", []):
        sim.meter(a).silent = True
    sims.append(sim)
print(json.dumps([s.path for s in sims]), flush=True)
sys.stdin.read()                     # serve until the bench closes our stdin (or exits, however it exits)
for s in sims:
    s.stop()
"""


@contextlib.contextmanager
def simulators(count: int, addresses: list[int], *, timing: bool, turnaround_s: float = 0.0,
               scenarios: list[dict] | None = None) -> Iterator[list[str]]:
    """``count`` simulated buses (dcmon.simulator, each on its own pty) serving ``addresses``, plus one per
    line-fault scenario (``{"echo": bool, "faults": {address: LineFaults spec}, "silent": [address],
    "addresses": [...]}``), in a child process: a real bus's meters do not use the poller's CPU, and neither
    may these. Yields the pty paths, the scenarios' after the ``count`` plain ones."""
    spec = json.dumps([count, addresses, timing, turnaround_s, scenarios or []])
    proc = subprocess.Popen([sys.executable, "-c", SERVE, spec], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        line = proc.stdout.readline() if sel.select(30) else ""
        sel.close()
        if not line:
            proc.kill()
            err = proc.stderr.read().strip().splitlines()
            raise SystemExit(f"bench: the simulators did not start: {err[-1] if err else 'no output'}")
        yield json.loads(line)
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def measure_reply_latency(path: str, samples: int = 10) -> float:
    """Median seconds from writing a read request to the last reply byte, straight through pyserial."""
    body = bytes([1, 0x04, 0, 0, 0, 8])
    request = body + crc16(body)
    times = []
    with serial.Serial(path, BAUD, stopbits=2, timeout=1.0) as port:
        for _ in range(samples):
            port.reset_input_buffer()
            t = time.monotonic()
            port.write(request)
            reply = port.read(REPLY_CHARS)
            times.append(time.monotonic() - t)
            if len(reply) != REPLY_CHARS:
                raise SystemExit(f"bench: the simulator on {path} answered {len(reply)} of {REPLY_CHARS} bytes")
            time.sleep(SILENCE_CHARS * CHAR_S)
    return statistics.median(times)


# ---------------------------------------------------------------------------------- the reference

def stock_recv(poller: Poller) -> None:
    """Put pymodbus's own ``ModbusSerialClient.recv`` back on every bus (what dcmon.bus shipped before its
    expected-length receive): the reference row, so the gain stays visible."""
    for bus in poller.buses.values():
        client = bus._client  # noqa: SLF001 - a benchmark reference, not a change to Bus
        client.recv = types.MethodType(ModbusSerialClient.recv, client)  # type: ignore[method-assign]


# ----------------------------------------------------------------------------------- measurements

CONFIG = """
[poller]
interval_s = 0
settle_s = 0
health_interval_s = 0
host = "bench"
log_level = "warning"

[influxdb]
enabled = false
"""


def make_config(tmp: Path, paths: list[str], meters: int, gap_s: float) -> config.Config:
    text = CONFIG
    for b, path in enumerate(paths):
        text += f'\n[buses.b{b}]\nport = "{path}"\ntimeout_s = 0.5\nretries = 1\ngap_s = {gap_s!r}\n'
        for a in range(1, meters + 1):
            text += f'\n[[sensors]]\nname = "m{b}_{a}"\nbus = "b{b}"\naddress = {a}\n'
    p = tmp / f"bench-{len(paths)}-{gap_s}.toml"
    p.write_text(text)
    return config.load(p, env={})


@dataclass
class Result:
    reads_per_s: float
    failed: int


def run_poller(cfg: config.Config, seconds: float, prepare: Callable[[Poller], None] | None = None,
               warmup_s: float = 0.2, count: set[str] | None = None,
               ready: Callable[[Poller], bool] | None = None) -> Result:
    """The real poll loops (one thread per bus, interval 0) for ``seconds`` after a warm-up (and, with
    ``ready``, once it is true). Each bus's rate is its good reads (of the sensors in ``count``, default all)
    between its first and last read completion in the window, over the time between them (the poller reports
    progress after every meter), so a short window is not off by a read cut in half; the buses' rates are
    summed."""
    marks: dict[str, list[tuple[float, int]]] = {}

    def on_progress(name: str) -> None:   # called by the bus's own thread after each meter
        bus = name.partition(":")[2]
        ok = sum(poller.states[s.name].polls_ok for s in cfg.enabled_sensors(bus) if count is None or s.name in count)
        marks.setdefault(bus, []).append((time.monotonic(), ok))

    poller = Poller(cfg, put=lambda lines: None, progress=on_progress)
    if prepare:
        prepare(poller)
    stop = threading.Event()
    threads = [threading.Thread(target=bus_loop, args=(poller, name, stop), daemon=True) for name in poller.buses]
    for t in threads:
        t.start()
    failed = lambda: sum(s.polls_failed for s in poller.states.values())  # noqa: E731
    time.sleep(warmup_s)
    until = time.monotonic() + 30
    while ready is not None and not ready(poller) and time.monotonic() < until:
        time.sleep(0.05)
    t0, bad0 = time.monotonic(), failed()
    time.sleep(seconds)
    t1, bad1 = time.monotonic(), failed()
    stop.set()
    for t in threads:
        t.join(timeout=5)
    poller.close()
    rate = 0.0
    for bus_marks in marks.values():
        inside = [(t, ok) for t, ok in bus_marks if t0 <= t <= t1]
        if len(inside) >= 2 and inside[-1][0] > inside[0][0]:
            rate += (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])
    return Result(rate, bad1 - bad0)


def why(cfg: config.Config, seconds: float, reply_latency_s: float,
        prepare: Callable[[Poller], None] | None) -> str:
    """Instrument one bus: how long recv() takes beyond the simulator's measured reply time (so the time
    after the last byte that is spent noticing it), and how many ``in_waiting`` polls it makes per read."""
    spans: list[float] = []
    polls = [0]

    def instrument(poller: Poller) -> None:
        if prepare:
            prepare(poller)
        for bus in poller.buses.values():
            client = bus._client  # noqa: SLF001
            inner_recv, inner_waiting = client.recv, client._in_waiting  # noqa: SLF001

            def recv(size: int | None, _inner: Callable = inner_recv) -> bytes:
                t = time.monotonic()
                data = _inner(size)
                spans.append(time.monotonic() - t)
                return data

            def in_waiting(_inner: Callable = inner_waiting) -> int:
                polls[0] += 1
                return _inner()

            client.recv = recv  # type: ignore[method-assign]
            client._in_waiting = in_waiting  # type: ignore[method-assign]  # noqa: SLF001

    run_poller(cfg, seconds, instrument, warmup_s=0.0)
    if not spans:
        return "no reads"
    late = statistics.mean(spans) - reply_latency_s
    return (f"recv() returns {late * 1000:+.1f} ms after the reply's last byte on average "
            f"({len(spans)} reads, {polls[0] / len(spans):.1f} in_waiting polls per read)")


# ----------------------------------------------------------------------- line noise (issue 12)

# (label, scenario for the simulator, bytes it adds on the wire per read). The echo adds none: a half-duplex
# adapter echoes while it sends our request (the simulator writes it at once, before the reply's wire time).
GLITCHES: list[tuple[str, dict, int]] = [
    ("clean line", {}, 0),
    ("1 junk byte (0x00) first", {"faults": {"1": {"junk": "00"}}}, 1),
    ("3 junk bytes first", {"faults": {"1": {"junk": "00 ff 01"}}}, 3),
    ("local echo of the request", {"echo": True}, 0),
    ("a foreign-address reply first", {"faults": {"1": {"foreign": 7}}}, REPLY_CHARS),
    ("truncated (10 bytes), then good", {"faults": {"1": {"truncate": 10}}}, 10),
]
TARGET_EXTRA_MS = 2.0
DEAD_BUS, DEAD_ADDRESS = 8, 4
TARGET_DEAD_PCT = 90.0


@dataclass
class Cost:
    per_read_s: float
    reads: int
    failed: int


def read_costs(paths: list[str], reads: int, gap_s: float, *, max_failures: int) -> dict[tuple[int, bool], Cost]:
    """Median bus time of a read of address 1 through dcmon.bus.Bus (timeout 0.5 s, 1 retry, a 3.5-character
    gap) on each pair of paths (two lines with the same faults), with the shipped receive (False) on the first
    and pymodbus's stock one (True) on the second: keyed (pair index, stock). Round-robin, one read of each in turn, so that the load of this shared machine falls on every row
    alike; the median, so that a hiccup in one read does not move a row by milliseconds. Failed reads count at
    what they cost; a row stops after ``max_failures`` failures."""
    buses: dict[tuple[int, bool], Bus] = {}
    times: dict[tuple[int, bool], list[float]] = {}
    failed: dict[tuple[int, bool], int] = {}
    with contextlib.ExitStack() as stack:
        for i, pair in enumerate(zip(paths[0::2], paths[1::2])):
            for stock, path in zip((False, True), pair):     # a line each: a Bus locks its port
                bus = stack.enter_context(Bus(BusSettings(name=f"noise{i}", port=path, timeout_s=0.5, retries=1,
                                                          gap_s=gap_s)))
                if stock:
                    client = bus._client  # noqa: SLF001 - the reference row, as stock_recv does for the poller
                    client.recv = types.MethodType(ModbusSerialClient.recv, client)  # type: ignore[method-assign]
                with contextlib.suppress(BusError, DeviceError):
                    read_values(bus, PZEM017, 1)            # the first exchange: not timed
                buses[(i, stock)], times[(i, stock)], failed[(i, stock)] = bus, [], 0
        for _ in range(reads):
            for key, bus in buses.items():
                if failed[key] >= max_failures:
                    continue
                t = time.monotonic()
                try:
                    read_values(bus, PZEM017, 1)
                except (BusError, DeviceError):
                    failed[key] += 1
                times[key].append(time.monotonic() - t)
    return {k: Cost(statistics.median(v), len(v), failed[k]) for k, v in times.items()}


@contextlib.contextmanager
def no_backoff() -> Iterator[None]:
    """The reference for the dead-meter rows: every meter polled every cycle with retries + 1 tries (the
    poller before issue 12), by switching SensorState's back-off off for the run."""
    down_after, tries = poller_mod.DOWN_AFTER, poller_mod.SensorState.tries
    poller_mod.DOWN_AFTER = 10**9
    poller_mod.SensorState.tries = property(lambda self: None)  # type: ignore[assignment,method-assign]
    try:
        yield
    finally:
        poller_mod.DOWN_AFTER = down_after
        poller_mod.SensorState.tries = tries  # type: ignore[method-assign]


def backed_off(name: str) -> Callable[[Poller], bool]:
    return lambda poller: poller.states[name].backoff_s > 0


# ------------------------------------------------------------------------------------------- main

SHIPPED = "shipped (expected-length recv)"
STOCK = "reference: pymodbus stock recv"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="measuring time per row (default 10)")
    ap.add_argument("--meters", type=int, default=10, help="meters per bus (default 10)")
    ap.add_argument("--buses", type=int, default=4, help="buses for the scaling rows (default 4)")
    ap.add_argument("--turnaround", type=float, default=0.010, help="meter turnaround in seconds (default 0.010)")
    ap.add_argument("--quick", action="store_true", help="0.6 s a row, no default-gap row (smoke test)")
    args = ap.parse_args(argv)
    seconds = 0.6 if args.quick else args.seconds
    # the stock-receive rows fail on purpose under line noise: pymodbus's own "no response" lines are expected
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

    per_read = wire_time_s(args.turnaround)
    max_rate = 1 / per_read
    gap = SILENCE_CHARS * CHAR_S
    addresses = list(range(1, args.meters + 1))
    print(f"bus throughput: {args.meters} meters a bus, 9600 8N2 ({CHAR_S * 1000:.3f} ms/char), "
          f"turnaround {args.turnaround * 1000:g} ms, interval 0, {seconds:g} s a row")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start")
    print(f"wire limit: 1 / (({REQUEST_CHARS} + {REPLY_CHARS} + 2 × {SILENCE_CHARS}) chars + "
          f"{args.turnaround * 1000:g} ms) = 1 / {per_read * 1000:.2f} ms = {max_rate:.2f} reads/s a bus")

    scenarios = [{**spec, "addresses": [1]} for _, spec, _ in GLITCHES for _variant in (SHIPPED, STOCK)]
    scenarios += [{"addresses": list(range(1, DEAD_BUS + 1))},
                  {"addresses": list(range(1, DEAD_BUS + 1)), "silent": [DEAD_ADDRESS]}]
    with tempfile.TemporaryDirectory(prefix="dcmon-bench-") as tmpdir, \
            simulators(args.buses, addresses, timing=True, turnaround_s=args.turnaround, scenarios=scenarios) as all_paths:
        paths, glitch_paths = all_paths[:args.buses], all_paths[args.buses:args.buses + 2 * len(GLITCHES)]
        healthy8_path, dead8_path = all_paths[-2:]
        tmp = Path(tmpdir)
        model = (REQUEST_CHARS + SILENCE_CHARS + REPLY_CHARS) * CHAR_S + args.turnaround
        try:
            measured = measure_reply_latency(paths[0], samples=5 if args.quick else 20)
        except serial.SerialException as e:
            raise SystemExit(f"bench: cannot talk to the simulator on {paths[0]}: {e}") from None
        note = "ok" if abs(measured - model) < 0.0015 else "OFF: the simulator's timing model changed"
        print(f"calibration: simulator request → last reply byte {measured * 1000:.2f} ms, model "
              f"{model * 1000:.2f} ms ({note})")

        one = make_config(tmp, paths[:1], args.meters, gap)
        many = make_config(tmp, paths, args.meters, gap)
        rows: list[tuple[str, int, Result]] = []
        for label, prepare in ((SHIPPED, None), (STOCK, stock_recv)):
            rows.append((label, 1, run_poller(one, seconds, prepare)))
            rows.append((label, args.buses, run_poller(many, seconds, prepare)))
        if not args.quick:
            default_gap = schema.keys(config.BusConfig)["gap_s"].default
            rows.append((f"shipped, default gap_s = {default_gap:g}", 1,
                         run_poller(make_config(tmp, paths[:1], args.meters, default_gap), seconds)))

        print()
        print(f"{'variant':<36} {'buses':>5} {'reads/s':>8} {'a bus':>7} {'of limit':>9} {'failed':>7}")
        for label, n, r in rows:
            print(f"{label:<36} {n:>5} {r.reads_per_s:8.2f} {r.reads_per_s / n:7.2f} "
                  f"{100 * r.reads_per_s / n / max_rate:8.1f}% {r.failed:7d}")
        print()
        why_s = 0.3 if args.quick else 3.0
        print(f"why (shipped):   {why(one, why_s, measured, None)}")
        print(f"why (reference): {why(one, why_s, measured, stock_recv)}")
        print()

        def rate(label: str, buses: int) -> float:
            return next(r.reads_per_s for lab, n, r in rows if lab == label and n == buses)

        r1, rn, stock = rate(SHIPPED, 1), rate(SHIPPED, args.buses), rate(STOCK, 1)
        print(f"gain of the expected-length recv over pymodbus's stock recv, one bus: {r1:.2f} / {stock:.2f} "
              f"reads/s = {r1 / stock if stock else float('inf'):.2f}× "
              f"({100 * stock / max_rate:.1f} % → {100 * r1 / max_rate:.1f} % of the wire limit)")
        pct = 100 * r1 / max_rate
        scale = rn / r1 if r1 else 0.0
        target = TARGET_SCALING_PER_BUS * args.buses
        print(f"RATIO bus throughput, {SHIPPED}: {r1:.2f} / {max_rate:.2f} reads/s = {pct:.1f} % "
              f"(target ≥ {TARGET_PCT:g} %) {verdict(pct >= TARGET_PCT)}")
        print(f"RATIO bus scaling, {SHIPPED}: {args.buses} buses {rn:.2f} / 1 bus {r1:.2f} reads/s = "
              f"{scale:.2f}× (target ≥ {target:g}×) {verdict(scale >= target)}")

        # ---- line noise: what one glitch costs a read, ours beside pymodbus's stock receive
        reads = 6 if args.quick else 40
        max_fail = 1 if args.quick else 3
        print()
        print(f"line noise: median bus time a read of address 1 ({reads} reads a row, round-robin over the rows; "
              f"timeout 0.5 s, 1 retry; a failed read counts at what it cost); extra: beyond the clean read of the "
              f"same receive; beyond bytes: beyond that and the extra bytes' own wire time")
        print(f"{'glitch':<34} {'bytes':>5} {'shipped ms':>10} {'extra':>7} {'beyond bytes':>12} {'failed':>6}   "
              f"{'stock ms':>8} {'extra':>8} {'failed':>6}")
        measured_costs = read_costs(glitch_paths, reads, gap, max_failures=max_fail)
        costs = {label: (measured_costs[(i, False)], measured_costs[(i, True)], extra_chars)
                 for i, (label, _, extra_chars) in enumerate(GLITCHES)}
        clean_ours, clean_stock, _ = costs[GLITCHES[0][0]]
        extras = []
        for label, (ours, stock_c, extra_chars) in costs.items():
            e_ours = (ours.per_read_s - clean_ours.per_read_s) * 1000
            beyond = e_ours - extra_chars * CHAR_S * 1000
            e_stock = (stock_c.per_read_s - clean_stock.per_read_s) * 1000
            print(f"{label:<34} {extra_chars:>5} {ours.per_read_s * 1000:10.2f} {e_ours:+7.2f} {beyond:+12.2f} "
                  f"{ours.failed:>3}/{ours.reads:<2}   {stock_c.per_read_s * 1000:8.2f} {e_stock:+8.2f} "
                  f"{stock_c.failed:>3}/{stock_c.reads:<2}")
            if label != GLITCHES[0][0]:
                extras.append((label, beyond, ours.failed, e_stock))
        for label, beyond, failed, e_stock in extras:
            ok = beyond <= TARGET_EXTRA_MS and failed == 0
            print(f"RATIO extra bus time a read, {label}, shipped: {beyond:+.2f} ms beyond the extra bytes' own "
                  f"wire time (stock recv {e_stock:+.1f} ms) (target ≤ {TARGET_EXTRA_MS:g} ms) {verdict(ok)}")

        # ---- a dead meter: the healthy meters' cadence on a bus of 8 with one silent
        cfg8 = make_config(tmp, [healthy8_path], DEAD_BUS, gap)
        cfg8_dead = make_config(tmp, [dead8_path], DEAD_BUS, gap)
        dead_name = f"m0_{DEAD_ADDRESS}"
        healthy = {f"m0_{a}" for a in range(1, DEAD_BUS + 1) if a != DEAD_ADDRESS}
        dead_s = max(seconds, 2.5)          # a cycle with the dead meter polled takes over a second
        logging.getLogger("dcmon.poller").setLevel(logging.ERROR)   # its "no answer" lines are expected here
        all8 = run_poller(cfg8, dead_s)
        with_dead = run_poller(cfg8_dead, dead_s, count=healthy, ready=backed_off(dead_name))
        with no_backoff():
            without = run_poller(cfg8_dead, dead_s, count=healthy)
        share = all8.reads_per_s * (DEAD_BUS - 1) / DEAD_BUS
        print()
        print(f"a dead meter: bus of {DEAD_BUS}, address {DEAD_ADDRESS} silent (timeout 0.5 s, 1 retry), interval 0, "
              f"{dead_s:g} s a row, measured after its back-off began")
        print(f"{'variant':<52} {'healthy reads/s':>15} {'of share':>9} {'dead polls':>10}")
        print(f"{'all 8 healthy, × 7/8 (the healthy meters share)':<52} {share:15.2f} {100.0:8.1f}% {'-':>10}")
        for label, r in (("one dead, back-off (shipped)", with_dead),
                         ("one dead, polled every cycle (reference: before)", without)):
            print(f"{label:<52} {r.reads_per_s:15.2f} {100 * r.reads_per_s / share if share else 0:8.1f}% "
                  f"{r.failed:>10}")
        pct_dead = 100 * with_dead.reads_per_s / share if share else 0.0
        print(f"RATIO healthy meters' cadence with one dead meter of {DEAD_BUS}, shipped: {with_dead.reads_per_s:.2f} / "
              f"{share:.2f} reads/s = {pct_dead:.1f} % (target ≥ {TARGET_DEAD_PCT:g} %) {verdict(pct_dead >= TARGET_DEAD_PCT)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        sys.exit(130)
