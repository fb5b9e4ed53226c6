"""The overview's battery row against a real influxd holding ``battery`` points made by BatteryService from
the real Poller's readings of two simulated meters on a pty (tests/test_battery_service.py's rig): every
panel's query, expanded as Grafana expands it (tests/test_grafana.py), returns the battery's series, and
the values are the ones the service computed; unknown state of charge shows as no data."""

from __future__ import annotations

import time

import httpx
import pytest

from dcmon.battery_sim import BatteryModel
from dcmon.outputs.influx import InfluxSink
from dcmon.simulator import Simulator
from test_battery_service import Rig, meters, run_until_synced_then_discharge
from test_grafana import data_panels, expand, expected_columns, groups_by, is_battery, load_dashboards, time_filters


@pytest.fixture(scope="module")
def bat(influxd, tmp_path_factory):
    db = "t_grafana_battery"
    influxd.drop_db(db)
    influxd.create_db(db)
    tmp = tmp_path_factory.mktemp("grafana_battery")
    mp = pytest.MonkeyPatch()
    from dcmon import poller as poller_mod
    mp.setattr(poller_mod, "max_counter_rise", lambda model, seconds: float("inf"))   # a 300× clock
    model = BatteryModel(capacity_ah=5, soc=0.97, charger_max_a=1.5, load_a=0.3)
    try:
        with Simulator(meters(model)) as sim:
            rig = Rig(tmp, sim.path, model, influxd.url, db)
            sink = InfluxSink(rig.cfg.influxdb)
            try:
                run_until_synced_then_discharge(rig, discharge_s=900)
                sink.write(rig.reading_lines + rig.points)
                status = rig.svc.status()["house"]
            finally:
                sink.close()
                rig.close()
    finally:
        mp.undo()
    dash = load_dashboards()["dcmon-overview.json"]
    (host_var,) = [v for v in dash["templating"]["list"] if v["name"] == "host"]
    hosts = sorted({r[1] for s in influxd.query(expand(host_var["query"], {}, ""), db) for r in s["values"]})
    assert hosts == ["testpi"]
    values = {"host": (hosts, True), "tz": (["UTC"], False), "rp": (["autogen"], False)}  # raw (other rps: test_influx_setup_battery)
    yield dash, values, status, lambda q: influxd.query(q, db), rig.points
    influxd.drop_db(db)


def run(bat, title: str) -> list[dict]:
    dash, values, _status, query, _points = bat
    (p,) = [p for p in data_panels(dash) if p["title"] == title]
    rng = p.get("timeFrom") or dash["time"]["from"]
    return query(expand(p["targets"][0]["query"], values, time_filters(rng, time.time())[0]))


def by_time(series: dict) -> dict[int, float]:
    return {r[0]: r[1] for r in series["values"]}


def minute_means(query, field: str) -> dict[int, float]:
    """The per-minute means of a field, from the raw points (what a panel grouped by time(1m) must show)."""
    buckets: dict[int, list[float]] = {}
    for t, v in query(f'SELECT "{field}" FROM "battery"')[0]["values"]:
        buckets.setdefault(t // 60_000_000_000 * 60_000_000_000, []).append(v)
    return {t: sum(v) / len(v) for t, v in buckets.items()}


def test_every_battery_panel_returns_the_batterys_series(bat):
    dash, values, _status, query, _points = bat
    panels = [p for p in data_panels(dash) if is_battery(p)]
    assert {p["title"] for p in panels} == {"State of charge", "Time to go", "Synchronisations", "Net current",
                                            "Battery state of charge", "Ah charged and discharged per day"}
    for p in panels:
        rng = p.get("timeFrom") or dash["time"]["from"]
        for t in p["targets"]:
            for tf in time_filters(rng, time.time()):
                q = expand(t["query"], values, tf)
                series = query(q)
                assert series, f"{p['title']}: no data for {q}"
                assert groups_by(q, "battery") and groups_by(q, "host"), p["title"]
                assert [(s["tags"]["host"], s["tags"]["battery"]) for s in series] == [("testpi", "house")]
                assert series[0]["columns"] == expected_columns(q), p["title"]


def test_values_are_the_services(bat):
    _dash, _values, status, query, points = bat
    (soc,) = run(bat, "State of charge")
    assert soc["values"][0][1] == pytest.approx(status["soc_pct"], abs=0.5)
    (ttg,) = run(bat, "Time to go")
    assert ttg["values"][0][1] == pytest.approx(status["time_to_go_s"], rel=0.05)
    (syncs,) = run(bat, "Synchronisations")
    assert syncs["values"][0][1] == 1 and syncs["values"][0][2] > 0
    (cur,) = run(bat, "Net current")
    # every point that has a net current (a point made while one meter's reading is stale has none: unknown)
    with_current = [p for p in points if ",net_current_a=" in p or " net_current_a=" in p]
    assert len(with_current) >= len(points) - 3
    assert len(query('SELECT "net_current_a" FROM "battery"')[0]["values"]) == len(with_current)
    assert by_time(cur) == pytest.approx(minute_means(query, "net_current_a"))
    (trend,) = run(bat, "Battery state of charge")
    assert by_time(trend) == pytest.approx(minute_means(query, "soc_pct"))
    (days,) = run(bat, "Ah charged and discharged per day")
    charged = sum(r[1] for r in days["values"])
    discharged = sum(r[2] for r in days["values"])
    (_t, first_charged, first_discharged), = query(
        'SELECT first("charged_ah"), first("discharged_ah") FROM "battery"')[0]["values"]
    # The points carry charged_ah/discharged_ah at 10 µAh (5 decimals), the status the unrounded value. The panel
    # sums the increases (non_negative_difference); the totals only grow (dcmon.battery: a flow against the
    # direction waits in a carry), so the sum of increases is the net change, to the rounding of each point.
    tol = 2e-5
    assert charged == pytest.approx(status["charged_ah"] - first_charged, abs=tol) and charged > 0
    assert discharged == pytest.approx(status["discharged_ah"] - first_discharged, abs=tol)
    assert discharged > 0.2


def test_unknown_soc_is_no_data_not_an_old_value(bat, influxd):
    """A newer point without soc_pct (state lost) makes the gauge empty, though older points had a value."""
    dash, values, status, query, points = bat
    last = points[-1]
    head, fields, ts = last.split(" ")
    kept = ",".join(kv for kv in fields.split(",") if not kv.startswith(("soc_pct=", "soc_known=", "time_to_go_s=")))
    line = f"{head} {kept},soc_known=false,unknown_reason=\"state lost: test\" {int(ts) + 1000}"
    httpx.post(f"{influxd.url}/write", params={"db": "t_grafana_battery", "precision": "ns"},
               content=line, timeout=30).raise_for_status()
    (soc,) = run(bat, "State of charge")
    assert soc["values"][0][1] is None                 # the gauge's field: no data
    (ttg,) = run(bat, "Time to go")
    assert ttg["values"][0][1] is None
