#!/usr/bin/env python3
"""Builds dcmon's Grafana dashboards (the JSON files next to this script) from one description.

Why a generator: two dashboards × two flavours share ~40 panels, and every one must carry the same data
source reference, a unit and a tested query. Writing them here keeps those rules in one place; the JSON is
committed so that Grafana (and people without Python) use it as it is. After editing, run

    python3 grafana/build_dashboards.py          # rewrite the JSON files
    python3 grafana/build_dashboards.py --check  # exit 1 if a committed file is out of date (the tests do this)

Flavours:
- ``dashboards/``: for file provisioning and ``dcmon grafana-import``. Panels name the data source by the
  uid pinned in provisioning/datasources/dcmon.yaml (file provisioning does not resolve ``${DS_...}``).
- ``import/``: for Grafana's "Dashboards → New → Import" page. Same dashboards with an ``__inputs`` entry,
  so Grafana asks which InfluxDB data source to use.

Queries are InfluxQL only (InfluxDB 1.x; 2.x through a DBRP mapping; 3.x), against the schema in
docs/architecture.md with the default measurement names. Energy comes from the meters' own counters
(``energy_wh``) as the sum of non-negative differences, so a counter reset loses one interval at most
instead of showing a huge negative day; the poller marks resets with ``energy_reset`` (annotation).
Day and week totals are cut at midnight / Monday in the dashboard's ``tz`` variable (default UTC).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DS_UID = "dcmon-influxdb"          # also in provisioning/datasources/dcmon.yaml: keep them equal
DS = {"type": "influxdb", "uid": DS_UID}
DC, AC, HEALTH = '"dc_power"', '"ac_power"', '"dcmon_health"'
BOTH = f"{DC}, {AC}"
SCHEMA_VERSION = 39                # Grafana 10.4 / 11.x
OVERVIEW_UID, SENSOR_UID = "dcmon-overview", "dcmon-sensor"
SENSOR_LINK = f"/d/{SENSOR_UID}/dcmon-sensor?var-sensor=${{__field.labels.sensor}}&${{__url_time_range}}"

ALARM_MAPPINGS = [{"type": "value", "options": {
    "true": {"text": "ALARM", "color": "red", "index": 0},
    "false": {"text": "ok", "color": "green", "index": 1}}}]
UP_MAPPINGS = [{"type": "value", "options": {
    "true": {"text": "up", "color": "green", "index": 0},
    "false": {"text": "DOWN", "color": "red", "index": 1}}}]


# ------------------------------------------------------------------------------------------- queries

def sel(where: str) -> str:
    """The common WHERE: the dashboard's time range and the bus / sensor variables (regex form, as
    Grafana interpolates a multi-value variable: ``(a|b)``; a single value is regex-escaped)."""
    return f'WHERE $timeFilter AND "bus" =~ /^$bus$/ AND "sensor" =~ /^$sensor$/{where}'


def over_time(func: str, field: str, frm: str, extra: str = "") -> str:
    return (f'SELECT {func}("{field}") FROM {frm} {sel(extra)} '
            f'GROUP BY time($__interval), "sensor" fill(none)')


def now_value(field: str, frm: str = BOTH) -> str:
    return f'SELECT last("{field}") AS "{field}" FROM {frm} {sel("")} GROUP BY "sensor"'


def energy(bucket: str, frm: str = BOTH) -> str:
    """Wh used per bucket: the sum of the counter's non-negative steps. ``bucket`` '' = the whole range."""
    inner = f'SELECT non_negative_difference("energy_wh") AS "wh" FROM {frm} {sel("")} GROUP BY "sensor"'
    group = f'GROUP BY time({bucket}), "sensor" fill(none) tz(\'$tz\')' if bucket else 'GROUP BY "sensor"'
    return f'SELECT sum("wh") AS "energy_wh" FROM ({inner}) WHERE $timeFilter {group}'


def health(func: str, field: str) -> str:
    return (f'SELECT {func}("{field}") AS "{field}" FROM {HEALTH} {sel("")} '
            f'GROUP BY time($__interval), "sensor" fill(none)')


def poller(func: str, field: str) -> str:
    return (f'SELECT {func}("{field}") AS "{field}" FROM {HEALTH} WHERE $timeFilter AND "sensor" = \'_poller\' '
            f'GROUP BY time($__interval), "host" fill(none)')


FAILED_POLLS = (f'SELECT non_negative_difference(max("polls_failed")) AS "failed" FROM {HEALTH} {sel("")} '
                f'GROUP BY time($__interval), "sensor" fill(none)')
SPOOL_LOSSES = (f'SELECT last("spool_dropped") AS "dropped", last("quarantined") AS "quarantined" FROM {HEALTH} '
                f'WHERE $timeFilter AND "sensor" = \'_poller\' GROUP BY "host"')
RESETS = (f'SELECT "energy_wh", "sensor" FROM {BOTH} WHERE $timeFilter AND "energy_reset" = true '
          f'AND "sensor" =~ /^$sensor$/')


def tag_values(key: str, where: str = "") -> str:
    return f'SHOW TAG VALUES FROM {BOTH} WITH KEY = "{key}"{where}'


# -------------------------------------------------------------------------------------------- panels

def target(query: str, alias: str = "$tag_sensor", ref: str = "A", fmt: str = "time_series") -> dict:
    return {"refId": ref, "datasource": DS, "rawQuery": True, "query": query, "resultFormat": fmt, "alias": alias}


def panel(kind: str, title: str, unit: str, targets: list[dict], *, description: str = "", w: int = 12,
          h: int = 8, decimals: int | None = None, defaults: dict | None = None, options: dict | None = None,
          time_from: str | None = None, link: bool = False) -> dict:
    d: dict = {"unit": unit, "color": {"mode": "palette-classic" if kind == "timeseries" else "thresholds"},
               "thresholds": {"mode": "absolute", "steps": [{"color": "green", "value": None}]}, "mappings": []}
    if decimals is not None:
        d["decimals"] = decimals
    if link:
        d["links"] = [{"title": "Open this sensor", "url": SENSOR_LINK}]
    d.update(defaults or {})
    p = {"type": kind, "title": title, "description": description, "datasource": DS,
         "gridPos": {"w": w, "h": h}, "fieldConfig": {"defaults": d, "overrides": []},
         "options": options or {}, "targets": targets}
    if time_from:
        p["timeFrom"] = time_from
    return p


def graph(title: str, unit: str, targets: list[dict], *, bars: bool = False, **kw) -> dict:
    custom = {"drawStyle": "bars" if bars else "line", "lineWidth": 1, "fillOpacity": 70 if bars else 8,
              "showPoints": "never", "spanNulls": False, "barAlignment": 1 if bars else 0,
              "axisSoftMin": 0 if bars else None}
    custom = {k: v for k, v in custom.items() if v is not None}
    opts = {"legend": {"showLegend": True, "displayMode": "table", "placement": "bottom",
                       "calcs": ["sum"] if bars else ["lastNotNull", "min", "max", "mean"]},
            "tooltip": {"mode": "multi", "sort": "desc"}}
    defaults = {"custom": custom, **kw.pop("defaults", {})}
    return panel("timeseries", title, unit, targets, defaults=defaults, options=opts, **kw)


def stat(title: str, unit: str, targets: list[dict], *, fields: str = "", graph_mode: str = "area", **kw) -> dict:
    opts = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": fields, "values": False},
            "colorMode": "value", "graphMode": graph_mode, "textMode": "auto", "justifyMode": "auto",
            "orientation": "auto", "wideLayout": True, "showPercentChange": False,
            "percentChangeColorMode": "standard"}
    return panel("stat", title, unit, targets, options=opts, w=kw.pop("w", 4), h=kw.pop("h", 5), **kw)


def states(title: str, unit: str, targets: list[dict], mappings: list[dict], **kw) -> dict:
    opts = {"mergeValues": True, "showValue": "never", "alignValue": "left", "rowHeight": 0.85,
            "legend": {"showLegend": False, "displayMode": "list", "placement": "bottom", "calcs": []},
            "tooltip": {"mode": "single", "sort": "none"}}
    defaults = {"mappings": mappings, "custom": {"fillOpacity": 75, "lineWidth": 0}}
    return panel("state-timeline", title, unit, targets, defaults=defaults, options=opts, **kw)


def row(title: str) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "gridPos": {"w": 24, "h": 1}}


def freshness(**kw) -> dict:
    return stat("Last reading", "dateTimeFromNow",
                [target(f'SELECT last("voltage_v") AS "voltage_v" FROM {BOTH} {sel("")} GROUP BY "sensor"')],
                fields="/^Time$/", graph_mode="none", time_from="7d", defaults={"displayName": "${__series.name}"},
                description="When each sensor's latest reading was taken (data freshness). A sensor missing "
                            "here has sent nothing for 7 days.", **kw)


# ----------------------------------------------------------------------------------------- dashboards

def query_var(name: str, label: str, query: str, *, multi: bool) -> dict:
    var = {"type": "query", "name": name, "label": label, "datasource": DS, "query": query, "refresh": 2,
           "sort": 1, "regex": "", "multi": multi, "includeAll": multi, "options": [], "hide": 0, "skipUrlSync": False}
    if multi:
        var["current"] = {"selected": True, "text": ["All"], "value": ["$__all"]}
    return var


TZ_VAR = {"type": "textbox", "name": "tz", "label": "Day/week time zone", "query": "UTC", "hide": 0,
          "current": {"text": "UTC", "value": "UTC"}, "options": [{"selected": True, "text": "UTC", "value": "UTC"}],
          "description": "IANA zone (e.g. Europe/Berlin) where daily and weekly energy totals start at midnight"}


def dashboard(uid: str, title: str, description: str, variables: list[dict], panels: list[dict]) -> dict:
    return {
        "uid": uid, "title": title, "description": description, "id": None, "version": 1,
        "schemaVersion": SCHEMA_VERSION, "tags": ["dcmon", "power"], "editable": True, "graphTooltip": 1,
        "timezone": "browser", "refresh": "30s", "time": {"from": "now-6h", "to": "now"},
        "timepicker": {}, "fiscalYearStartMonth": 0, "liveNow": False, "weekStart": "",
        "links": [{"type": "dashboards", "tags": ["dcmon"], "asDropdown": False, "includeVars": False,
                   "keepTime": True, "title": "dcmon", "icon": "external link", "targetBlank": False,
                   "tooltip": "", "url": ""}],
        "annotations": {"list": [
            {"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True, "hide": True,
             "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard"},
            {"datasource": DS, "enable": True, "hide": False, "iconColor": "orange", "name": "Energy counter resets",
             "target": {"refId": "Anno", "datasource": DS, "query": RESETS, "rawQuery": True, "queryType": "tags",
                        "fromAnnotations": True, "tagsColumn": "sensor", "textColumn": "energy_wh", "titleColumn": "",
                        "timeEndColumn": "", "limit": 100, "matchAny": False, "tags": [], "type": ""}}]},
        "templating": {"list": variables},
        "panels": layout(panels),
    }


def layout(panels: list[dict]) -> list[dict]:
    """Give each panel an id and a place: left to right, wrapping at Grafana's 24 columns."""
    x = y = line_h = 0
    for i, p in enumerate(panels, start=1):
        w, h = p["gridPos"]["w"], p["gridPos"]["h"]
        if p["type"] == "row" or x + w > 24:
            x, y, line_h = 0, y + line_h, 0
        p["id"] = i
        p["gridPos"] = {"h": h, "w": w, "x": x, "y": y}
        x, line_h = x + w, max(line_h, h)
        if p["type"] == "row":
            x, y, line_h = 0, y + h, 0
    return panels


def overview() -> dict:
    v, a, w = "voltage_v", "current_a", "power_w"
    panels = [
        row("Now"),
        stat("Voltage", "volt", [target(now_value(v))], decimals=2, link=True),
        stat("Current", "amp", [target(now_value(a))], decimals=2, link=True),
        stat("Power", "watt", [target(now_value(w))], decimals=1, link=True),
        stat("Energy today", "watth", [target(energy(""))], time_from="now/d", graph_mode="none", link=True,
             description="Energy used since midnight (browser time), from each meter's counter."),
        freshness(w=8),
        row("DC"),
        graph("Voltage", "volt", [target(over_time("mean", v, DC))], decimals=2, link=True),
        graph("Current", "amp", [target(over_time("mean", a, DC))], decimals=2, link=True),
        graph("Power", "watt", [target(over_time("mean", w, DC))], decimals=1, link=True),
        states("Alarms", "bool_on_off", [target(
            f'SELECT last("high_voltage_alarm") AS "high voltage", last("low_voltage_alarm") AS "low voltage" '
            f'FROM {DC} {sel("")} GROUP BY time($__interval), "sensor" fill(none)', alias="$tag_sensor $col")],
            ALARM_MAPPINGS, description="The meters' own high/low voltage alarms (thresholds set on the meter)."),
        row("Energy"),
        graph("Energy per day", "watth", [target(energy("1d"))], bars=True, time_from="7d", link=True,
              description="Energy per day from each meter's counter; days start at midnight in $tz."),
        graph("Energy per week", "watth", [target(energy("7d, 4d"))], bars=True, time_from="8w", link=True,
              description="Energy per week (Monday to Sunday in $tz) from each meter's counter."),
        row("AC"),
        graph("AC voltage", "volt", [target(over_time("mean", v, AC))], w=8, decimals=1, link=True),
        graph("AC current", "amp", [target(over_time("mean", a, AC))], w=8, decimals=2, link=True),
        graph("AC power", "watt", [target(over_time("mean", w, AC))], w=8, decimals=1, link=True),
        graph("Frequency", "hertz", [target(over_time("mean", "frequency_hz", AC))], w=8, decimals=1),
        graph("Power factor", "none", [target(over_time("mean", "power_factor", AC))], w=8, decimals=2,
              defaults={"min": 0, "max": 1}),
        states("AC power alarm", "bool_on_off", [target(
            f'SELECT last("power_alarm") AS "power alarm" FROM {AC} {sel("")} '
            f'GROUP BY time($__interval), "sensor" fill(none)')], ALARM_MAPPINGS, w=8),
        row("Poller health"),
        states("Sensor answering", "bool_on_off", [target(health("last", "up"))], UP_MAPPINGS, w=8,
               description="From dcmon_health: did the meter answer its last poll (written every "
                           "poller.health_interval_s)."),
        graph("Failed polls", "short", [target(FAILED_POLLS)], bars=True, w=8, decimals=0,
              description="Polls per interval that got no valid answer (timeouts, CRC errors, exceptions)."),
        graph("Poll latency", "ms", [target(health("mean", "latency_ms"))], w=8, decimals=0),
        graph("Spool depth", "short", [target(poller("max", "spool_depth"), alias="$tag_host")], w=8, decimals=0,
              description="Readings waiting in the poller's spool for InfluxDB. Grows while InfluxDB is away."),
        graph("Oldest unsent reading", "s", [target(poller("max", "spool_oldest_age_s"), alias="$tag_host")],
              w=8, decimals=0),
        stat("Readings lost", "short", [target(SPOOL_LOSSES, alias="$tag_host $col")], w=8, h=8,
             graph_mode="none", decimals=0,
             description="Counters since the poller started: readings dropped because the spool was full "
                         "or too old, and batches InfluxDB refused (kept in quarantine: dcmon spool)."),
    ]
    return dashboard(OVERVIEW_UID, "dcmon: overview",
                     "Every PZEM meter at a glance: values now, trends, energy per day and week, alarms, "
                     "data freshness and the poller's health.",
                     [query_var("bus", "Bus", tag_values("bus"), multi=True),
                      query_var("sensor", "Sensor", tag_values("sensor", ' WHERE "bus" =~ /^$bus$/'), multi=True),
                      TZ_VAR], panels)


def sensor() -> dict:
    def band(field: str) -> str:
        return (f'SELECT min("{field}") AS "min", mean("{field}") AS "mean", max("{field}") AS "max" '
                f'FROM {BOTH} {sel("")} GROUP BY time($__interval) fill(none)')

    panels = [
        row("Now"),
        stat("Voltage", "volt", [target(now_value("voltage_v"))], decimals=2),
        stat("Current", "amp", [target(now_value("current_a"))], decimals=2),
        stat("Power", "watt", [target(now_value("power_w"))], decimals=1),
        stat("Energy today", "watth", [target(energy(""))], time_from="now/d", graph_mode="none"),
        stat("Energy counter", "kwatth", [target(
            f'SELECT last("energy_wh") / 1000 AS "energy_kwh" FROM {BOTH} {sel("")} GROUP BY "sensor"')],
            decimals=2, graph_mode="none", description="The meter's own total (reset with dcmon reset-energy)."),
        freshness(w=4),
        row("Trends"),
        graph("Voltage", "volt", [target(band("voltage_v"), alias="$col")], decimals=2),
        graph("Current", "amp", [target(band("current_a"), alias="$col")], decimals=2),
        graph("Power", "watt", [target(band("power_w"), alias="$col")], decimals=1),
        states("Alarms", "bool_on_off", [
            target(f'SELECT last("high_voltage_alarm") AS "high voltage", last("low_voltage_alarm") AS "low voltage" '
                   f'FROM {DC} {sel("")} GROUP BY time($__interval) fill(none)', alias="$col"),
            target(f'SELECT last("power_alarm") AS "power" FROM {AC} {sel("")} GROUP BY time($__interval) fill(none)',
                   alias="$col", ref="B")], ALARM_MAPPINGS,
            description="DC meters: high/low voltage alarms; AC meters: the power alarm."),
        row("Energy"),
        graph("Energy per hour", "watth", [target(energy("1h"))], bars=True, decimals=0),
        graph("Energy per day", "watth", [target(energy("1d"))], bars=True, time_from="30d", decimals=0,
              description="Days start at midnight in $tz."),
        row("AC meters only"),
        graph("Frequency", "hertz", [target(over_time("mean", "frequency_hz", AC))], decimals=1),
        graph("Power factor", "none", [target(over_time("mean", "power_factor", AC))], decimals=2,
              defaults={"min": 0, "max": 1}),
        row("Polling"),
        states("Answering", "bool_on_off", [target(health("last", "up"))], UP_MAPPINGS, w=8),
        graph("Failed polls", "short", [target(FAILED_POLLS)], bars=True, w=8, decimals=0),
        graph("Poll latency", "ms", [target(health("mean", "latency_ms"))], w=8, decimals=0),
    ]
    return dashboard(SENSOR_UID, "dcmon: sensor", "One meter in detail: choose the bus and the sensor above.",
                     [query_var("bus", "Bus", tag_values("bus"), multi=True),
                      query_var("sensor", "Sensor", tag_values("sensor", ' WHERE "bus" =~ /^$bus$/'), multi=False),
                      TZ_VAR], panels)


def for_ui_import(dash: dict) -> dict:
    """The same dashboard with ``__inputs``, for Grafana's Import page (which asks for the data source)."""
    text = json.dumps(dash).replace(json.dumps(DS), json.dumps({"type": "influxdb", "uid": "${DS_DCMON}"}))
    out = {"__inputs": [{"name": "DS_DCMON", "label": "InfluxDB (dcmon)", "type": "datasource",
                         "pluginId": "influxdb", "pluginName": "InfluxDB",
                         "description": "The InfluxQL data source that holds dcmon's measurements"}],
           "__requires": [{"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.4.0"},
                          {"type": "datasource", "id": "influxdb", "name": "InfluxDB", "version": "1.0.0"}],
           **json.loads(text)}
    return out


def build() -> dict[Path, dict]:
    files: dict[Path, dict] = {}
    for name, dash in (("overview", overview()), ("sensor", sensor())):
        files[HERE / "dashboards" / f"dcmon-{name}.json"] = dash
        files[HERE / "import" / f"dcmon-{name}.json"] = for_ui_import(copy.deepcopy(dash))
    return files


def render(d: dict) -> str:
    return json.dumps(d, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="only check that the committed files are up to date")
    args = ap.parse_args(argv)
    stale = []
    for path, dash in build().items():
        text = render(dash)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(path.relative_to(HERE.parent))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    if stale:
        print(f"out of date: {', '.join(map(str, stale))}; run python3 grafana/build_dashboards.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
