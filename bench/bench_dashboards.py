#!/usr/bin/env python3
"""Dashboard query times on a year of data: the raw readings against the downsampled series, side by side.

A real influxd (Debian's 1.6, tests/servers.py) in a temporary folder gets a year of one PZEM-017's readings
(every --interval seconds: voltage, current, power, an energy counter rising 1 Wh a reading, one reset), then
`dcmon influx-setup` (dcmon.influx_setup.setup, which downsamples what is already there; its time is printed
too). Each dashboard query of a long range then runs against the raw retention policy and against the series
the dashboards read for that range (dcmon_1m / dcmon_1h), the same query text with $rp set as the hidden
variable sets it, REPEAT times each, best time kept. Both must give the same energy (checked).

    python3 bench/bench_dashboards.py            # a year at 10 s (3.15 M readings), several minutes
    python3 bench/bench_dashboards.py --quick    # 3 days at 5 s (the smoke test)

Prints ``RATIO ...`` lines with PASS/MISS; exits 0 (a benchmark reports, it does not fail CI).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

HOST, SENSOR = "pi1", "battery"


def generate(url: str, days: int, interval_s: int) -> int:
    now = int(time.time()) // 60 * 60
    start = now - days * 86400
    n = days * 86400 // interval_s
    e, batch, sent = 5000.0, [], 0
    with httpx.Client(base_url=url, timeout=120) as c:
        for i in range(n):
            t = start + i * interval_s
            reset = i == n // 2
            e = 3.0 if reset else e + 1.0
            v = 12.0 + (i % 97) / 100
            batch.append(f"dc_power,bus=house,host={HOST},sensor={SENSOR} voltage_v={v},current_a=2.5,"
                         f"power_w={v * 2.5},energy_wh={e},energy_reset={'true' if reset else 'false'} {t}")
            if len(batch) == 20000 or i == n - 1:
                c.post("/write", params={"db": "dcmon", "precision": "s"}, content="\n".join(batch)).raise_for_status()
                sent += len(batch)
                batch = []
    return sent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 days at 5 s")
    ap.add_argument("--days", type=int, default=365)
    ap.add_argument("--interval", type=int, default=10, help="seconds between readings (the poller's default is 5)")
    args = ap.parse_args(argv)
    days, interval_s, repeat = (3, 5, 2) if args.quick else (args.days, args.interval, 3)

    from servers import Influxd

    from dcmon import config
    from dcmon.influx_setup import Influx, setup

    sys.path.insert(0, str(ROOT / "grafana"))
    import build_dashboards as bd

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        srv = Influxd(work / "influxd").start()
        try:
            httpx.post(f"{srv.url}/query", params={"q": "CREATE DATABASE dcmon"}).raise_for_status()
            t0 = time.perf_counter()
            n = generate(srv.url, days, interval_s)
            t_write = time.perf_counter() - t0
            (work / "config.toml").write_text(f'[poller]\nhost = "{HOST}"\n[influxdb]\nurl = "{srv.url}"\n'
                                              f'raw_days = {days + 30}\n')
            cfg = config.load(work / "config.toml", env={})
            t0 = time.perf_counter()
            with Influx(cfg.influxdb) as api:
                setup(cfg, api, say=lambda _l: None)
            t_setup = time.perf_counter() - t0
            print(f"data: {n:,} readings over {days} days every {interval_s} s; written in {t_write:.1f} s; "
                  f"influx-setup (downsampling all of it) {t_setup:.1f} s")
            rows = run_queries(srv.url, bd, days, repeat)
        finally:
            srv.stop()
    print(f"{'query (range)':44} {'raw ms':>9} {'rollup ms':>10} {'rollup':>9} {'speed-up':>9}")
    for what, raw_ms, roll_ms, rp, _same in rows:
        print(f"{what:44} {raw_ms:9.1f} {roll_ms:10.1f} {rp:>9} {raw_ms / roll_ms:8.1f}×")
    same = all(r[4] for r in rows)
    print(f"same energy from raw and downsampled: {'yes' if same else 'NO'}")
    worst = min(r[1] / r[2] for r in rows)
    target = 2.0 if args.quick else 10.0
    print(f"RATIO dashboard queries, raw / downsampled (slowest speed-up): {worst:.1f}× (target ≥ {target:g}×) "
          f"{'PASS' if worst >= target and same else 'MISS'}")
    return 0


def run_queries(url: str, bd, days: int, repeat: int) -> list[tuple[str, float, float, str, bool]]:
    import datetime as dt
    from zoneinfo import ZoneInfo

    now_ms = int(time.time() * 1000)
    span = f"{days}d"
    # from the first midnight (Berlin) after the data begins: whole buckets in both, so the energy can agree
    first = dt.datetime.fromtimestamp(now_ms / 1000 - days * 86400 + 60, ZoneInfo("Europe/Berlin"))
    start_ms = int((first.replace(hour=0, minute=0, second=0, microsecond=0) + dt.timedelta(days=1)).timestamp() * 1000)
    tf = f"time >= {start_ms}ms and time <= {now_ms}ms"
    interval = f"{max(60, days * 86400 // 1000)}s"           # $__interval for ~1000 points across the panel
    rp_long = "dcmon_1h" if days >= 60 else "dcmon_1m"
    env = {"$timeFilter": tf, "$__interval": interval, "$tz": "Europe/Berlin", "$host": "(pi1)", "$site": ".*",
           "$bus": "(house)", "$sensor": "(battery)"}

    def expand(q: str, rp: str) -> str:
        q = q.replace('"$rp"', f'"{rp}"')
        for k in sorted(env, key=len, reverse=True):
            q = q.replace(k, env[k])
        return q

    cases = [
        (f"voltage mean per interval ({span})", bd.over_time("mean", "voltage_v", bd.DC), rp_long),
        (f"voltage max per interval ({span})", bd.over_time("max", "voltage_v", bd.DC), rp_long),
        (f"energy per day ({span})", bd.energy_over("1d"), "dcmon_1m"),
        (f"energy per week ({span})", bd.energy_over("7d, 4d"), "dcmon_1h"),
    ]
    out = []
    with httpx.Client(base_url=url, timeout=600) as c:
        def timed(q: str) -> tuple[float, list]:
            best, series = float("inf"), []
            for _ in range(repeat):
                t0 = time.perf_counter()
                r = c.get("/query", params={"q": q, "db": "dcmon", "epoch": "s"})
                best = min(best, (time.perf_counter() - t0) * 1000)
                r.raise_for_status()
                res = r.json()["results"][0]
                assert "error" not in res, f"{q}: {res['error']}"
                series = res.get("series", [])
            return best, series

        for what, query, rp in cases:
            raw_ms, raw = timed(expand(query, "autogen"))
            roll_ms, roll = timed(expand(query, rp))
            same = True
            if "energy" in what:
                tot = [sum(r[1] or 0 for s in x for r in s["values"]) for x in (raw, roll)]
                same = abs(tot[0] - tot[1]) <= 2.0       # the first step of the range: raw has no reading before it
                if not same:
                    print(f"{what}: raw {tot[0]:.1f} Wh, downsampled {tot[1]:.1f} Wh")
            out.append((what, raw_ms, roll_ms, rp, same))
    return out


if __name__ == "__main__":
    sys.exit(main())
