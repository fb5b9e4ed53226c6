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

Prints ``RATIO <what>: <numbers> (target …) PASS|MISS`` lines for the shipped Bus; always exits 0 once it
could measure (a benchmark reports, it does not fail CI); 1 with one line if it could not run at all.
"""

from __future__ import annotations

import argparse
import contextlib
import json
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
from dcmon.poller import Poller, bus_loop
from dcmon.simulator import crc16

BAUD = 9600
CHAR_S = 11 / BAUD              # 8N2: start + 8 data + 2 stop bits
REQUEST_CHARS, REPLY_CHARS = 8, 21  # read 8 input registers of a PZEM-017: 01 04 0000 0008 CRC / 01 04 10 <16> CRC
SILENCE_CHARS = 3.5
TARGET_PCT = 90.0
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
count, addresses, timing, turnaround_s = json.loads(sys.argv[1])
sims = [Simulator(meters_for([("pzem017", a) for a in addresses]), timing=timing, turnaround_s=turnaround_s).start()
        for _ in range(count)]
print(json.dumps([s.path for s in sims]), flush=True)
sys.stdin.read()                     # serve until the bench closes our stdin (or exits, however it exits)
for s in sims:
    s.stop()
"""


@contextlib.contextmanager
def simulators(count: int, addresses: list[int], *, timing: bool, turnaround_s: float = 0.0) -> Iterator[list[str]]:
    """``count`` simulated buses (dcmon.simulator, each on its own pty) serving ``addresses``, in a child
    process: a real bus's meters do not use the poller's CPU, and neither may these. Yields the pty paths."""
    spec = json.dumps([count, addresses, timing, turnaround_s])
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
               warmup_s: float = 0.2) -> Result:
    """The real poll loops (one thread per bus, interval 0) for ``seconds`` after a warm-up. Each bus's rate
    is its good reads between its first and last read completion in the window, over the time between them
    (the poller reports progress after every meter), so a short window is not off by a read cut in half;
    the buses' rates are summed."""
    marks: dict[str, list[tuple[float, int]]] = {}

    def on_progress(name: str) -> None:   # called by the bus's own thread after each meter
        bus = name.partition(":")[2]
        ok = sum(poller.states[s.name].polls_ok for s in cfg.enabled_sensors(bus))
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

    per_read = wire_time_s(args.turnaround)
    max_rate = 1 / per_read
    gap = SILENCE_CHARS * CHAR_S
    addresses = list(range(1, args.meters + 1))
    print(f"bus throughput: {args.meters} meters a bus, 9600 8N2 ({CHAR_S * 1000:.3f} ms/char), "
          f"turnaround {args.turnaround * 1000:g} ms, interval 0, {seconds:g} s a row")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start")
    print(f"wire limit: 1 / (({REQUEST_CHARS} + {REPLY_CHARS} + 2 × {SILENCE_CHARS}) chars + "
          f"{args.turnaround * 1000:g} ms) = 1 / {per_read * 1000:.2f} ms = {max_rate:.2f} reads/s a bus")

    with tempfile.TemporaryDirectory(prefix="dcmon-bench-") as tmpdir, \
            simulators(args.buses, addresses, timing=True, turnaround_s=args.turnaround) as paths:
        tmp = Path(tmpdir)
        model = (REQUEST_CHARS + SILENCE_CHARS + REPLY_CHARS) * CHAR_S + args.turnaround
        measured = measure_reply_latency(paths[0], samples=5 if args.quick else 20)
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
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        sys.exit(130)
