"""The Grafana dashboards and provisioning: every query runs on a real InfluxDB, the JSON is sound.

Data: the real poller (dcmon.poller.Poller) polls simulated meters on real pseudo-terminals, 12 cycles: two
PZEM-017 on bus "house" (one of them named "solar.roof", so regex escaping is exercised) and a PZEM-004T on
bus "grid". Between cycles the test advances each meter's energy counter by 100 Wh, resets one counter, makes
one meter silent twice and sets one meter's low-voltage alarm threshold above its voltage. The poller's own
lines (readings and dcmon_health) are written with the real writer (dcmon.outputs.influx.InfluxSink) to the real influxd,
after shifting each cycle's timestamps onto a three-day history (the poller stamps "now"; dashboards need days).

Grafana itself cannot run here (no Debian package; `apt-cache policy grafana` shows none), so the queries
are expanded the way Grafana expands them before they reach InfluxDB:
- ``$timeFilter``: current Grafana runs InfluxQL in its server, which substitutes
  ``time >= <from>ms and time <= <to>ms``; the older browser-side path substitutes
  ``time >= now() - 6h and time <= now()`` for ranges like now-6h. Both forms are run where both exist.
  A panel's ``timeFrom`` (relative time override) replaces the dashboard range, as in Grafana.
- ``$__interval``: ``1m`` (Grafana's formatted interval, as the backend substitutes it).
- template variables (InfluxDB data source ``interpolateQueryExpr``): a multi-value variable becomes
  ``(a|b)`` with each value regex-escaped; a single-value variable is regex-escaped where it stands inside
  ``/.../`` and inserted as it is elsewhere. Variable values come from running the variable's own query.
"""

from __future__ import annotations

import copy
import datetime as dt
import importlib.util
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from dcmon import config
from dcmon import poller as poller_mod
from dcmon.outputs.influx import InfluxSink
from dcmon.influx_setup import Influx, setup
from dcmon.spool import SpoolStats
from dcmon.poller import Poller
from dcmon.simulator import Simulator, meters_for

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "grafana"
DASHBOARDS = GRAFANA / "dashboards"
UIDS = {"dcmon-overview.json": "dcmon-overview", "dcmon-sensor.json": "dcmon-sensor"}  # never change these
INTERVAL = "1m"
DC_SENSORS = {"battery", "solar.roof"}
AC_SENSORS = {"mains"}
MEASUREMENT_OF = {"battery": "dc_power", "solar.roof": "dc_power", "mains": "ac_power"}
# Grafana unit ids the dashboards may use (from Grafana's unit registry).
UNITS = {"volt", "amp", "watt", "watth", "kwatth", "hertz", "none", "short", "ms", "s", "dateTimeFromNow",
         "bool_on_off", "percentunit", "percent", "suffix: Ah"}

# cycle offsets from now, in seconds: three days of history, then dense recent cycles (filled in later, so
# that "today" always holds several of them, even just after midnight)
HISTORY_S = [-3 * 86400, -2 * 86400, -86400 - 3600, -12 * 3600, -5 * 3600, -2 * 3600, -3000]
RECENT = 5
RESET_CYCLE = 3            # battery's counter is reset before this cycle
SILENT_CYCLES = {8, 9}     # solar.roof does not answer (inside the 6 h range, not its first cycle there)
STEP_WH = 100

CFG = """
[poller]
host = "testpi"
settle_s = 0

[influxdb]
url = "{url}"
database = "{db}"

[buses.house]
port = "{dc}"
timeout_s = 0.15
retries = 0
gap_s = 0.005

[buses.grid]
port = "{ac}"
timeout_s = 0.15
retries = 0
gap_s = 0.005

[[sensors]]
name = "battery"
bus = "house"
address = 1

[[sensors]]
name = "solar.roof"
bus = "house"
address = 2

[[sensors]]
name = "mains"
bus = "grid"
address = 1
model = "pzem004t"
"""


# ------------------------------------------------------------------------------------- data fixture

def offsets(now: float) -> list[float]:
    midnight = dt.datetime.fromtimestamp(now, dt.timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    span = min(240.0, (now - midnight.timestamp()) * 0.9)     # recent cycles all fall on today (UTC)
    return HISTORY_S + [-span + span * i / (RECENT - 1) for i in range(RECENT)]


def restamp(lines: list[str], new_ns: int, first_ns: int) -> list[str]:
    out = []
    for ln in lines:
        head, ts = ln.rsplit(" ", 1)
        out.append(f"{head} {new_ns + (int(ts) - first_ns)}")
    return out


@pytest.fixture(scope="module")
def data(influxd, tmp_path_factory):
    """Writes the poller's data and returns what the assertions need to know about it."""
    db = "t_grafana"
    influxd.drop_db(db)
    influxd.create_db(db)
    tmp = tmp_path_factory.mktemp("grafana")
    with Simulator(meters_for([("pzem017", 1), ("pzem017", 2)])) as dc, Simulator(meters_for([("pzem004t", 1)])) as ac:
        (tmp / "config.toml").write_text(CFG.format(url=influxd.url, db=db, dc=dc.path, ac=ac.path))
        cfg = config.load(tmp / "config.toml", env={})
        dc.meter(2).holding[0x0001] = 1400           # low-voltage alarm at 14 V: solar.roof (≈13.3 V) is in alarm
        meters = {"battery": dc.meter(1), "solar.roof": dc.meter(2), "mains": ac.meter(1)}
        lines: list[str] = []
        last: dict[str, tuple[int, dict]] = {}
        poller = Poller(cfg, put=lines.extend)
        sink = InfluxSink(cfg.influxdb)
        now = time.time()
        offs = offsets(now)
        # the fixture compresses days into a second: its counter steps would be faster than any meter can count
        no_rise_limit = pytest.MonkeyPatch()
        no_rise_limit.setattr(poller_mod, "max_counter_rise", lambda model, seconds: float("inf"))
        try:
            for k, off in enumerate(offs):
                for name, m in meters.items():
                    m.energy_wh = 3.0 if (name == "battery" and k == RESET_CYCLE) else m.energy_wh + STEP_WH
                meters["solar.roof"].silent = k in SILENT_CYCLES
                lines.clear()
                first = time.time_ns()
                for bus in ("house", "grid"):
                    for r in poller.poll_bus_once(bus):
                        last[r.sensor] = (int((now + off) * 1e9) + (r.time_ns - first), r.fields)
                spool = SpoolStats(depth=k, bytes=0, file_bytes=0, oldest_time_ns=first - 2 * 10**9, dropped_total=1,
                                   quarantined=0, last_error="")
                batch = restamp(lines + poller.health_lines(spool, SimpleNamespace(sent_points=10 * k, send_failures=0)),
                                int((now + off) * 1e9), first)
                sink.write(batch)
        finally:
            no_rise_limit.undo()
            poller.close()
            sink.close()
    with Influx(cfg.influxdb) as api:       # retention policies and the 1-minute / 1-hour series of all of it
        setup(cfg, api, say=lambda _line: None)
    assert influxd.count("dc_power", db=db) == 2 * len(offs) - len(SILENT_CYCLES)
    with httpx.Client(base_url=influxd.url, timeout=30) as client:    # one connection for ~300 queries

        def query(q: str) -> list[dict]:
            r = client.get("/query", params={"q": q, "db": db, "epoch": "ns"})
            r.raise_for_status()
            res = r.json()["results"][0]
            assert "error" not in res, f"{q}: {res['error']}"
            return res.get("series", [])

        yield SimpleNamespace(db=db, now=now, last=last, cycles=len(offs), query=query)
    influxd.drop_db(db)


# -------------------------------------------------------------------------------- Grafana expansion

def escape_regex(v: str) -> str:
    """@grafana/data escapeRegex: what the InfluxDB data source applies to values inside /.../."""
    return re.sub(r"[\\^$*+?.()|[\]{}/]", lambda m: "\\" + m.group(0), v)


def interpolate(query: str, values: dict[str, tuple[list[str], bool]]) -> str:
    for name in sorted(values, key=len, reverse=True):
        vals, multi = values[name]
        if not multi and re.match(r"\s*[-+]?(\d|\.\d)", vals[0]):     # parseFloat() succeeds: left as it is
            text = vals[0]
        elif multi and vals == [".*"]:
            text = ".*"                                                     # a custom allValue: as it is
        elif multi:
            text = "(" + "|".join(escape_regex(v) for v in vals) + ")"
        elif re.search(rf"/[^/]*\${name}\b[^/]*/", query):
            text = escape_regex(vals[0])
        else:
            text = vals[0]
        query = re.sub(rf"\$\{{{name}\}}|\[\[{name}\]\]|\${name}\b", lambda _m: text, query)
    return query


def time_filters(rng: str, now: float) -> list[str]:
    """$timeFilter for a range start ('now-6h', or a panel timeFrom like '7d' / 'now/d'), in both forms."""
    frm = rng if rng.startswith("now") else f"now-{rng}"
    to_ms = int(now * 1000)
    if frm == "now/d":
        start = dt.datetime.fromtimestamp(now, dt.timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
        return [f"time >= {int(start.timestamp() * 1000)}ms and time <= {to_ms}ms"]
    m = re.fullmatch(r"now-(\d+)([smhdw])", frm)
    assert m, f"range {rng!r}: the test does not know how Grafana expands it"
    secs = int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
    out = [f"time >= {to_ms - secs * 1000}ms and time <= {to_ms}ms"]      # backend
    if m.group(2) != "w":                                                   # browser: now-N[dhms] only
        out.append(f"time >= now() - {m.group(1)}{m.group(2)} and time <= now()")
    return out


def range_ms(time_filter: str, now: float | None = None) -> tuple[int, int]:
    """${__from} and ${__to} for a $timeFilter made by time_filters()."""
    now_ms = int((now or time.time()) * 1000)
    m = re.fullmatch(r"time >= (\d+)ms and time <= (\d+)ms", time_filter)
    if m:
        return int(m.group(1)), int(m.group(2))
    m = re.fullmatch(r"time >= now\(\) - (\d+)([smhd]) and time <= now\(\)", time_filter)
    assert m, time_filter
    return now_ms - int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)] * 1000, now_ms


def expand(query: str, variables: dict[str, tuple[list[str], bool]], time_filter: str) -> str:
    if "${__from}" in query or "${__to}" in query:
        frm_ms, to_ms = range_ms(time_filter)
        query = query.replace("${__from}", str(frm_ms)).replace("${__to}", str(to_ms))
    q = query.replace("$timeFilter", time_filter).replace("$__interval", INTERVAL)
    q = interpolate(q, variables)
    assert not re.search(r"\$[A-Za-z_{]|\[\[", q), f"unexpanded macro in {q}"
    return q


# ---------------------------------------------------------------------------------------- helpers

def load_dashboards() -> dict[str, dict]:
    return {f.name: json.loads(f.read_text(encoding="utf-8")) for f in sorted(DASHBOARDS.glob("*.json"))}


def all_panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))            # panels inside collapsed rows
    return out


def data_panels(dash: dict) -> list[dict]:
    return [p for p in all_panels(dash) if p["type"] != "row"]


def expected_columns(query: str) -> list[str]:
    """Column names InfluxDB returns for the outer SELECT: the alias, or the function's name, or the field."""
    if query.upper().startswith("SHOW TAG VALUES"):
        return ["key", "value"]
    body = query[len("SELECT "):]
    depth, items, cur = 0, [], ""
    for i, ch in enumerate(body):
        if depth == 0 and body.startswith(" FROM ", i):
            break
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    cols = []
    for item in (s.strip() for s in items):
        m = re.search(r'\bAS "([^"]+)"$', item)
        rx = re.fullmatch(r'(\w+)\(/\^(\w+)\(_\w+\)\?\$/\)', item)     # min(/^voltage_v(_min)?$/) on raw data
        cols.append(m.group(1) if m else f"{rx.group(1)}_{rx.group(2)}" if rx else
                    (item.split("(")[0] if "(" in item else item.strip('"')))
    return ["time"] + cols


def measurements(query: str) -> set[str]:
    return set(re.findall(r'"(dc_power|ac_power|dcmon_health)"', query))


def groups_by(query: str, tag: str) -> bool:
    """Whether the outer query's GROUP BY names this tag (a subquery's GROUP BY does not count)."""
    idx = query.rfind("GROUP BY")
    rest = query[idx:] if idx >= 0 else ""
    return bool(rest) and rest.count(")") <= rest.count("(") and f'"{tag}"' in rest


def variable_values(data, dash: dict, chosen: dict[str, str] | None = None,
                    time_filter: str = "time >= now() - 6h and time <= now()") -> dict[str, tuple[list[str], bool]]:
    """Resolve the dashboard's variables in order, as Grafana does: run each query variable with the
    variables before it expanded; a multi variable takes All (its allValue when it has one, as it is, not
    escaped: the test passes it as an already-expanded regex); a single one takes ``chosen`` or the first."""
    values: dict[str, tuple[list[str], bool]] = {}
    for var in dash["templating"]["list"]:
        if var["type"] == "textbox":
            values[var["name"]] = ([var["query"]], False)
            continue
        series = data.query(expand(var["query"], values, time_filter))
        found = sorted({str(row[1]) for s in series for row in s["values"]})
        if var.get("allValue") and (chosen or {}).get(var["name"]) is None:
            values[var["name"]] = ([var["allValue"]], True)
            continue
        assert found, f"variable {var['name']}: {var['query']} found nothing"
        if var["multi"]:
            values[var["name"]] = (found, True)
        else:
            pick = (chosen or {}).get(var["name"], found[0])
            assert pick in found
            values[var["name"]] = ([pick], False)
    return values


def check_result(series: list[dict], query: str, sensors: set[str], where: str) -> None:
    """Non-empty, the expected columns, a value in every column, and (grouped by sensor) the right sensors."""
    assert series, f"{where}: no data for {query}"
    cols = expected_columns(query)
    for s in series:
        assert s["columns"] == cols, f"{where}: columns {s['columns']} != {cols}"
    for i, c in enumerate(cols[1:], start=1):
        assert any(row[i] is not None for s in series for row in s["values"]), f"{where}: column {c} all null"
    if groups_by(query, "sensor"):
        got = {s["tags"]["sensor"] for s in series}
        assert got == sensors, f"{where}: sensors {got} != {sensors}"
    if groups_by(query, "host"):
        assert {s["tags"]["host"] for s in series} == {"testpi"}


def kinds(query: str) -> set[str]:
    """The sensors a query can return data for, by the measurements it reads."""
    m = measurements(query)
    if "dcmon_health" in m:
        return DC_SENSORS | AC_SENSORS
    return {s for s, meas in MEASUREMENT_OF.items() if meas in m}


def is_battery(p: dict) -> bool:
    """A panel of the battery row (it reads the ``battery`` measurement, which this module's data lacks)."""
    return any(re.search(r'FROM ("\$rp"\.)?"battery"', t["query"]) for t in p["targets"])


def panel_by_title(dash: dict, title: str) -> dict:
    (p,) = [p for p in data_panels(dash) if p["title"] == title]
    return p


def run_panel(data, dash: dict, title: str, values: dict, ref: str = "A") -> list[dict]:
    p = panel_by_title(dash, title)
    (t,) = [t for t in p["targets"] if t["refId"] == ref]
    rng = p.get("timeFrom") or dash["time"]["from"]
    return data.query(expand(t["query"], values, time_filters(rng, time.time())[0]))


# ------------------------------------------------------------------------------ live query tests

def test_overview_every_query_returns_data_for_all_sensors(data):
    dash = load_dashboards()["dcmon-overview.json"]
    values = variable_values(data, dash)
    assert values["bus"] == (["grid", "house"], True)
    assert values["sensor"] == (sorted(DC_SENSORS | AC_SENSORS), True)
    ran, targets = 0, sum(len(p["targets"]) for p in data_panels(dash) if not is_battery(p))
    for p in data_panels(dash):
        if is_battery(p):
            continue                     # the battery row: tests/test_grafana_battery.py, on BatteryService's points
        rng = p.get("timeFrom") or dash["time"]["from"]
        for t in p["targets"]:
            for tf in time_filters(rng, time.time()):
                q = expand(t["query"], values, tf)
                check_result(data.query(q), q, kinds(q), f"overview/{p['title']}/{t['refId']}")
                ran += 1
    assert targets >= 20 and ran > targets          # both $timeFilter forms where Grafana has both


def test_sensor_dashboard_every_query_for_each_sensor(data):
    """Each sensor chosen in turn: every panel that reads that sensor's measurement has its data, and only its."""
    dash = load_dashboards()["dcmon-sensor.json"]
    (sensor_var,) = [v for v in dash["templating"]["list"] if v["name"] == "sensor"]
    names = {row[1] for s in data.query(expand(sensor_var["query"], {"host": (["testpi"], False), "site": ([".*"], True),
                                                                      "bus": (["grid", "house"], True)}, ""))
             for row in s["values"]}
    assert names == DC_SENSORS | AC_SENSORS
    for name in sorted(names):
        values = variable_values(data, dash, {"sensor": name})
        checked = 0
        for p in data_panels(dash):
            rng = p.get("timeFrom") or dash["time"]["from"]
            for t in p["targets"]:
                if name not in kinds(t["query"]):
                    continue
                for tf in time_filters(rng, time.time()):
                    q = expand(t["query"], values, tf)
                    check_result(data.query(q), q, {name}, f"sensor {name}/{p['title']}/{t['refId']}")
                    if not groups_by(q, "sensor") and "dcmon_health" not in q:
                        # not grouped: make sure the filter really kept the other sensors out
                        other = data.query(q.replace(escape_regex(name), "nonexistent"))
                        assert not other, f"{p['title']}: the sensor filter is not applied"
                checked += 1
        assert checked >= (12 if name in AC_SENSORS else 13)


def test_annotation_queries_find_the_counter_reset(data):
    for fname, dash in load_dashboards().items():
        values = variable_values(data, dash, {"sensor": "battery"})
        (ann,) = [a["target"] for a in dash["annotations"]["list"] if a.get("datasource", {}).get("type") == "influxdb"]
        series = data.query(expand(ann["query"], values, time_filters("now-7d", time.time())[0]))
        rows = [dict(zip(s["columns"], r)) for s in series for r in s["values"]]
        assert [r["sensor"] for r in rows] == ["battery"], fname
        assert {ann["tagsColumn"], ann["textColumn"]} <= set(series[0]["columns"])


def test_values_now_and_freshness_match_the_last_readings(data):
    dash = load_dashboards()["dcmon-overview.json"]
    values = variable_values(data, dash)
    for title, field in (("Voltage", "voltage_v"), ("Current", "current_a"), ("Power", "power_w")):
        (stat,) = [p for p in data_panels(dash) if p["title"] == title and p["type"] == "stat"]
        q = expand(stat["targets"][0]["query"], values, time_filters("now-6h", time.time())[0])
        got = {s["tags"]["sensor"]: s["values"][0][1] for s in data.query(q)}
        assert got == pytest.approx({n: float(f[field]) for n, (_, f) in data.last.items()})
    seen = {s["tags"]["sensor"]: s["values"][0][0] for s in run_panel(data, dash, "Last reading", values)}
    assert seen == {n: t for n, (t, _) in data.last.items()}        # ns: the poller's own timestamps


def test_energy_totals_are_counter_steps_and_skip_the_reset(data):
    """Every 100 Wh step counts, once, in the day and the week bars; the reset's downward step is not use."""
    dash = load_dashboards()["dcmon-overview.json"]
    values = variable_values(data, dash)
    steps = data.cycles - 1
    # the reset: its downward step is no use, its new count (3 Wh) is
    want = {"battery": STEP_WH * (steps - 1) + 3, "solar.roof": STEP_WH * steps, "mains": STEP_WH * steps}
    for title in ("Energy per day", "Energy per week"):
        series = run_panel(data, dash, title, values)
        totals = {s["tags"]["sensor"]: sum(r[1] for r in s["values"]) for s in series}
        assert totals == pytest.approx(want, abs=0.01), title
    days = run_panel(data, dash, "Energy per day", values)
    assert max(len(s["values"]) for s in days) >= 3                 # three days of history → several bars
    week_starts = {r[0] for s in run_panel(data, dash, "Energy per week", values) for r in s["values"]}
    assert all(dt.datetime.fromtimestamp(t / 1e9, dt.timezone.utc).weekday() == 0 for t in week_starts)


def test_day_totals_follow_the_tz_variable(data):
    dash = load_dashboards()["dcmon-overview.json"]
    values = variable_values(data, dash)
    values["tz"] = (["Asia/Kolkata"], False)                        # UTC+05:30: buckets start 18:30 UTC
    starts = {r[0] for s in run_panel(data, dash, "Energy per day", values) for r in s["values"]}
    assert {dt.datetime.fromtimestamp(t / 1e9, dt.timezone.utc).strftime("%H:%M") for t in starts} == {"18:30"}


def test_alarm_and_health_panels_show_what_happened(data):
    dash = load_dashboards()["dcmon-overview.json"]
    values = variable_values(data, dash)
    alarms = {s["tags"]["sensor"]: {r[2] for r in s["values"]} for s in run_panel(data, dash, "Alarms", values)}
    assert alarms == {"battery": {False}, "solar.roof": {True}}     # low-voltage alarm column
    failed = {s["tags"]["sensor"]: sum(r[1] for r in s["values"])
              for s in run_panel(data, dash, "Failed polls", values)}
    assert failed == {"battery": 0, "solar.roof": len(SILENT_CYCLES), "mains": 0}
    up = {s["tags"]["sensor"]: [r[1] for r in s["values"]] for s in run_panel(data, dash, "Sensor answering", values)}
    assert False in up["solar.roof"] and all(up["battery"])
    depth = run_panel(data, dash, "Spool depth", values)
    assert max(r[1] for r in depth[0]["values"]) == data.cycles - 1


def test_bus_variable_filters_sensors(data):
    dash = load_dashboards()["dcmon-overview.json"]
    values = variable_values(data, dash)
    values["bus"] = (["grid"], True)
    (sensor_var,) = [v for v in dash["templating"]["list"] if v["name"] == "sensor"]
    found = {r[1] for s in data.query(expand(sensor_var["query"], values, "")) for r in s["values"]}
    assert found == AC_SENSORS


# ------------------------------------------------------------------------------- structural tests

def test_committed_json_is_what_the_generator_builds():
    spec = importlib.util.spec_from_file_location("build_dashboards", GRAFANA / "build_dashboards.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--check"]) == 0, "run: python3 grafana/build_dashboards.py"
    for path, dash in mod.build().items():
        assert (load_yaml(path) if path.suffix == ".yaml" else json.loads(path.read_text(encoding="utf-8"))) == dash


def test_dashboards_have_stable_uids_units_and_the_provisioned_datasource():
    ds_uids = {d["uid"] for d in load_yaml(GRAFANA / "provisioning/datasources/dcmon.yaml")["datasources"]}
    dashes = load_dashboards()
    assert {n: d["uid"] for n, d in dashes.items()} == UIDS
    for name, dash in dashes.items():
        text = json.dumps(dash)
        assert "${DS_" not in text and "__inputs" not in dash, name
        assert dash["id"] is None and dash["schemaVersion"] >= 36
        ids = [p["id"] for p in all_panels(dash)]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        for p in data_panels(dash):
            where = f"{name}/{p['title']}"
            assert p["datasource"]["type"] == "influxdb" and p["datasource"]["uid"] in ds_uids, where
            assert p["fieldConfig"]["defaults"].get("unit") in UNITS, where
            assert p["targets"], where
            for t in p["targets"]:
                assert t["datasource"] == p["datasource"] and t["rawQuery"] is True and t["query"].strip(), where
                for tag in re.findall(r"\$tag_(\w+)", t.get("alias", "")):
                    assert groups_by(t["query"], tag), f"{where}: alias uses $tag_{tag} but the query does not group by it"
            refs = [t["refId"] for t in p["targets"]]
            assert len(refs) == len(set(refs)), where
        for var in dash["templating"]["list"]:
            if var["type"] == "query":
                assert var["datasource"]["uid"] in ds_uids
                assert var["query"].startswith("SHOW TAG VALUES") or var["name"] == "rp", var["name"]
        for a in dash["annotations"]["list"]:
            if a["datasource"]["type"] == "influxdb":
                assert a["datasource"]["uid"] in ds_uids and a["target"]["datasource"] == a["datasource"]


def test_panels_fit_the_grid_without_overlap():
    for name, dash in load_dashboards().items():
        cells: dict[tuple[int, int], str] = {}
        for p in all_panels(dash):
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, f"{name}/{p['title']}"
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    assert (x, y) not in cells, f"{name}: {p['title']} overlaps {cells[(x, y)]}"
                    cells[(x, y)] = p["title"]


def test_ui_import_flavour_asks_for_the_datasource():
    for name, dash in load_dashboards().items():
        imp = json.loads((GRAFANA / "import" / name).read_text(encoding="utf-8"))
        assert [i["name"] for i in imp["__inputs"]] == ["DS_DCMON"]
        text = json.dumps(imp)
        assert "dcmon-influxdb" not in text and "${DS_DCMON}" in text
        assert json.loads(text.replace("${DS_DCMON}", "dcmon-influxdb")) == {**copy.deepcopy(dash), **{
            k: imp[k] for k in ("__inputs", "__requires")}}


def test_dashboard_provider_points_at_the_folder_compose_mounts(compose):
    prov = load_yaml(GRAFANA / "provisioning/dashboards/dcmon.yaml")
    (provider,) = prov["providers"]
    assert provider["type"] == "file"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["grafana"]["volumes"]}
    assert Path(mounts[provider["options"]["path"]]) == DASHBOARDS
    assert Path(mounts["/etc/grafana/provisioning/datasources"]) == GRAFANA / "provisioning/datasources"
    assert Path(mounts["/etc/grafana/provisioning/dashboards"]) == GRAFANA / "provisioning/dashboards"
    # the alert rules' folder too (a Grafana in the stack alerts from its first start)
    assert Path(mounts["/etc/grafana/provisioning/alerting"]) == GRAFANA / "provisioning/alerting"
    assert (GRAFANA / "provisioning/alerting/dcmon.yaml").is_file()


def test_datasource_takes_url_and_credentials_from_the_environment_compose_sets(compose):
    text = (GRAFANA / "provisioning/datasources/dcmon.yaml").read_text()
    (ds,) = load_yaml(GRAFANA / "provisioning/datasources/dcmon.yaml")["datasources"]
    assert ds["type"] == "influxdb" and ds["uid"] == "dcmon-influxdb"
    for value in (ds["url"], ds["user"], ds["jsonData"]["dbName"], ds["secureJsonData"]["password"]):
        assert re.fullmatch(r"\$\{\w+\}", value), f"{value!r} should come from an environment variable"
    used = set(re.findall(r"\$\{(\w+)\}", text))
    env = compose["services"]["grafana"]["environment"]
    assert used <= set(env), f"compose does not set {used - set(env)}"
    assert env["DCMON_INFLUX_URL"] == "http://influxdb:8086" and env["DCMON_INFLUX_DB"] == "dcmon"
    assert compose["services"]["influxdb"]["image"].startswith("influxdb:1.8")


def test_compose_file_validates():
    r = subprocess.run(["docker-compose", "-f", str(ROOT / "deploy/docker-compose.yml"), "config", "-q"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------------------- YAML

def load_yaml(path: Path) -> dict:
    return yaml_text(path.read_text())


def yaml_text(text: str) -> dict:
    """PyYAML when the venv has it; else Debian's python3-yaml (docker-compose depends on it)."""
    try:
        import yaml
    except ImportError:
        py = shutil.which("python3", path="/usr/bin")
        assert py, "PyYAML is needed: pip install pyyaml"
        r = subprocess.run([py, "-c", "import json,sys,yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"],
                           input=text, capture_output=True, text=True, timeout=30, check=True)
        return json.loads(r.stdout)
    return yaml.safe_load(text)


@pytest.fixture(scope="module")
def compose() -> dict:
    """deploy/docker-compose.yml as docker-compose resolves it (paths absolute, defaults applied)."""
    r = subprocess.run(["docker-compose", "-f", str(ROOT / "deploy/docker-compose.yml"), "config"],
                       capture_output=True, text=True, timeout=60, check=True)
    return yaml_text(r.stdout)

