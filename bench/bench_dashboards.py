#!/usr/bin/env python3
"""Dashboard query times on a year of data: the raw readings against the downsampled series, side by side.

A real influxd (Debian's 1.6, tests/servers.py) in a temporary folder gets a year of one PZEM-017's readings
(every --interval seconds: voltage, current, power, an energy counter rising 1 Wh a reading, one reset) and of
one battery's points (the ``battery`` measurement's fields: state of charge, net current, growing Ah totals,
status; charging 06-14 UTC), then
`dcmon influx-setup` (dcmon.influx_setup.setup, which downsamples what is already there; its time is printed
too). Each dashboard query of a long range then runs as it did before downsampling (on the raw data) and as the
dashboard runs it now (the same text with $rp set as the hidden variable sets it; day and week bars: the sum of
the downsampled energy), twice each, best time kept. Both must give the same energy (checked).

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
    from dcmon.reading import encode_line

    now = int(time.time()) // 60 * 60
    start = now - days * 86400
    n = days * 86400 // interval_s
    e, batch, sent = 5000.0, [], 0
    charged = discharged = 0.0
    with httpx.Client(base_url=url, timeout=120) as c:
        for i in range(n):
            t = start + i * interval_s
            reset = i == n // 2
            e = 3.0 if reset else e + 1.0
            v = 12.0 + (i % 97) / 100
            batch.append(f"dc_power,bus=house,host={HOST},sensor={SENSOR} voltage_v={v},current_a=2.5,"
                         f"power_w={v * 2.5},energy_wh={e},energy_reset={'true' if reset else 'false'} {t}")
            net = 2.0 if 6 <= t // 3600 % 24 < 14 else -1.0
            charged += max(net, 0.0) * interval_s / 3600
            discharged += max(-net, 0.0) * interval_s / 3600
            batch.append(encode_line("battery", {"host": HOST, "battery": "house"}, {
                "status": "charging" if net > 0 else "discharging", "soc_known": True,
                "soc_pct": round(50 + 40 * ((t % 86400) / 86400), 3), "voltage_v": v, "net_current_a": net,
                "net_power_w": round(net * v, 3), "charged_ah": round(charged, 5), "discharged_ah": round(discharged, 5),
                "full_cycles": round(discharged / 100, 5), "synchronisations": i // 17280}, t))
            if len(batch) >= 20000 or i == n - 1:
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
    days, interval_s, repeat = (3, 5, 2) if args.quick else (args.days, args.interval, 2)

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
            print(f"data: {n // 2:,} readings and {n // 2:,} battery points over {days} days every {interval_s} s; "
                  f"written in {t_write:.1f} s; "
                  f"influx-setup (downsampling all of it) {t_setup:.1f} s")
            rows = run_queries(srv.url, bd, days, repeat)
        finally:
            srv.stop()
    print(f"{'query (range)':44} {'raw ms':>9} {'rollup ms':>10} {'rollup':>9} {'speed-up':>9}")
    for what, raw_ms, roll_ms, rp, _same in rows:
        print(f"{what:44} {raw_ms:9.1f} {roll_ms:10.1f} {rp:>9} {raw_ms / roll_ms:8.1f}×")
    same = all(r[4] for r in rows)
    print(f"same energy from raw and downsampled: {'yes' if all(r[4] for r in rows if 'energy' in r[0]) else 'NO'}")
    print(f"same battery Ah from raw and downsampled: {'yes' if all(r[4] for r in rows if 'Ah' in r[0]) else 'NO'}")
    worst = min(r[1] / r[2] for r in rows)
    target = 2.0 if args.quick else 10.0       # quick: 3 days, where the 1-minute series is only 12× smaller
    print(f"RATIO dashboard queries, raw / downsampled (slowest speed-up): {worst:.1f}× (target ≥ {target:g}×) "
          f"{'PASS' if worst >= target and same else 'MISS'}")
    return 0


def run_queries(url: str, bd, days: int, repeat: int) -> list[tuple[str, float, float, str, bool]]:
    """The dashboards' own queries (grafana/build_dashboards.py) for their ranges, each against the raw data
    (what they read before downsampling) and against what they read now."""
    import datetime as dt
    from zoneinfo import ZoneInfo

    now_ms = int(time.time() * 1000)
    berlin = ZoneInfo("Europe/Berlin")

    def span(d: int) -> tuple[str, str, str]:
        """$timeFilter from the first midnight (Berlin) d days back, not before the data: whole buckets in
        both, so that the energy can agree; $__interval for ~1000 points across a panel."""
        d = min(d, days)
        first = dt.datetime.fromtimestamp(now_ms / 1000 - d * 86400 + 60, berlin)
        start = int((first.replace(hour=0, minute=0, second=0, microsecond=0) + dt.timedelta(days=1)).timestamp() * 1000)
        return f"{d}d", f"time >= {start}ms and time <= {now_ms}ms", f"{max(60, d * 86400 // 1000)}s"

    def rp_for(d: int) -> str:
        d = min(d, days)
        return "autogen" if d < 2 else "dcmon_1m" if d < 60 else "dcmon_1h"

    year, month, weeks = 365, 30, 56
    cases = [   # (what, range in days, the query on raw data, the query the dashboard runs, the policy it reads)
        ("voltage mean per interval", year, bd.over_time("mean", "voltage_v", bd.DC),
         bd.over_time("mean", "voltage_v", bd.DC), rp_for(year)),
        ("voltage max per interval", month, bd.over_time("max", "voltage_v", bd.DC),
         bd.over_time("max", "voltage_v", bd.DC), rp_for(month)),
        ("energy per hour (sensor)", year, bd.energy_over("1h"), bd.energy_over("1h"), rp_for(year)),
        ("energy per day (sensor, 30 d)", month, bd.energy_over("1d"), bd.energy_days("1d"), "dcmon_1m"),
        ("energy per week (overview, 8 w)", weeks, bd.energy_over("7d, 4d"), bd.energy_days("7d, 4d", bd.HOUR),
         "dcmon_1h"),
        ("battery state of charge per interval", year, bd.battery_over_time("soc_pct"),
         bd.battery_over_time("soc_pct"), rp_for(year)),
        # the panel's own range is 7 days; on a dashboard set to a year it reads the 1-hour series
        ("battery Ah per day (7-day panel)", 7, bd.battery_ah_per_day(), bd.battery_ah_per_day(), rp_for(year)),
    ]
    out = []
    with httpx.Client(base_url=url, timeout=900) as c:
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

        for what, d, raw_q, dash_q, rp in cases:
            label, tf, interval = span(d)
            env = {"$timeFilter": tf, "$__interval": interval, "$tz": "Europe/Berlin", "$host": "(pi1)",
                   "$site": ".*", "$bus": "(house)", "$sensor": "(battery)"}

            def expand(q: str, rp_: str) -> str:
                q = q.replace('"$rp"', f'"{rp_}"')
                for k in sorted(env, key=len, reverse=True):
                    q = q.replace(k, env[k])
                return q

            raw_ms, raw = timed(expand(raw_q, "autogen"))
            roll_ms, roll = timed(expand(dash_q, rp))
            same = True
            if "energy" in what or "Ah" in what:
                tot = [sum(r[1] or 0 for s in x for r in s["values"]) for x in (raw, roll)]
                # energy: the first step of the range (raw has no reading before it); Ah charged: none moves
                # at the range's start (midnight in Berlin: discharging)
                same = abs(tot[0] - tot[1]) <= (2.0 if "energy" in what else 1e-3)
                if not same:
                    print(f"{what}: raw {tot[0]:.3f}, downsampled {tot[1]:.3f}")
            out.append((f"{what} ({label})", raw_ms, roll_ms, rp, same))
    return out


if __name__ == "__main__":
    sys.exit(main())
