"""The HTTP output's cost to the poller, and prometheus_client's cost per scrape against hand formatting.

Run:  .venv/bin/python bench/bench_http.py [--meters 8] [--seconds 3] [--quick]

1. ``on_reading`` (what a bus thread pays per reading) and ``on_battery`` (per battery state) with no
   client, then with 50 live SSE clients reading the stream and one that stopped reading, side by side in
   one run. The feeding side only stores under a lock and sets an event, so the target is ≤ 1.5×.
2. One /metrics exposition of ``--meters`` meters' value series: prometheus_client (the shipped custom
   collector, ``generate_latest``) against an f-string formatter of the same series, and what the library's
   cost is as a share of one core at a 15 s scrape interval (target ≤ 0.1 %: then the library is worth it).

Prints ``RATIO …`` lines with PASS/MISS; exits 0 (a benchmark reports, it does not fail CI).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from servers import free_port  # noqa: E402

from dcmon.battery import BatteryMonitor, BatterySettings, BatteryState  # noqa: E402
from dcmon.models import MODELS  # noqa: E402
from dcmon.outputs import http as h  # noqa: E402
from dcmon.reading import Reading  # noqa: E402
from dcmon.simulator import SimMeter  # noqa: E402

SCRAPE_INTERVAL_S = 15.0


def readings(n: int) -> list[Reading]:
    """Readings as the poller makes them (Poller.make_reading), from simulated meters' values."""
    out = []
    for i in range(n):
        model = MODELS["pzem004t" if i % 4 == 3 else "pzem017"]
        m = SimMeter(model, i + 1)
        fields: dict = {k: v if isinstance(v, bool) else float(v) for k, v in m.values().items()}
        fields.update(calibrated=False, energy_reset=False)
        tags = {"sensor": f"meter{i}", "model": model.name, "address": str(i + 1), "bus": f"bus{i % 2}", "host": "pi"}
        out.append(Reading("dc_power" if model.kind == "dc" else "ac_power", time.time_ns(), tags, fields, sensor=f"meter{i}"))
    return out


def battery_states(n: int) -> list[BatteryState]:
    """States as the battery monitor makes them (a synchronised battery, discharging), n of them."""
    mon = BatteryMonitor(BatterySettings.preset("house", 200, charge=["solar"], discharge=["loads"]))
    t0 = time.time_ns()
    for k in range(1, 40):
        for name, amps in (("solar", 1.0), ("loads", 6.0)):
            mon.update(name, t0 + k * 5 * 10**9, 5.0 * k, {"voltage_v": 12.6, "current_a": amps,
                                                           "power_w": 12.6 * amps, "energy_wh": k})
    mon.synchronise(t0)
    st = mon.snapshot()
    return [dataclasses.replace(st, voltage_v=12.0 + i / 1000) for i in range(n)]


def feed_cost_us(feed, items: list, seconds: float) -> float:
    """Median µs per call of ``feed(item)`` over batches of 1000 calls."""
    per = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline or len(per) < 5:
        t = time.perf_counter()
        for _ in range(1000 // len(items)):
            for r in items:
                feed(r)
        per.append((time.perf_counter() - t) / (1000 // len(items) * len(items)) * 1e6)
    return statistics.median(per)


# The live clients run in a child process (like a phone would be another machine): their own CPU and GIL
# are not the poller's. It prints how many snapshots they received when its stdin closes.
READERS = r"""
import sys, threading, httpx
url, n = sys.argv[1], int(sys.argv[2])
counts = [0] * n
def read(i):
    try:
        with httpx.stream("GET", url, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    counts[i] += 1
    except httpx.HTTPError:
        pass
for i in range(n):
    threading.Thread(target=read, args=(i,), daemon=True).start()
for line in sys.stdin:
    print(sum(counts), flush=True)
print(sum(counts), flush=True)
"""


def hand_formatted(store: h._Store) -> bytes:   # noqa: SLF001 - the same series as the collector's _values
    lines = []
    meters = store.copy()

    def lab(m: h._Meter, **extra: str) -> str:   # noqa: SLF001
        pairs = {**{k: m.labels.get(k, "") for k in h.LABELS}, **extra}
        esc = {k: str(v).replace("\\", r"\\").replace('"', r'\"').replace("\n", r"\n") for k, v in pairs.items()}
        return "{" + ",".join(f'{k}="{esc[k]}"' for k in sorted(esc)) + "}"

    lines += ["# HELP dcmon_up 1 when the meter answered its last poll, 0 when it did not.", "# TYPE dcmon_up gauge"]
    lines += [f"dcmon_up{lab(m)} {1.0 if m.up else 0.0}" for m in meters if m.up is not None]
    for key, (name, doc) in h.VALUE_METRICS.items():
        lines += [f"# HELP {name} {doc}", f"# TYPE {name} gauge"]
        lines += [f"{name}{lab(m)} {float(m.fields[key])!r}" for m in meters if m.up and key in m.fields]
    name = h.ENERGY[0] + "_total"
    lines += [f"# HELP {name} {h.ENERGY[1]}", f"# TYPE {name} counter"]
    lines += [f"{name}{lab(m)} {float(m.fields['energy_wh']) * 3600!r}" for m in meters if m.up and "energy_wh" in m.fields]
    lines += ["# HELP dcmon_alarm 1 while the meter's alarm is on.", "# TYPE dcmon_alarm gauge"]
    for m in meters:
        if m.up:
            for k, v in m.fields.items():
                if k.endswith("_alarm"):
                    lines.append(f"dcmon_alarm{lab(m, alarm=k[:-6])} {1.0 if v else 0.0}")
    lines += ["# HELP dcmon_last_reading_timestamp_seconds When the meter's latest reading was taken.",
              "# TYPE dcmon_last_reading_timestamp_seconds gauge"]
    lines += [f"dcmon_last_reading_timestamp_seconds{lab(m)} {m.time_ns / 1e9!r}" for m in meters if m.up]
    return ("\n".join(lines) + "\n").encode()


class ValuesOnly:
    def __init__(self, store: h._Store) -> None:   # noqa: SLF001
        self.c = h.DcmonCollector(store, dict)

    def collect(self):
        return self.c._values(self.c.store.copy())   # noqa: SLF001


def parsed(text: str) -> set[tuple[str, float]]:
    """Each sample as (name{labels}, value): the two format floats differently (1.79e+09 vs 1790000000.0)."""
    return {(ln.rsplit(" ", 1)[0], float(ln.rsplit(" ", 1)[1])) for ln in text.splitlines() if not ln.startswith("#")}


def per_call_ms(fn, seconds: float) -> float:
    per = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline or len(per) < 5:
        t = time.perf_counter()
        for _ in range(20):
            fn()
        per.append((time.perf_counter() - t) / 20 * 1000)
    return statistics.median(per)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--meters", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="0.3 s a measurement, 20 clients (smoke test)")
    args = ap.parse_args()
    seconds, clients = (0.3, 20) if args.quick else (args.seconds, args.clients)
    print(f"load average at start: {os.getloadavg()[0]:.2f}; {args.meters} meters, {clients} live clients + 1 stalled")
    rs = readings(args.meters)
    st = h.HttpSettings.from_dict({"enabled": True, "listen": f"127.0.0.1:{free_port()}"}, "bench")
    with h.HttpOutput(st, status=dict, healthy=lambda: True, host="pi") as out:
        bats = battery_states(100)
        for r in rs:
            out.on_reading(r)
        alone = feed_cost_us(out.on_reading, rs, seconds)
        alone_b = feed_cost_us(out.on_battery, bats, seconds)
        readers = subprocess.Popen([sys.executable, "-c", READERS, out.url + "/events", str(clients)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        stalled = socket.create_connection(("127.0.0.1", st.address[1]))
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        deadline = time.monotonic() + 20
        while out.live_clients < clients + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert readers.stdin and readers.stdout
        readers.stdin.write("\n")
        readers.stdin.flush()
        before = int(readers.stdout.readline())
        busy = feed_cost_us(out.on_reading, rs, seconds)
        busy_b = feed_cost_us(out.on_battery, bats, seconds)
        readers.stdin.close()
        got = int(readers.stdout.readline()) - before
        readers.wait(timeout=30)
        stalled.close()
        print(f"{'':34} {'no client':>12} {f'{clients} live + 1 stalled':>22}")
        print(f"{'on_reading, µs a reading (median)':34} {alone:12.2f} {busy:22.2f}")
        print(f"{'on_battery, µs a battery state (median)':34} {alone_b:12.2f} {busy_b:22.2f}")
        print(f"snapshots the live clients received while the feeding was measured: {got}")
        ratio = busy / alone
        print(f"RATIO on_reading with {clients} live clients + 1 stalled vs none: {ratio:.2f}× "
              f"(target ≤ 1.5×) {'PASS' if ratio <= 1.5 else 'MISS'}")
        ratio_b = busy_b / alone_b
        print(f"RATIO on_battery with {clients} live clients + 1 stalled vs none: {ratio_b:.2f}× "
              f"(target ≤ 1.5×) {'PASS' if ratio_b <= 1.5 else 'MISS'}")

        registry = CollectorRegistry(auto_describe=False)
        registry.register(ValuesOnly(out._store))   # noqa: SLF001
        lib = per_call_ms(lambda: generate_latest(registry), seconds)
        hand = per_call_ms(lambda: hand_formatted(out._store), seconds)   # noqa: SLF001
        full = per_call_ms(lambda: generate_latest(out.registry), seconds)
        a, b = generate_latest(registry).decode(), hand_formatted(out._store).decode()   # noqa: SLF001
        same = parsed(a) == parsed(b)
        print(f"same exposition from both: {'yes' if same else 'no'} ({len(a.splitlines())} lines)")
        print(f"{'':40} {'prometheus_client':>18} {'hand-formatted':>15}")
        print(f"{'value series of ' + str(args.meters) + ' meters, ms a scrape':40} {lib:18.3f} {hand:15.3f}")
        print(f"whole /metrics (health, process) via prometheus_client: {full:.3f} ms a scrape")
        share = full / 1000 / SCRAPE_INTERVAL_S * 100
        print(f"RATIO exposition, prometheus_client vs hand-formatted: {lib:.3f} vs {hand:.3f} ms ({lib / hand:.1f}×); "
              f"whole scrape every {SCRAPE_INTERVAL_S:g} s = {share:.4f} % of a core (target ≤ 0.1 %) "
              f"{'PASS' if share <= 0.1 else 'MISS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
