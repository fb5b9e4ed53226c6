"""The batteries' ``battery`` measurement downsampled by `dcmon influx-setup`, on a real influxd, and the
overview's Batteries row reading it at every resolution.

Data: BatteryService (dcmon.battery_service, as the running service makes it from a config) is fed the
readings PZEM-017s would give (dcmon.battery_sim's model through the real register encoding,
battery_sim.pzem_reading) on a 30 s poll cycle over two and a half days of simulated time ending now, on two
hosts: pi1 has "house" (a charger meter and a load meter: synchronises every day; a 15-minute outage during
which the load meter's counter is reset loses the state of charge until the next full charge; a charger
meter that is not read for 5 minutes) and "van" (one meter on the battery cable: state of charge never
known); pi2 has another "house". Its points (its own lines, checked against influx_fields of the states it
passed on) go through the real writer (InfluxSink). pi1's are there before the first `influx-setup` (which
downsamples what is stored); pi2's arrive after it and are downsampled by `influx-setup --downsample 3d`.

Every 1-minute and 1-hour value is compared with one computed here from the states the service wrote:
mean/min/max of the statistics, last value of the totals and the state, nothing where nothing was known.
Then each Batteries panel's query, expanded as Grafana expands it (tests/test_grafana.py), at each value
of ``$rp``, against numbers computed here from the series that policy holds.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import pytest

from dcmon import config
from dcmon.battery_service import FIELDS, BatteryService, influx_fields
from dcmon.battery_sim import BatteryModel, pzem_reading
from dcmon.cli import main
from dcmon.influx_setup import (BATTERY_LAST, BATTERY_RAW_ONLY, BATTERY_STATS, HOUR_RP, MINUTE_RP, Backfill,
                                Influx, flux_tasks, setup)
from dcmon.outputs.influx import InfluxSink
from dcmon.reading import Reading, encode_line
from test_grafana import data_panels, expand, is_battery, load_dashboards, time_filters

POLL_S = 30
MIN_NS, HOUR_NS = 60 * 10**9, 3600 * 10**9
RPS = ("autogen", MINUTE_RP, HOUR_RP)

CFG = """
[poller]
host = "{host}"

[influxdb]
url = "{url}"
database = "{db}"

[spool]
path = "{spool}"

[buses.a]
port = "/dev/null"

[[sensors]]
name = "charger"
bus = "a"
address = 1

[[sensors]]
name = "loads"
bus = "a"
address = 2

[[sensors]]
name = "shunt"
bus = "a"
address = 3

[[batteries]]
name = "house"
capacity_ah = {capacity}
chemistry = "{chemistry}"
charge = ["charger"]
discharge = ["loads"]
"""

VAN = """
[[batteries]]
name = "van"
capacity_ah = 100
battery_cable = ["shunt"]
"""


def make_cfg(tmp: Path, host: str, url: str, db: str, *, capacity: float, chemistry: str, van: bool) -> config.Config:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.toml").write_text(CFG.format(host=host, url=url, db=db, spool=tmp / "spool.sqlite",
                                                capacity=capacity, chemistry=chemistry) + (VAN if van else ""))
    return config.load(tmp / "config.toml", env={})


# ------------------------------------------------------------------------------------------- the data

class Host:
    """One host's BatteryService fed simulated readings. ``run`` polls from start_ns for ``cycles`` cycles;
    ``written``: (battery, time_ns, fields) of every point, from the states the service passed on."""

    def __init__(self, cfg: config.Config, model: BatteryModel, charge_hours: range, van: bool) -> None:
        self.cfg, self.model, self.charge_hours, self.van = cfg, model, charge_hours, van
        self.now_ns = 0
        self.states: list = []
        self.svc = BatteryService.from_config(cfg, mono=lambda: self.model.t_s, wall_ns=lambda: self.now_ns,
                                              save_interval_s=1e9, on_state=self.states.append)
        assert self.svc is not None
        self.written: list[tuple[str, int, dict]] = []
        self.lines: list[str] = []
        self.outage: tuple[int, int] | None = None       # cycles the poller is down (the loads' counter reset)
        self.charger_silent: tuple[int, int] | None = None

    def reading(self, sensor: str, which: str) -> Reading:
        fields = pzem_reading(*self.model.sample(which))
        tags = {"host": self.cfg.host, "sensor": sensor, "bus": "a"}
        return Reading("dc_power", self.now_ns, tags, fields, sensor=sensor)  # type: ignore[arg-type]

    def run(self, start_ns: int, cycles: int) -> None:
        m = self.model
        for k in range(cycles):
            self.now_ns = start_ns + k * POLL_S * 10**9
            hour = self.now_ns // HOUR_NS % 24
            with m.lock:
                m.charger_max_a = 1.5 if hour in self.charge_hours else 0.0
            m.advance(POLL_S, step_s=POLL_S)
            if self.outage and self.outage[0] <= k < self.outage[1]:
                if k == self.outage[0]:
                    with m.lock:
                        m.load_wh = 0.0                      # the loads' meter is reset while nobody reads it
                continue
            readings = [self.reading("loads", "load")]
            if not (self.charger_silent and self.charger_silent[0] <= k < self.charger_silent[1]):
                readings.append(self.reading("charger", "charge"))
            if self.van:
                readings.append(self.reading("shunt", "load"))
            self.states.clear()
            lines = self.svc.on_readings(readings)
            assert len(lines) == len(self.states)
            for st, line in zip(self.states, lines):
                fields = influx_fields(st)
                if k % 50 == 0:        # the service's own line is this state's fields (checked on a sample)
                    assert line == encode_line("battery", {"host": self.cfg.host, "battery": st.name}, fields,
                                               self.now_ns)
                self.written.append((st.name, self.now_ns, fields))
            self.lines += lines

    def close(self) -> None:
        self.svc.close()


def write(cfg: config.Config, lines: list[str]) -> None:
    sink = InfluxSink(cfg.influxdb)
    try:
        for i in range(0, len(lines), 5000):
            sink.write(lines[i:i + 5000])
    finally:
        sink.close()


@pytest.fixture(scope="module")
def bat(influxd, tmp_path_factory):
    db = "t_setup_battery"
    influxd.drop_db(db)
    tmp = tmp_path_factory.mktemp("setup_battery")
    now_ns = time.time_ns() // MIN_NS * MIN_NS
    cycles = int(2.5 * 86400 / POLL_S)
    start_ns = now_ns - 2 * MIN_NS - cycles * POLL_S * 10**9
    cfg1 = make_cfg(tmp / "pi1", "pi1", influxd.url, db, capacity=5, chemistry="lead-acid", van=True)
    cfg2 = make_cfg(tmp / "pi2", "pi2", influxd.url, db, capacity=10, chemistry="lifepo4", van=False)
    pi1 = Host(cfg1, BatteryModel(capacity_ah=5, soc=0.6, load_a=0.15), range(6, 14), van=True)
    pi2 = Host(cfg2, BatteryModel(capacity_ah=10, chemistry="lifepo4", soc=0.5, load_a=0.25), range(9, 17), van=False)
    # 15 minutes down, an hour after the second day's charge (the state is then unknown until the next one)
    lost = next(k for k in range(cycles // 3, cycles) if (start_ns + k * POLL_S * 10**9) // HOUR_NS % 24 == 15)
    pi1.outage = (lost, lost + 15 * 60 // POLL_S)
    pi1.charger_silent = (cycles - 1200, cycles - 1200 + 5 * 60 // POLL_S)
    try:
        pi1.run(start_ns, cycles)
        pi2.run(start_ns + 7 * 10**9, cycles)
    finally:
        pi1.close()
        pi2.close()
    influxd.create_db(db)
    write(cfg1, pi1.lines)
    with Influx(cfg1.influxdb) as api:                # the first run: downsamples what is stored (pi1's)
        said: list[str] = []
        setup(cfg1, api, say=said.append)
    assert any("downsampling the raw data" in s for s in said)
    write(cfg2, pi2.lines)                            # later: only in the raw data, until --downsample
    assert not influxd.query(f'SELECT count("status") FROM "{MINUTE_RP}"."battery" WHERE "host" = \'pi2\'', db)
    assert main(["influx-setup", "-c", str(tmp / "pi2" / "config.toml"), "--downsample", "3d"]) == 0
    written = {("pi1", b): [] for b in ("house", "van")} | {("pi2", "house"): []}
    for host in (pi1, pi2):
        for name, t, fields in host.written:
            written[(host.cfg.host, name)].append((t, fields))
    yield SimpleNamespace(db=db, query=lambda q: influxd.query(q, db), written=written, now=time.time(),
                          hosts=(pi1, pi2), stored={})
    influxd.drop_db(db)


# ------------------------------------------------------------------------------------ expected values

def minute_buckets(points: list[tuple[int, dict]], bucket_ns: int = MIN_NS) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = defaultdict(list)
    for t, fields in sorted(points, key=lambda p: p[0]):
        out[t // bucket_ns * bucket_ns].append(fields)
    return out


def expected_1m(points: list[tuple[int, dict]]) -> dict[int, dict]:
    """Per minute: mean/min/max of each statistic over the points that have it, the last value of each
    last-valued field among the points that have it; a field no point had is absent."""
    out = {}
    for t, rows in minute_buckets(points).items():
        row: dict = {}
        for f in BATTERY_STATS:
            vals = [r[f] for r in rows if f in r]
            if vals:
                row |= {f"{f}_mean": sum(vals) / len(vals), f"{f}_min": min(vals), f"{f}_max": max(vals)}
        for f in BATTERY_LAST:
            vals = [r[f] for r in rows if f in r]
            if vals:
                row[f] = vals[-1]
        out[t] = row
    return out


def expected_1h(minutes: dict[int, dict]) -> dict[int, dict]:
    """Per hour, from the 1-minute values: the mean of the means, min of the mins, max of the maxes, the last."""
    hours: dict[int, list[dict]] = defaultdict(list)
    for t in sorted(minutes):
        hours[t // HOUR_NS * HOUR_NS].append(minutes[t])
    out = {}
    for t, rows in hours.items():
        row: dict = {}
        for f in BATTERY_STATS:
            for func, agg in (("mean", lambda v: sum(v) / len(v)), ("min", min), ("max", max)):
                vals = [r[f"{f}_{func}"] for r in rows if f"{f}_{func}" in r]
                if vals:
                    row[f"{f}_{func}"] = agg(vals)
        for f in BATTERY_LAST:
            vals = [r[f] for r in rows if f in r]
            if vals:
                row[f] = vals[-1]
        out[t] = row
    return out


def stored(bat, rp: str) -> dict[tuple[str, str], dict[int, dict]]:
    """Every point of rp.battery, per (host, battery): time → its fields (nulls, i.e. absent fields, left out)."""
    if rp in bat.stored:
        return bat.stored[rp]
    out: dict[tuple[str, str], dict[int, dict]] = bat.stored.setdefault(rp, {})
    for s in bat.query(f'SELECT * FROM "{rp}"."battery" GROUP BY "host", "battery"'):
        cols = s["columns"]
        out[(s["tags"]["host"], s["tags"]["battery"])] = {
            v[0]: {c: x for c, x in zip(cols[1:], v[1:]) if x is not None} for v in s["values"]}
    return out


def same(got: dict, want: dict) -> bool:
    """The same fields; numbers equal to 1e-9 (the sums' order differs; JSON shows a float 0.0 as 0), booleans
    and strings exactly."""
    def eq(g: object, w: object) -> bool:
        if isinstance(w, (bool, str)) or isinstance(g, (bool, str)):
            return type(g) is type(w) and g == w
        return math.isclose(g, w, rel_tol=1e-9, abs_tol=1e-9)  # type: ignore[arg-type]
    return got.keys() == want.keys() and all(eq(got[k], want[k]) for k in want)


# ------------------------------------------------------------------------------------------------ tests

def test_every_field_is_downsampled_or_said_to_stay_raw(bat):
    """Each field the service writes is in exactly one of the three lists (a new field must be decided)."""
    written = {f for pts in bat.written.values() for _t, fields in pts for f in fields}
    lists = (BATTERY_STATS, BATTERY_LAST, BATTERY_RAW_ONLY)
    assert sorted(f for fs in lists for f in fs) == sorted(set(f for fs in lists for f in fs))
    assert written <= set(BATTERY_STATS + BATTERY_LAST + BATTERY_RAW_ONLY), written - set(sum(lists, ()))
    assert set(BATTERY_STATS + BATTERY_LAST + BATTERY_RAW_ONLY) == set(FIELDS)   # and none that is never written
    assert {"unknown_reason", "soc_pct", "time_to_go_s", "consumed_ah", "net_current_a"} <= written


def test_the_data_has_what_the_checks_need(bat):
    """Known and unknown state of charge, stale points, a synchronisation each day: else the checks below
    would pass on data without the cases they are about."""
    house = [f for _t, f in bat.written[("pi1", "house")]]
    assert house[-1]["synchronisations"] >= 2
    assert sum(f["soc_known"] for f in house) > 1000 and sum(not f["soc_known"] for f in house) > 1000
    assert any(f.get("unknown_reason", "").startswith("state lost") for f in house)
    assert 1 <= sum("net_current_a" not in f for f in house) < 20
    assert not any(f["soc_known"] for _t, f in bat.written[("pi1", "van")])
    assert all(f["soc_known"] for _t, f in bat.written[("pi2", "house")][-1000:])


@pytest.mark.parametrize("rp", [MINUTE_RP, HOUR_RP])
def test_downsampled_values_are_the_means_and_last_values_of_what_was_written(bat, rp):
    got = stored(bat, rp)
    assert set(got) == set(bat.written)
    for key, points in bat.written.items():
        want = expected_1m(points)
        if rp == HOUR_RP:
            want = expected_1h(want)
        assert got[key].keys() == want.keys(), (key, rp)
        bad = [t for t in want if not same(got[key][t], want[t])]
        assert not bad, (key, rp, got[key][bad[0]], want[bad[0]])


def test_unknown_values_stay_unknown_not_zero(bat):
    """A bucket where the state of charge was unknown throughout has no soc_pct_*: no 0, no carried value;
    where it was known in part, the mean is over the known points only."""
    for rp in (MINUTE_RP, HOUR_RP):
        got = stored(bat, rp)
        assert all(not any(k.startswith(("soc_pct", "time_to_go", "consumed")) for k in row)
                   for row in got[("pi1", "van")].values()), rp
        house = got[("pi1", "house")]
        unknown = [row for row in house.values() if row["soc_known"] is False and "soc_pct_mean" not in row]
        assert len(unknown) > (30 if rp == MINUTE_RP else 3), rp
        assert not any(row.get("soc_pct_min") == 0 for row in house.values())
        assert all(type(row["soc_known"]) is bool and type(row["status"]) is str and
                   type(row["synchronisations"]) is int for row in house.values())
        assert not any("unknown_reason" in row for row in house.values())


def test_per_day_increase_of_the_totals_is_the_same_at_every_resolution(bat):
    """Differencing the last totals of consecutive buckets counts each step in the bucket it happened in:
    the totals' increase per UTC day, from 1-minute or 1-hour data, is the raw data's (first day aside: a
    bucket's steps before the first bucket's last point are not counted)."""
    for key in bat.written:
        per_rp = {}
        for rp in RPS:
            series = stored(bat, rp)[key]
            days: dict[int, float] = defaultdict(float)
            prev = None
            for t in sorted(series):
                v = series[t]["discharged_ah"]
                if prev is not None:
                    days[t // 86400_000_000_000] += max(0.0, v - prev)
                prev = v
            per_rp[rp] = days
        first = min(per_rp["autogen"])
        for rp in (MINUTE_RP, HOUR_RP):
            for d, v in per_rp["autogen"].items():
                if d != first:
                    assert per_rp[rp][d] == pytest.approx(v, abs=1e-4), (key, rp, d)   # the totals only grow: no step-back hidden in a bucket


# ------------------------------------------------------------------------------------------ the dashboard

def panel(title: str) -> dict:
    dash = load_dashboards()["dcmon-overview.json"]
    (p,) = [p for p in data_panels(dash) if p["title"] == title]
    return p


def run_panel(bat, title: str, rp: str, *, rng: str | None = None, interval: str = "1m",
              tz: str = "UTC") -> dict[tuple[str, str], list]:
    p = panel(title)
    rng = rng or p.get("timeFrom") or "now-3d"
    values = {"host": (["pi1", "pi2"], True), "tz": ([tz], False), "rp": ([rp], False)}
    q = expand(p["targets"][0]["query"].replace("$__interval", interval), values, time_filters(rng, bat.now)[0])
    return {(s["tags"]["host"], s["tags"]["battery"]): s["values"] for s in bat.query(q)}


def test_the_row_reads_rp_for_trends_and_day_bars_and_the_raw_data_for_now(bat):
    panels = {p["title"]: p for p in data_panels(load_dashboards()["dcmon-overview.json"]) if is_battery(p)}
    trends = {"Net current", "Battery state of charge", "Ah charged and discharged per day"}
    for title, p in panels.items():
        assert ('"$rp"."battery"' in p["targets"][0]["query"]) == (title in trends), title
    for title in set(panels) - trends:        # the newest raw point, whatever $rp is
        results = [run_panel(bat, title, rp) for rp in RPS]
        assert results[0] and results[0] == results[1] == results[2], title
    (_t, soc, _known), = run_panel(bat, "State of charge", HOUR_RP)[("pi1", "house")]
    assert soc == bat.written[("pi1", "house")][-1][1]["soc_pct"]


def test_a_years_range_reads_the_hourly_series(bat):
    """The hidden variable, from dcmon_meta as influx-setup wrote it: dcmon_1h for a year; the trend then has
    one value an hour (at a year's $__interval, a few hours)."""
    dash = load_dashboards()["dcmon-overview.json"]
    (var,) = [v for v in dash["templating"]["list"] if v["name"] == "rp"]
    (s,) = bat.query(expand(var["query"], {}, time_filters("now-365d", bat.now)[0]))
    assert s["values"][0][1] == HOUR_RP
    got = run_panel(bat, "Battery state of charge", HOUR_RP, rng="now-365d", interval="1h")
    want = expected_1h(expected_1m(bat.written[("pi2", "house")]))
    assert {t: v for t, v in got[("pi2", "house")]} == pytest.approx(
        {t: r["soc_pct_mean"] for t, r in want.items() if "soc_pct_mean" in r})


@pytest.mark.parametrize("title,field", [("Battery state of charge", "soc_pct"), ("Net current", "net_current_a")])
def test_trend_panels_at_each_policy(bat, title, field):
    """Per hour ($__interval = 1h): from raw data the mean of the hour's points, from 1-minute data the mean
    of its minutes' means, from 1-hour data the hour's value; the three agree in every hour whose minutes
    each hold the same number of points."""
    for key, points in bat.written.items():
        minutes = expected_1m(points)
        hours = expected_1h(minutes)
        raw: dict[int, list[float]] = defaultdict(list)
        for t, f in points:
            if field in f:
                raw[t // HOUR_NS * HOUR_NS].append(f[field])
        want = {"autogen": {t: sum(v) / len(v) for t, v in raw.items()},
                MINUTE_RP: {t: r[f"{field}_mean"] for t, r in hours.items() if f"{field}_mean" in r},
                HOUR_RP: {t: r[f"{field}_mean"] for t, r in hours.items() if f"{field}_mean" in r}}
        got = {}
        for rp in RPS:
            rows = run_panel(bat, title, rp, interval="1h").get(key, [])
            got[rp] = {t: v for t, v in rows}
            assert got[rp] == pytest.approx(want[rp]), (key, rp)
        even = [t for t in want["autogen"] if len(raw[t]) == 3600 // POLL_S]   # as many in each minute
        if key == ("pi1", "van"):         # one meter on the battery cable: neither is known
            assert not want["autogen"]
        else:
            assert len(even) > 10, key
        for t in even:
            assert got[HOUR_RP][t] == pytest.approx(got["autogen"][t]), (key, t)
    # a battery that never knew its state of charge has no trend at any resolution (not a line at 0)
    assert all(("pi1", "van") not in run_panel(bat, "Battery state of charge", rp) for rp in RPS)


def day_sums(series: list[tuple[int, dict]], field: str, tz: str) -> dict[int, float]:
    """Each step of a total (non-negative), counted on the later point's local day; keys: the day's start, ns."""
    zone = ZoneInfo(tz)
    out: dict[int, float] = defaultdict(float)
    prev = None
    for t, fields in sorted(series, key=lambda p: p[0]):
        if field not in fields:
            continue
        if prev is not None:
            day = dt.datetime.fromtimestamp(t / 1e9, zone).replace(hour=0, minute=0, second=0, microsecond=0)
            out[int(day.timestamp()) * 10**9] += max(0.0, fields[field] - prev)
        prev = fields[field]
    return out


@pytest.mark.parametrize("tz", ["UTC", "Europe/Berlin"])
def test_ah_per_day_at_each_policy(bat, tz):
    """The panel sums the totals' steps per day, per host and battery: from each policy, the steps of the
    totals that policy holds (raw: every point's; 1 m / 1 h: each bucket's last), days in $tz."""
    for rp in RPS:
        got = run_panel(bat, "Ah charged and discharged per day", rp, tz=tz)
        assert set(got) == set(bat.written), rp
        for key in bat.written:
            series = list(stored(bat, rp)[key].items())
            for col, field in ((1, "charged_ah"), (2, "discharged_ah")):
                want = day_sums(series, field, tz)
                have = {r[0]: r[col] for r in got[key] if r[col]}
                assert have == pytest.approx({t: v for t, v in want.items() if v}), (rp, key, field)
    # and the days agree across the policies (the first day aside: it starts with the data)
    per_rp = {rp: run_panel(bat, "Ah charged and discharged per day", rp, tz=tz)[("pi1", "house")] for rp in RPS}
    days = [r[0] for r in per_rp["autogen"] if r[2]][1:]
    assert len(days) >= 2
    for rp in (MINUTE_RP, HOUR_RP):
        for raw_row, row in zip(per_rp["autogen"], per_rp[rp]):
            if raw_row[0] in days:
                assert row[1:] == pytest.approx(raw_row[1:], abs=1e-4), (rp, raw_row[0])


# ------------------------------------------------------------------------------ other paths in

def test_a_database_set_up_before_the_battery_queries_gets_its_history_downsampled(influxd, tmp_path, bat):
    """An install set up by an older influx-setup (no battery continuous queries) with battery points
    stored: the next run creates the queries and downsamples the stored battery points once."""
    db = "t_setup_battery_upgrade"
    influxd.drop_db(db)
    cfg = make_cfg(tmp_path, "pi1", influxd.url, db, capacity=5, chemistry="lead-acid", van=True)
    with Influx(cfg.influxdb) as api:
        setup(cfg, api, say=lambda _l: None)
        for name in ("dcmon_battery_1m", "dcmon_battery_1h"):
            api.run(f'DROP CONTINUOUS QUERY "{name}" ON "{db}"')
    pi1, _pi2 = bat.hosts
    write(cfg, pi1.lines)
    said: list[str] = []
    with Influx(cfg.influxdb) as api:
        setup(cfg, api, say=said.append)
    assert "continuous query dcmon_battery_1m" in said
    assert "downsampling the raw data of 'battery' already in the database (once) ..." in said
    for rp in (MINUTE_RP, HOUR_RP):
        (s,) = influxd.query(f'SELECT count("status") FROM "{rp}"."battery" WHERE "battery" = \'house\'', db)
        want = expected_1m(bat.written[("pi1", "house")])
        assert s["values"][0][1] == len(want if rp == MINUTE_RP else expected_1h(want)), rp
    said.clear()
    with Influx(cfg.influxdb) as api:
        setup(cfg, api, say=said.append)
    assert said == [f"'{db}' on {influxd.url}: already set up, nothing changed"]
    influxd.drop_db(db)


def test_backfill_after_a_drain_downsamples_battery_points(influxd, tmp_path, bat):
    """The sender's backfill (what runs after a backlog is sent) covers the battery measurement too."""
    db = "t_setup_battery_backfill"
    influxd.drop_db(db)
    cfg = make_cfg(tmp_path, "pi2", influxd.url, db, capacity=10, chemistry="lifepo4", van=False)
    with Influx(cfg.influxdb) as api:
        setup(cfg, api, say=lambda _l: None)
    _pi1, pi2 = bat.hosts
    late = pi2.lines[-3 * 3600 // POLL_S:]                    # the last 3 hours, delivered after an outage
    write(cfg, late)
    start = int(late[0].rsplit(" ", 1)[1])
    Backfill(cfg)._run(start - MIN_NS, int(late[-1].rsplit(" ", 1)[1]) + MIN_NS)   # the thread's body
    want = expected_1m(bat.written[("pi2", "house")][-len(late):])
    got = {}
    for s in influxd.query(f'SELECT * FROM "{MINUTE_RP}"."battery"', db):
        got.update({v[0]: {c: x for c, x in zip(s["columns"][1:], v[1:]) if x is not None and c not in ("host", "battery")}
                    for v in s["values"]})
    assert got.keys() == want.keys() and all(same(got[t], want[t]) for t in want)
    influxd.drop_db(db)


def test_print_flux_has_the_battery_task(tmp_path):
    cfg = make_cfg(tmp_path, "pi1", "http://127.0.0.1:9", "dcmon", capacity=5, chemistry="lead-acid", van=False)
    text = flux_tasks(cfg)
    block = text[text.index('option task = {name: "dcmon_battery_1m"'):]
    assert 'r._measurement == "battery"' in block and "fn: last" in block and 'to(bucket: "dcmon_1m")' in block
    assert all(f'r._field == "{f}"' in block for f in BATTERY_STATS + BATTERY_LAST)
    assert 'r._field == "unknown_reason"' not in block
