"""Two hosts with the same sensor names in one real InfluxDB: every panel per host and sensor, checked
against numbers computed here from what each poller wrote; the downsampled series against the raw data;
the alert rules' queries against what should fire.

Two real pollers (dcmon.poller.Poller, hosts "north" and "south", both with sensors "battery" and "solar" on
simulated PZEM-017s, sensor tag site = the host's name) write through the real writer; each cycle is
restamped onto a three-day history as in test_grafana.py (whose Grafana expansion this test reuses).
`dcmon influx-setup` (influx_setup.setup) then makes the retention policies and downsamples it all.
The dashboards' time zone comes from the hosts (influxdb.timezone = Europe/Berlin).
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections import defaultdict
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import httpx
import pytest

from dcmon import config
from dcmon import poller as poller_mod
from dcmon.outputs.influx import InfluxSink
from dcmon.influx_setup import Influx, setup
from dcmon.poller import Poller
from dcmon.simulator import Simulator, meters_for
from dcmon.spool import SpoolStats
from test_grafana import (GRAFANA, data_panels, is_battery, expand, groups_by, load_dashboards, load_yaml, restamp,
                          time_filters, variable_values)

TZ = ZoneInfo("Europe/Berlin")
HOSTS = {"north": 110, "south": 220}           # Wh per cycle
SENSORS = ("battery", "solar")
HISTORY_S = [-3 * 86400, -2 * 86400, -30 * 3600, -12 * 3600, -3 * 3600, -3000]
RECENT = 5
RESET = ("north", "solar", 3)                  # host, sensor, cycle: counter reset to 5 Wh
SILENT = ("south", "solar")                    # silent in the recent cycles (the last 4 minutes)
THRESHOLDS = {"north": {"battery": 14.0}, "south": {"battery": 10.0}}   # the simulator shows ≈13.3 V

CFG = """
[poller]
host = "{host}"
settle_s = 0

[influxdb]
url = "{url}"
database = "{db}"
timezone = "Europe/Berlin"
low_voltage_v = {{ battery = {low} }}

[buses.house]
port = "{port}"
timeout_s = 0.15
retries = 0
gap_s = 0.005

[[sensors]]
name = "battery"
bus = "house"
address = 1
tags = {{ site = "{host}" }}

[[sensors]]
name = "solar"
bus = "house"
address = 2
tags = {{ site = "{host}" }}
"""


def offsets(now: float) -> list[float]:
    midnight = dt.datetime.fromtimestamp(now, TZ).replace(hour=0, minute=0, second=0, microsecond=0)
    span = min(240.0, (now - midnight.timestamp()) * 0.9)
    return HISTORY_S + [-span + span * i / (RECENT - 1) for i in range(RECENT)]


@pytest.fixture(scope="module")
def data(influxd, tmp_path_factory):
    db = "t_hosts"
    influxd.drop_db(db)
    tmp = tmp_path_factory.mktemp("hosts")
    now = time.time()
    offs = offsets(now)
    written: dict[tuple[str, str], list[tuple[int, dict]]] = defaultdict(list)   # (host, sensor) → readings
    cfgs = {}
    # the fixture compresses days into a second: its counter steps would be faster than any meter can count
    no_rise_limit = pytest.MonkeyPatch()
    no_rise_limit.setattr(poller_mod, "max_counter_rise", lambda model, seconds: float("inf"))
    for host, step in HOSTS.items():
        with Simulator(meters_for([("pzem017", 1), ("pzem017", 2)])) as sim:
            (tmp / f"{host}.toml").write_text(CFG.format(host=host, url=influxd.url, db=db, port=sim.path,
                                                         low=THRESHOLDS[host]["battery"]))
            cfg = cfgs[host] = config.load(tmp / f"{host}.toml", env={})
            meters = {"battery": sim.meter(1), "solar": sim.meter(2)}
            lines: list[str] = []
            poller = Poller(cfg, put=lines.extend)
            sink = InfluxSink(cfg.influxdb)
            if host == "north":
                influxd.create_db(db)
            try:
                for k, off in enumerate(offs):
                    for name, m in meters.items():
                        m.energy_wh = 5.0 if (host, name, k) == RESET else m.energy_wh + step
                    meters["solar"].silent = (host, "solar") == SILENT and k >= len(HISTORY_S)
                    lines.clear()
                    first = time.time_ns()
                    base = int((now + off) * 1e9)
                    for r in poller.poll_bus_once("house"):
                        written[(host, r.sensor)].append((base + r.time_ns - first, r.fields))
                    oldest = first - (1200 if host == "south" else 2) * 10**9      # south: a 20-minute backlog
                    spool = SpoolStats(depth=k, bytes=0, file_bytes=0, oldest_time_ns=oldest,
                                       dropped_total=k if host == "north" else 0, quarantined=0, last_error="")
                    sink.write(restamp(lines + poller.health_lines(spool, SimpleNamespace(sent_points=k, send_failures=0)),
                                       base, first))
            finally:
                poller.close()
                sink.close()
    no_rise_limit.undo()
    # a third host that died an hour ago (the dead-man rule must name it)
    httpx.post(f"{influxd.url}/write", params={"db": db, "precision": "s"},
               content=f"dcmon_health,bus=_all,host=east,sensor=_poller cycles=7i {int(now) - 3600}\n").raise_for_status()
    for host, cfg in cfgs.items():
        with Influx(cfg.influxdb) as api:
            setup(cfg, api, say=lambda _line: None)
    with httpx.Client(base_url=influxd.url, timeout=60) as client:

        def query(q: str) -> list[dict]:
            r = client.get("/query", params={"q": q, "db": db, "epoch": "ns"})
            r.raise_for_status()
            res = r.json()["results"][0]
            assert "error" not in res, f"{q}: {res['error']}"
            return res.get("series", [])

        yield SimpleNamespace(db=db, now=now, written=dict(written), query=query)
    influxd.drop_db(db)


# ------------------------------------------------------------------------------ independent numbers

def increments(readings: list[tuple[int, dict]]) -> list[tuple[int, float]]:
    """Each reading's energy: the counter's step, or after a reset its new count."""
    out, prev = [], None
    for t, f in readings:
        e = float(f["energy_wh"])
        if f["energy_reset"]:
            out.append((t, e))
        elif prev is not None:
            out.append((t, max(0.0, e - prev)))
        prev = e
    return out


def bucket_start(t_ns: int, unit: str) -> int:
    local = dt.datetime.fromtimestamp(t_ns / 1e9, TZ)
    if unit == "1h":
        local = local.replace(minute=0, second=0, microsecond=0)
    else:
        local = local.replace(hour=0, minute=0, second=0, microsecond=0)
        if unit == "week":
            local -= dt.timedelta(days=local.weekday())
    return int(local.timestamp()) * 10**9


def expected_energy(data, unit: str, hosts=HOSTS) -> dict[tuple[str, str], dict[int, float]]:
    out: dict[tuple[str, str], dict[int, float]] = {}
    for (host, sensor), rs in data.written.items():
        if host in hosts:
            per: dict[int, float] = defaultdict(float)
            for t, inc in increments(rs):
                per[bucket_start(t, unit)] += inc
            out[(host, sensor)] = dict(per)
    return out


def by_series(series: list[dict], col: int = 1) -> dict[tuple[str, str, int], float]:
    """(host, sensor, bucket start) → the non-zero values of a grouped result."""
    out: dict[tuple[str, str, int], float] = defaultdict(float)
    for s in series:
        for row in s["values"]:
            if row[col]:
                out[(s["tags"]["host"], s["tags"]["sensor"], row[0])] += row[col]
    return dict(out)


def flat(per: dict[tuple[str, str], dict[int, float]]) -> dict[tuple[str, str, int], float]:
    return {(*k, t): v for k, d in per.items() for t, v in d.items() if v}


def panel(dash: dict, title: str, kind: str | None = None) -> dict:
    (p,) = [p for p in data_panels(dash) if p["title"] == title and (kind is None or p["type"] == kind)]
    return p


def run(data, dash: dict, p: dict, values: dict, ref: str = "A", rng: str | None = None) -> list[dict]:
    (t,) = [t for t in p["targets"] if t["refId"] == ref]
    rng = rng or p.get("timeFrom") or dash["time"]["from"]
    return data.query(expand(t["query"], values, time_filters(rng, time.time())[0]))


VARIABLE_SETS = [{}, {"host": "north"}, {"host": "south"}, {"site": "south"}]


def values_for(data, dash: dict, choice: dict, rng: str = "now-6h") -> dict:
    """The dashboard's variables with ``choice`` applied: multi variables then hold that one value."""
    tf = time_filters(rng, time.time())[0]
    values = variable_values(data, dash, {k: v for k, v in choice.items()
                                          if not next(x for x in dash["templating"]["list"] if x["name"] == k)["multi"]},
                             time_filter=tf)
    for k, v in choice.items():
        if values[k][1]:
            values[k] = ([v], True)
    return values


# ----------------------------------------------------------------------------------------- tests

def test_variables_list_both_hosts_and_pick_the_policy_by_range(data):
    dash = load_dashboards()["dcmon-overview.json"]
    values = variable_values(data, dash)
    assert values["host"] == (["north", "south"], True)
    assert values["sensor"] == (["battery", "solar"], True)
    assert values["tz"] == (["Europe/Berlin"], False)
    (site,) = [v for v in dash["templating"]["list"] if v["name"] == "site"]
    found = {r[1] for s in data.query(expand(site["query"], {"host": (["south"], True)}, "")) for r in s["values"]}
    assert found == {"south"}
    for rng, rp in (("now-6h", "autogen"), ("7d", "dcmon_1m"), ("now-30d", "dcmon_1m"), ("now-90d", "dcmon_1h")):
        assert variable_values(data, dash, time_filter=time_filters(rng, time.time())[0])["rp"] == ([rp], False), rng


def test_every_panel_returns_only_the_selected_hosts_series(data):
    """Every query of both dashboards, with each variable set: no error, data, and (grouped) exactly the
    selected hosts' sensors — never two hosts' series merged."""
    for name, dash in load_dashboards().items():
        for choice in VARIABLE_SETS:
            if name == "dcmon-sensor.json":
                choice = {"host": choice.get("host", "north"), "sensor": "battery"}
            values = values_for(data, dash, choice)
            hosts = {choice["host"]} if "host" in choice else {choice["site"]} if "site" in choice else set(HOSTS)
            for p in data_panels(dash):
                if is_battery(p):
                    continue                 # tests/test_grafana_battery.py
                for t in p["targets"]:
                    for tf in time_filters(p.get("timeFrom") or dash["time"]["from"], time.time()):
                        q = expand(t["query"], values, tf)
                        series = data.query(q)
                        where = f"{name} {choice} {p['title']}/{t['refId']}"
                        if "ac_power" in q and "dc_power" not in q:
                            assert not series, where                   # no AC meters here
                            continue
                        assert series, f"{where}: no data: {q}"
                        if groups_by(q, "host") and not ("site" in choice and "dcmon_health" in q):
                            assert {s["tags"]["host"] for s in series} == hosts, where
                        if groups_by(q, "sensor") and "_poller" not in q:
                            want = {choice["sensor"]} if "sensor" in choice else set(SENSORS)
                            assert {s["tags"]["sensor"] for s in series} == want, where


def test_energy_per_day_week_and_today_per_host_and_sensor(data):
    dash = load_dashboards()["dcmon-overview.json"]
    for choice in VARIABLE_SETS[:3]:
        values = values_for(data, dash, choice)
        hosts = [choice["host"]] if choice else list(HOSTS)
        want_day = expected_energy(data, "day", hosts)
        got_day = by_series(run(data, dash, panel(dash, "Energy per day"), values))
        assert got_day == pytest.approx(flat(want_day)), choice
        got_week = by_series(run(data, dash, panel(dash, "Energy per week"), values))
        assert got_week == pytest.approx(flat(expected_energy(data, "week", hosts))), choice
        today = bucket_start(int(time.time() * 1e9), "day")
        series = run(data, dash, panel(dash, "Energy today", "stat"), values)
        got_today = {(s["tags"]["host"], s["tags"]["sensor"]): s["values"][-1] for s in series}
        for key, per_day in want_day.items():
            assert got_today[key][0] == today and got_today[key][1] == pytest.approx(per_day.get(today, 0.0)), key
        total: dict[int, float] = defaultdict(float)
        for per_day in want_day.values():
            for t, v in per_day.items():
                total[t] += v
        (s,) = run(data, dash, panel(dash, "Energy per day, all selected"), values)
        assert {r[0]: r[1] for r in s["values"] if r[1]} == pytest.approx(dict(total)), choice
    # the reset is counted: north solar's new count (5 Wh), not a lost step
    north_solar = sum(expected_energy(data, "day")[("north", "solar")].values())
    assert north_solar == pytest.approx(HOSTS["north"] * (len(data.written[("north", "solar")]) - 2) + 5)


def test_downsampled_series_agree_with_the_raw_data(data):
    """The sensor dashboard's energy per hour and its voltage band from raw, 1-minute and 1-hour data."""
    dash = load_dashboards()["dcmon-sensor.json"]
    for host in HOSTS:
        for sensor in SENSORS:
            values = values_for(data, dash, {"host": host, "sensor": sensor})
            want = expected_energy(data, "1h", [host])[(host, sensor)]
            for rp in ("autogen", "dcmon_1m", "dcmon_1h"):
                values["rp"] = ([rp], False)
                got = by_series(run(data, dash, panel(dash, "Energy per hour"), values, rng="7d"))
                assert got == pytest.approx(flat({(host, sensor): want})), (host, sensor, rp)
            readings = data.written[(host, sensor)]
            for ref, func in (("A", min), ("C", max)):
                got = {}
                for rp in ("autogen", "dcmon_1m", "dcmon_1h"):
                    values["rp"] = ([rp], False)
                    got[rp] = func(r[1] for s in run(data, dash, panel(dash, "Voltage", "timeseries"), values, ref,
                                                           rng="7d")
                                   for r in s["values"])
                assert set(got.values()) == {func(float(f["voltage_v"]) for _, f in readings)}, (host, sensor, ref)


def test_values_now_per_host(data):
    dash = load_dashboards()["dcmon-overview.json"]
    values = values_for(data, dash, {})
    for title, field in (("Voltage", "voltage_v"), ("Current", "current_a"), ("Power", "power_w")):
        got = {(s["tags"]["host"], s["tags"]["sensor"]): s["values"][0][1]
               for s in run(data, dash, panel(dash, title, "stat"), values)}
        assert got == pytest.approx({k: float(rs[-1][1][field]) for k, rs in data.written.items()}), title


# ----------------------------------------------------------------------------------------- alerts

def alert_rules() -> dict[str, dict]:
    doc = load_yaml(GRAFANA / "provisioning/alerting/dcmon.yaml")
    return {r["uid"]: r for g in doc["groups"] for r in g["rules"]}


def evaluate(data, rule: dict) -> set[tuple[str, ...]]:
    """What Grafana would fire: run the InfluxQL queries over their relative ranges, then the rule's reduce,
    threshold and math expressions (last/max over non-null values; lt/gt; the math forms we use, $X < $Y and
    $X <= $Y, joined on equal labels)."""
    results: dict[str, dict[tuple, float | None]] = {}
    for d in rule["data"]:
        m = d["model"]
        if d["datasourceUid"] != "__expr__":
            secs = d["relativeTimeRange"]["from"]
            now_ms = int(time.time() * 1000)
            tf = f"time >= {now_ms - secs * 1000}ms and time <= {now_ms}ms"
            series = data.query(m["query"].replace("$timeFilter", tf))
            results[d["refId"]] = {tuple(sorted(s.get("tags", {}).items())): [r[1] for r in s["values"]] for s in series}
        elif m["type"] == "reduce":
            fn = {"last": lambda v: v[-1], "max": max}[m["reducer"]]
            results[d["refId"]] = {k: fn([x for x in v if x is not None]) for k, v in results[m["expression"]].items()
                                   if any(x is not None for x in v)}
        elif m["type"] == "threshold":
            (cond,) = m["conditions"]
            op, (limit,) = cond["evaluator"]["type"], cond["evaluator"]["params"]
            results[d["refId"]] = {k: (v < limit if op == "lt" else v > limit)
                                   for k, v in results[m["expression"]].items()}
        else:
            a, op, b = re.fullmatch(r"\$(\w+) (<=?) \$(\w+)", m["expression"]).groups()
            cmp = (lambda x, y: x <= y) if op == "<=" else (lambda x, y: x < y)
            results[d["refId"]] = {k: cmp(results[a][k], results[b][k]) for k in results[a] if k in results[b]}
    return {tuple(v for _, v in k) for k, fire in results[rule["condition"]].items() if fire}


def test_alert_rules_fire_for_what_happened_and_nothing_else(data):
    rules = alert_rules()
    assert evaluate(data, rules["dcmon-low-voltage"]) == {("north", "battery")}
    assert evaluate(data, rules["dcmon-meter-silent"]) == {("south", "solar")}
    assert evaluate(data, rules["dcmon-host-silent"]) == {("east",)}
    assert evaluate(data, rules["dcmon-spool-backlog"]) == {("south",)}
    assert evaluate(data, rules["dcmon-readings-lost"]) == {("north",)}


def test_alert_file_has_the_documented_structure():
    """Grafana's file format for alert rules (docs: Alerting → Provision → Use configuration files): required
    keys, enum values, references between refIds, data sources that exist."""
    doc = load_yaml(GRAFANA / "provisioning/alerting/dcmon.yaml")
    ds = {d["uid"] for d in load_yaml(GRAFANA / "provisioning/datasources/dcmon.yaml")["datasources"]}
    assert doc["apiVersion"] == 1
    uids = set()
    for g in doc["groups"]:
        assert {"orgId", "name", "folder", "interval", "rules"} <= set(g) and re.fullmatch(r"\d+[smh]", g["interval"])
        for r in g["rules"]:
            assert {"uid", "title", "condition", "data", "noDataState", "execErrState", "for"} <= set(r), r["title"]
            assert len(r["uid"]) <= 40 and r["uid"] not in uids
            uids.add(r["uid"])
            assert r["noDataState"] in {"Alerting", "NoData", "OK"} and r["execErrState"] in {"Alerting", "Error", "OK"}
            assert re.fullmatch(r"\d+[smh]", r["for"])
            refs = [d["refId"] for d in r["data"]]
            assert r["condition"] in refs and len(refs) == len(set(refs))
            for d in r["data"]:
                assert d["model"]["refId"] == d["refId"] and {"from", "to"} <= set(d["relativeTimeRange"])
                if d["datasourceUid"] == "__expr__":
                    m = d["model"]
                    assert m["type"] in {"reduce", "threshold", "math"}
                    used = re.findall(r"\$(\w+)", m["expression"]) if m["type"] == "math" else [m["expression"]]
                    assert set(used) <= set(refs[:refs.index(d["refId"])]), r["title"]
                else:
                    assert d["datasourceUid"] in ds and d["model"]["rawQuery"] is True
    assert len(uids) == 6
