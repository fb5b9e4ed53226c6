#!/usr/bin/env python3
"""Bus throughput against the RS485 wire limit, and scaling over parallel buses (issue 8).

Run:  .venv/bin/python bench/bench_bus.py [--seconds 10] [--meters 10] [--turnaround 0.010] [--quick]

The meters are dcmon.simulator instances with ``timing=True``, one pty per bus, in a child process (so their
CPU is not ours); the poller is dcmon's own Poller + bus_loop at interval 0, in this process. Timing model of one read, 9600 8N2
(11 bits a character, 1.146 ms):

    request 8 chars | 3.5-char silence (the meter sees the frame end) | turnaround | reply 21 chars
    | 3.5-char silence before the next request (Bus.gap_s)

= (8 + 21 + 2 × 3.5) chars + turnaround. ``Simulator(timing=True)`` delays a reply by request + reply
characters + ``turnaround_s`` but has no silence of its own, so this script passes it
``turnaround + 3.5 chars`` and gives the Bus ``gap_s = 3.5 chars``; a calibration line checks the
simulator's real request→reply time against the model before anything is measured.

Side by side: the Bus as shipped (pymodbus's receive: it polls ``in_waiting`` every 4 character times and
returns only after one poll sees no new byte), the same Bus with a prototype receive that reads exactly
the reply's length (pyserial's blocking read: no polling), and the shipped default ``gap_s = 0.02`` for
reference. A short instrumented run says where the time goes (the "why" lines).

Prints ``RATIO <what>: <numbers> (target …) PASS|MISS`` lines; always exits 0 once it could measure
(a benchmark reports, it does not fail CI); 1 with one line if it could not run at all.
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
from pymodbus.exceptions import ModbusException

from dcmon import config
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


# ---------------------------------------------------------------------------------- the prototype

def expected_length_recv(self: ModbusSerialClient, size: int | None) -> bytes:
    """Prototype for dcmon.bus: receive one reply by its length instead of by polling.

    pymodbus's sync client calls ``recv(None)`` and then polls ``in_waiting`` every 4 character times until
    a poll sees no new byte, so every reply costs 1–2 poll periods (4.6–9.2 ms at 9600 8N2) after its last
    byte. Here: a blocking read of the 3-byte head (address, function, byte count or first data byte),
    pymodbus's own PDU table gives the frame length (exception replies: 5), and a second blocking read
    takes the rest. pyserial returns the moment the last byte is in, or at the port timeout.
    """
    if size is not None or self.socket is None:
        return ModbusSerialClient.recv(self, size)
    head = self.socket.read(3)
    if len(head) < 3:
        return head            # nothing (timeout: pymodbus retries) or a fragment (the framer waits / hunts)
    try:
        pdu_class = self.framer.decoder.lookupPduClass(head)
        need = pdu_class.calculateRtuFrameSize(head) if pdu_class else 0
    except ModbusException:
        need = 0
    return head + (self.socket.read(need - 3) if need > 3 else b"")


def use_prototype(poller: Poller) -> None:
    for bus in poller.buses.values():
        client = bus._client  # noqa: SLF001 - a benchmark prototype, not a change to Bus
        client.recv = types.MethodType(expected_length_recv, client)  # type: ignore[method-assign]


def patch_bus_class() -> None:
    """Give every Bus made from now on the prototype receive (for a whole `dcmon run` process: bench_cost)."""
    from dcmon.bus import Bus

    original = Bus.__init__

    def init(self: Bus, *a: object, **kw: object) -> None:
        original(self, *a, **kw)  # type: ignore[arg-type]
        self._client.recv = types.MethodType(expected_length_recv, self._client)  # type: ignore[method-assign]  # noqa: SLF001

    Bus.__init__ = init  # type: ignore[method-assign]


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
    """The real poll loops (one thread per bus, interval 0) for ``seconds`` after a warm-up; count good reads."""
    poller = Poller(cfg, put=lambda lines: None)
    if prepare:
        prepare(poller)
    stop = threading.Event()
    threads = [threading.Thread(target=bus_loop, args=(poller, name, stop), daemon=True) for name in poller.buses]
    for t in threads:
        t.start()

    def counts() -> tuple[int, int]:
        return (sum(s.polls_ok for s in poller.states.values()), sum(s.polls_failed for s in poller.states.values()))

    time.sleep(warmup_s)
    ok0, bad0, t0 = *counts(), time.monotonic()
    time.sleep(seconds)
    ok1, bad1, t1 = *counts(), time.monotonic()
    stop.set()
    for t in threads:
        t.join(timeout=5)
    poller.close()
    return Result((ok1 - ok0) / (t1 - t0), bad1 - bad0)


def why(cfg: config.Config, seconds: float, reply_latency_s: float, prototype: bool) -> str:
    """Instrument one bus: how long recv() takes beyond the simulator's measured reply time (so the time
    after the last byte that is spent noticing it), and how many ``in_waiting`` polls it makes per read."""
    spans: list[float] = []
    polls = [0]

    def prepare(poller: Poller) -> None:
        if prototype:
            use_prototype(poller)
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

    run_poller(cfg, seconds, prepare, warmup_s=0.0)
    if not spans:
        return "no reads"
    late = statistics.mean(spans) - reply_latency_s
    return (f"recv() returns {late * 1000:+.1f} ms after the reply's last byte on average "
            f"({len(spans)} reads, {polls[0] / len(spans):.1f} in_waiting polls per read)")


# ------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="measuring time per row (default 10)")
    ap.add_argument("--meters", type=int, default=10, help="meters per bus (default 10)")
    ap.add_argument("--buses", type=int, default=4, help="buses for the scaling rows (default 4)")
    ap.add_argument("--turnaround", type=float, default=0.010, help="meter turnaround in seconds (default 0.010)")
    ap.add_argument("--quick", action="store_true", help="0.6 s a row, no reference row (smoke test)")
    args = ap.parse_args(argv)
    seconds = 0.6 if args.quick else args.seconds

    per_read = wire_time_s(args.turnaround)
    max_rate = 1 / per_read
    gap = SILENCE_CHARS * CHAR_S
    sim_turnaround = args.turnaround   # the simulator models the meter's t3.5 end-of-frame wait itself
    addresses = list(range(1, args.meters + 1))
    print(f"bus throughput: {args.meters} meters a bus, 9600 8N2 ({CHAR_S * 1000:.3f} ms/char), "
          f"turnaround {args.turnaround * 1000:g} ms, interval 0, {seconds:g} s a row")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start")
    print(f"wire limit: 1 / (({REQUEST_CHARS} + {REPLY_CHARS} + 2 × {SILENCE_CHARS}) chars + "
          f"{args.turnaround * 1000:g} ms) = 1 / {per_read * 1000:.2f} ms = {max_rate:.2f} reads/s a bus")

    with tempfile.TemporaryDirectory(prefix="dcmon-bench-") as tmpdir, \
            simulators(args.buses, addresses, timing=True, turnaround_s=sim_turnaround) as paths:
        tmp = Path(tmpdir)
        model = (REQUEST_CHARS + SILENCE_CHARS + REPLY_CHARS) * CHAR_S + args.turnaround
        measured = measure_reply_latency(paths[0], samples=5 if args.quick else 20)
        note = "ok" if abs(measured - model) < 0.0015 else "OFF: the simulator's timing model changed; fix sim_turnaround"
        print(f"calibration: simulator request → last reply byte {measured * 1000:.2f} ms, model "
              f"{model * 1000:.2f} ms ({note})")

        one = make_config(tmp, paths[:1], args.meters, gap)
        many = make_config(tmp, paths, args.meters, gap)
        rows: list[tuple[str, int, Result]] = []
        variants: list[tuple[str, Callable[[Poller], None] | None]] = [
            ("shipped (pymodbus polling recv)", None),
            ("prototype (expected-length recv)", use_prototype),
        ]
        for label, prepare in variants:
            rows.append((label, 1, run_poller(one, seconds, prepare)))
            rows.append((label, args.buses, run_poller(many, seconds, prepare)))
        if not args.quick:
            default_gap = config.BusConfig.model_fields["gap_s"].default
            rows.append((f"shipped, default gap_s = {default_gap:g}", 1,
                         run_poller(make_config(tmp, paths[:1], args.meters, default_gap), seconds)))

        print()
        print(f"{'variant':<36} {'buses':>5} {'reads/s':>8} {'a bus':>7} {'of limit':>9} {'failed':>7}")
        for label, n, r in rows:
            print(f"{label:<36} {n:>5} {r.reads_per_s:8.2f} {r.reads_per_s / n:7.2f} "
                  f"{100 * r.reads_per_s / n / max_rate:8.1f}% {r.failed:7d}")
        print()
        why_s = 0.3 if args.quick else 3.0
        print(f"why (shipped):   {why(one, why_s, measured, prototype=False)}")
        print(f"why (prototype): {why(one, why_s, measured, prototype=True)}")
        print()
        for label, _ in variants:
            r1 = next(r for lab, n, r in rows if lab == label and n == 1)
            rn = next(r for lab, n, r in rows if lab == label and n == args.buses)
            pct = 100 * r1.reads_per_s / max_rate
            scale = rn.reads_per_s / r1.reads_per_s if r1.reads_per_s else 0.0
            target = TARGET_SCALING_PER_BUS * args.buses
            print(f"RATIO bus throughput, {label}: {r1.reads_per_s:.2f} / {max_rate:.2f} reads/s = {pct:.1f} % "
                  f"(target ≥ {TARGET_PCT:g} %) {verdict(pct >= TARGET_PCT)}")
            print(f"RATIO bus scaling, {label}: {args.buses} buses {rn.reads_per_s:.2f} / 1 bus "
                  f"{r1.reads_per_s:.2f} reads/s = {scale:.2f}× (target ≥ {target:g}×) {verdict(scale >= target)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        sys.exit(130)
