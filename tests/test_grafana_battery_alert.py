"""The alert rule "Battery state of charge low" against a real influxd: ``battery`` points as the service writes
them (influx_fields of real BatteryStates) from two hosts with the same battery name, and the floors that
`dcmon influx-setup` (influx_setup.setup, real) writes from each host's [[batteries]] into dcmon_thresholds.
The rule's queries are run and its expressions evaluated as Grafana does (tests/test_grafana_hosts.evaluate).

north: "house" lead-acid (floor 50 %) at 45 %            → fires
       "van"   LiFePO4  (floor 10 %) at 12 %             → not (below a lead-acid floor: the per-battery floor counts)
       "dock"  LiFePO4  (floor 10 %) at exactly 10 %     → fires (at the floor)
south: "house" lead-acid, discharge_floor_pct = 30, at 40 % → not (north's "house" at 45 fires: hosts kept apart)
       "shed"  lead-acid, 20 % known, then unknown (newest) → not (no data is not low)
"""

from __future__ import annotations

import dataclasses
import time

import pytest

from dcmon import config
from dcmon.battery import BatteryMonitor
from dcmon.battery_service import MEASUREMENT, influx_fields
from dcmon.influx_setup import Influx, setup
from dcmon.outputs.influx import InfluxSink
from dcmon.reading import encode_line
from test_grafana_hosts import alert_rules, evaluate

UID = "dcmon-battery-soc-low"

BATTERY = """
[[batteries]]
name = "{name}"
capacity_ah = 100
chemistry = "{chem}"
charge = ["charger"]
discharge = ["loads"]
{extra}
"""
CFG = """
[poller]
host = "{host}"

[influxdb]
url = "{url}"
database = "{db}"
{ix}

[spool]
path = "{tmp}/{host}.sqlite"

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
"""
# host → battery → (chemistry, extra config lines, the states of charge written, oldest first; None = unknown)
SITES = {
    "north": {"house": ("lead-acid", "", [60.0, 52.0, 45.0]),
              "van": ("lifepo4", "", [15.0, 12.0]),
              "dock": ("lifepo4", "", [11.0, 10.0])},
    "south": {"house": ("lead-acid", "discharge_floor_pct = 30", [50.0, 40.0]),
              "shed": ("lead-acid", "", [25.0, 20.0, None])},
}


def load(tmp, host: str, url: str, db: str, batteries: dict, ix: str = "") -> config.Config:
    text = CFG.format(host=host, url=url, db=db, tmp=tmp, ix=ix) + "".join(
        BATTERY.format(name=n, chem=chem, extra=extra) for n, (chem, extra, _) in batteries.items())
    path = tmp / f"{host}.toml"
    path.write_text(text)
    return config.load(path, env={})


def points(cfg: config.Config, name: str, socs: list[float | None], now_ns: int) -> list[str]:
    """One point a minute up to a minute ago, each as the service writes it: influx_fields of a real state."""
    (settings,) = [b for b in cfg.batteries if b.name == name]
    unknown = BatteryMonitor(settings).snapshot()
    assert unknown.soc_pct is None
    out = []
    for i, soc in enumerate(socs):
        st = unknown if soc is None else dataclasses.replace(unknown, soc_pct=soc, unknown_reason="")
        t = now_ns - (len(socs) - i) * 60 * 10**9
        out.append(encode_line(MEASUREMENT, {"host": cfg.host, "battery": name}, influx_fields(st), t))
    return out


class Data:
    def __init__(self, influxd, db: str) -> None:
        self.influxd, self.db = influxd, db

    def query(self, q: str) -> list[dict]:
        return self.influxd.query(q, self.db)


def write(cfgs: dict[str, config.Config], sites: dict) -> None:
    now = time.time_ns()
    for host, cfg in cfgs.items():
        sink = InfluxSink(cfg.influxdb)
        try:
            sink.write([line for name, (_, _, socs) in sites[host].items() for line in points(cfg, name, socs, now)])
        finally:
            sink.close()


@pytest.fixture(scope="module")
def data(influxd, tmp_path_factory):
    db = "t_battery_alert"
    influxd.drop_db(db)
    tmp = tmp_path_factory.mktemp("battery_alert")
    cfgs = {host: load(tmp, host, influxd.url, db, bats) for host, bats in SITES.items()}
    for cfg in cfgs.values():
        with Influx(cfg.influxdb) as api:
            setup(cfg, api, say=lambda _line: None)
    write(cfgs, SITES)
    yield Data(influxd, db)
    influxd.drop_db(db)


def test_the_floors_are_in_dcmon_thresholds(data):
    rows = {(s["tags"]["host"], s["tags"]["battery"]): s["values"][0][1] for s in data.query(
        'SELECT last("discharge_floor_pct") FROM "dcmon_meta"."dcmon_thresholds" GROUP BY "host", "battery"')}
    assert rows == {("north", "house"): 50.0, ("north", "van"): 10.0, ("north", "dock"): 10.0,
                    ("south", "house"): 30.0, ("south", "shed"): 50.0}


def test_fires_at_or_below_the_floor_per_host_and_battery_and_never_on_unknown(data):
    rule = alert_rules()[UID]
    assert evaluate(data, rule) == {("house", "north"), ("dock", "north")}


def test_an_unknown_newest_point_gives_no_row_not_the_last_known_value(data):
    (soc_query,) = [d for d in alert_rules()[UID]["data"] if d["refId"] == "A"]
    now_ms = int(time.time() * 1000)
    q = soc_query["model"]["query"].replace("$timeFilter", f"time >= {now_ms - 600_000}ms and time <= {now_ms}ms")
    got = {(s["tags"]["host"], s["tags"]["battery"]): [v for _t, v in s["values"]] for s in data.query(q)}
    assert got == {("north", "house"): [45.0], ("north", "van"): [12.0], ("north", "dock"): [10.0],
                   ("south", "house"): [40.0]}          # south/shed (20 % known, then unknown) absent


def test_the_rule_is_a_five_minute_warning_and_no_data_is_ok():
    rule = alert_rules()[UID]
    assert rule["title"] == "Battery state of charge low" and rule["for"] == "5m"
    assert rule["labels"] == {"severity": "warning", "project": "dcmon"}
    # most installs have no battery, and an unknown state of charge gives no series: neither may alert
    assert rule["noDataState"] == "OK" and rule["execErrState"] == "Error"


def test_only_unknown_batteries_is_no_data(influxd, tmp_path):
    """A site whose every battery is unknown: the rule's query returns nothing (Grafana: no data → OK)."""
    db = "t_battery_alert_unknown"
    influxd.drop_db(db)
    sites = {"west": {"house": ("lead-acid", "", [5.0, None])}}
    cfg = load(tmp_path, "west", influxd.url, db, sites["west"])
    try:
        with Influx(cfg.influxdb) as api:
            setup(cfg, api, say=lambda _line: None)
        write({"west": cfg}, sites)
        d = Data(influxd, db)
        assert d.query('SELECT count("status") FROM "battery"')[0]["values"][0][1] == 2
        assert evaluate(d, alert_rules()[UID]) == set()
        (soc_query,) = [x for x in alert_rules()[UID]["data"] if x["refId"] == "A"]
        now_ms = int(time.time() * 1000)
        assert d.query(soc_query["model"]["query"].replace(
            "$timeFilter", f"time >= {now_ms - 600_000}ms and time <= {now_ms}ms")) == []
    finally:
        influxd.drop_db(db)


def test_influx_setup_rewrites_a_changed_floor_and_keeps_the_voltage_thresholds(influxd, tmp_path):
    db = "t_battery_alert_setup"
    influxd.drop_db(db)

    def thresholds() -> dict[str, float]:
        """battery or sensor name → its one threshold, for host east."""
        out = {}
        for s in influxd.query('SELECT last(*) FROM "dcmon_meta"."dcmon_thresholds" '
                               'GROUP BY "host", "battery", "sensor"', db):
            (v,) = [x for x in s["values"][0][1:] if x is not None]
            out[s["tags"]["battery"] or s["tags"]["sensor"]] = v
        return out

    runs = []
    try:
        for floor, want in (("", 50.0), ("", 50.0), ("discharge_floor_pct = 20", 20.0)):
            cfg = load(tmp_path, "east", influxd.url, db, {"house": ("lead-acid", floor, [])},
                       ix="low_voltage_v = { loads = 11.5 }")
            said: list[str] = []
            with Influx(cfg.influxdb) as api:
                setup(cfg, api, say=said.append)
            assert thresholds() == {"house": want, "loads": 11.5}
            runs.append(said)
        meta = "dcmon_meta: time-range map, time zone and thresholds for host 'east'"
        assert meta in runs[0]
        assert runs[1] == [f"{db!r} on {influxd.url}: already set up, nothing changed"]   # idempotent
        assert runs[2] == [meta]                                                            # the floor changed
    finally:
        influxd.drop_db(db)
