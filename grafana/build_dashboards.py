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
BAT = '"battery"'                  # dcmon.battery_service: one point per battery per cycle, tags host + battery
BOTH = f"{DC}, {AC}"
SCHEMA_VERSION = 39                # Grafana 10.4 / 11.x
OVERVIEW_UID, SENSOR_UID = "dcmon-overview", "dcmon-sensor"
SENSOR_LINK = (f"/d/{SENSOR_UID}/dcmon-sensor?var-host=${{__field.labels.host}}&var-sensor=${{__field.labels.sensor}}"
               f"&${{__url_time_range}}")
ALIAS = "$tag_sensor ($tag_host)"

ALARM_MAPPINGS = [{"type": "value", "options": {
    "true": {"text": "ALARM", "color": "red", "index": 0},
    "false": {"text": "ok", "color": "green", "index": 1}}}]
UP_MAPPINGS = [{"type": "value", "options": {
    "true": {"text": "up", "color": "green", "index": 0},
    "false": {"text": "DOWN", "color": "red", "index": 1}}}]


# ------------------------------------------------------------------------------------------- queries
# Every series is one meter on one host: queries group by "host" and "sensor" (a sensor name is unique per
# host, not across hosts), counters are differenced per stored series (GROUP BY *: every tag) and only then
# summed. Retention policies (made by `dcmon influx-setup`, src/dcmon/influx_setup.py): the raw data in the
# default one; dcmon_1m / dcmon_1h hold <field>_mean/_min/_max and energy_inc_wh (energy counted per bucket).
# Trends read "$rp": the hidden variable picks raw below a 2-day range, dcmon_1m below 60 days, dcmon_1h
# beyond (from dcmon_meta.dcmon_rp, so that the thresholds live in one place). Day and week bars read
# dcmon_1m / dcmon_1h directly.

EXTRA_TAGS = ["site"]              # configured sensor tags that get a variable (sensors[].tags in config.toml)
MINUTE, HOUR = '"dcmon_1m"', '"dcmon_1h"'
GROUP = '"host", "sensor"'


def frm(rp: str, *measurements: str) -> str:
    return ", ".join(f"{rp}.{m}" for m in measurements)


def sel(where: str = "", *, extra: bool = True) -> str:
    """The common WHERE: the dashboard's time range and the variables (regex form, as Grafana interpolates a
    multi-value variable: ``(a|b)``; a single value is regex-escaped). Health points carry no extra tags."""
    tags = ["host"] + (EXTRA_TAGS if extra else []) + ["bus", "sensor"]
    return "WHERE $timeFilter" + "".join(f' AND "{t}" =~ /^${t}$/' for t in tags) + where


def over_time(func: str, field: str, meas: str, by: str = f", {GROUP}") -> str:
    """A statistic per interval from "$rp": the raw field, or its <field>_<func> in a downsampled series."""
    src = frm('"$rp"', meas)
    return (f'SELECT {func}(/^{field}(_{func})?$/) FROM {src} {sel()} '
            f'GROUP BY time($__interval){by} fill(none)')


def now_value(field: str) -> str:
    return f'SELECT last("{field}") AS "{field}" FROM {BOTH} {sel()} GROUP BY {GROUP}'


def steps(rp: str) -> str:
    """Each reading's energy: the counter's step, or after a reset (energy_reset) its whole new count; and
    a downsampled series' energy_inc_wh. Whichever the retention policy holds (the others are empty)."""
    src, reset = frm(rp, DC, AC), sel(' AND "energy_reset" = true')
    return (f'(SELECT non_negative_difference("energy_wh") AS "wh" FROM {src} {sel()} GROUP BY *), '
            f'(SELECT "energy_wh" AS "wh" FROM {src} {reset} GROUP BY *), '
            f'(SELECT "energy_inc_wh" AS "wh" FROM {src} {sel()} GROUP BY *)')


def energy_over(bucket: str, rp: str = '"$rp"', by: str = f", {GROUP}") -> str:
    """Wh per bucket (in $tz), from the retention policy ``rp``."""
    return (f'SELECT sum("wh") AS "energy_wh" FROM {steps(rp)} WHERE $timeFilter '
            f"GROUP BY time({bucket}){by} fill(0) tz('$tz')")


def energy_days(bucket: str, rp: str = MINUTE, by: str = f", {GROUP}") -> str:
    """Day / week totals from a downsampled series: the sum of its per-bucket energy."""
    return (f'SELECT sum("energy_inc_wh") AS "energy_wh" FROM {frm(rp, DC, AC)} {sel()} '
            f"GROUP BY time({bucket}){by} fill(0) tz('$tz')")


def health(func: str, field: str) -> str:
    return (f'SELECT {func}("{field}") AS "{field}" FROM {HEALTH} {sel(extra=False)} '
            f'GROUP BY time($__interval), {GROUP} fill(none)')


def poller(func: str, field: str) -> str:
    return (f'SELECT {func}("{field}") AS "{field}" FROM {HEALTH} WHERE $timeFilter AND "host" =~ /^$host$/ '
            f'AND "sensor" = \'_poller\' GROUP BY time($__interval), "host" fill(none)')


FAILED_POLLS = (f'SELECT non_negative_difference(max("polls_failed")) AS "failed" FROM {HEALTH} {sel(extra=False)} '
                f'GROUP BY time($__interval), {GROUP} fill(none)')
SPOOL_LOSSES = (f'SELECT last("spool_dropped") AS "dropped", last("quarantined") AS "quarantined" FROM {HEALTH} '
                f'WHERE $timeFilter AND "host" =~ /^$host$/ AND "sensor" = \'_poller\' GROUP BY "host"')
RESETS = (f'SELECT "energy_wh", "sensor", "host" FROM {BOTH} WHERE $timeFilter AND "energy_reset" = true '
          f'AND "host" =~ /^$host$/ AND "sensor" =~ /^$sensor$/')
RP_QUERY = 'SELECT last("rp") FROM "dcmon_meta"."dcmon_rp" WHERE time <= ${__to}ms - ${__from}ms'
TZ_QUERY = 'SHOW TAG VALUES FROM "dcmon_meta"."dcmon_site" WITH KEY = "tz" WHERE "host" =~ /^$host$/'


def tag_values(key: str, where: str = "") -> str:
    return f'SHOW TAG VALUES FROM {BOTH} WITH KEY = "{key}"{where}'


# -------------------------------------------------------------------------------------------- panels

def target(query: str, alias: str = ALIAS, ref: str = "A", fmt: str = "time_series") -> dict:
    return {"refId": ref, "datasource": DS, "rawQuery": True, "query": query, "resultFormat": fmt, "alias": alias}


def panel(kind: str, title: str, unit: str, targets: list[dict], *, description: str = "", w: int = 12,
          h: int = 8, decimals: int | None = None, defaults: dict | None = None, options: dict | None = None,
          time_from: str | None = None, link: bool = False, thresholds: list | None = None,
          hide_time_override: bool = False) -> dict:
    d: dict = {"unit": unit, "color": {"mode": "palette-classic" if kind == "timeseries" else "thresholds"},
               "thresholds": {"mode": "absolute", "steps": [{"color": "green", "value": None}]}, "mappings": []}
    if thresholds:
        d["thresholds"]["steps"] = [{"color": c, "value": v} for c, v in thresholds]
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
    if hide_time_override:
        p["hideTimeOverride"] = True
    return p


def graph(title: str, unit: str, targets: list[dict], *, bars: bool = False, **kw) -> dict:
    custom = {"drawStyle": "bars" if bars else "line", "lineWidth": 1, "fillOpacity": 70 if bars else 8,
              "showPoints": "never", "spanNulls": False, "barAlignment": 1 if bars else 0,
              "axisSoftMin": 0 if bars else None,
              "thresholdsStyle": {"mode": "dashed"} if kw.get("thresholds") else None}
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
                [target(f'SELECT last("voltage_v") AS "voltage_v" FROM {BOTH} {sel()} GROUP BY {GROUP}')],
                fields="/^Time$/", graph_mode="none", time_from="7d", defaults={"displayName": "${__series.name}"},
                description="When each sensor's latest reading was taken (data freshness). A sensor missing "
                            "here has sent nothing for 7 days; the alert rule 'meter not answering' fires after "
                            "5 minutes.", **kw)


# battery points (docs/battery.md): tags host and battery only. Downsampled like the meters' (influx_setup.py):
# dcmon_1m / dcmon_1h hold <field>_mean/_min/_max of soc_pct, voltage_v, net_current_a, net_power_w and the last
# value of the history totals under their own names (charged_ah, ...). Trends and the day bars read "$rp"; the
# gauges and stats ("now") read the newest raw point.
BAT_WHERE = 'WHERE $timeFilter AND "host" =~ /^$host$/'
BAT_RP = frm('"$rp"', BAT)
BAT_GROUP = '"host", "battery"'
BAT_ALIAS = "$tag_battery ($tag_host)"


def battery_latest(*fields: str) -> str:
    """The newest point's fields as they are: a field the point does not have (unknown) is null, so the
    panel shows no data instead of an older value (last() would pick the last known one). ``soc_known`` is
    in every point: with it the newest point is returned even when all the other fields are unknown."""
    cols = ", ".join(f'"{f}"' for f in (*fields, "soc_known"))
    return f'SELECT {cols} FROM {BAT} {BAT_WHERE} GROUP BY {BAT_GROUP} ORDER BY time DESC LIMIT 1'


def battery_over_time(field: str) -> str:
    """The mean per interval from "$rp": the raw field, or the downsampled <field>_mean (a bucket where it was
    unknown throughout has none: a gap, as in the raw data)."""
    return (f'SELECT mean(/^{field}(_mean)?$/) FROM {BAT_RP} {BAT_WHERE} '
            f'GROUP BY time($__interval), {BAT_GROUP} fill(none)')


def battery_ah_per_day() -> str:
    """Ah charged and discharged per day (in $tz): the history totals' steps, per stored series, from "$rp".
    A downsampled bucket holds the last total in it under the same name, so the step from one bucket to the
    next is what flowed in the later bucket, and a day sums the same steps at every resolution."""
    return (f'SELECT sum("charged") AS "charged", sum("discharged") AS "discharged" FROM '
            f'(SELECT non_negative_difference("charged_ah") AS "charged", '
            f'non_negative_difference("discharged_ah") AS "discharged" FROM {BAT_RP} {BAT_WHERE} '
            f"GROUP BY *) WHERE $timeFilter GROUP BY time(1d), {BAT_GROUP} fill(0) tz('$tz')")


def gauge(title: str, unit: str, targets: list[dict], *, fields: str = "", **kw) -> dict:
    opts = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": fields, "values": False},
            "orientation": "auto", "showThresholdLabels": False, "showThresholdMarkers": True,
            "sizing": "auto", "minVizWidth": 75, "minVizHeight": 75, "textMode": "auto",
            # Grafana 12+'s gauge options at their defaults (10.4 / 11 ignore them)
            "shape": "gauge", "barShape": "flat", "barWidthFactor": 0.5, "segmentCount": 1, "segmentSpacing": 0.3,
            "effects": {}}
    return panel("gauge", title, unit, targets, options=opts, w=kw.pop("w", 4), h=kw.pop("h", 6), **kw)


SOC = [("red", None), ("orange", 30), ("green", 60)]


def battery_row() -> list[dict]:
    unknown = ("No data = unknown: not synchronised yet (charge it full once), the state was lost, or the meters "
               "cannot tell (docs/battery.md; `dcmon status` says which).")
    return [
        row("Batteries"),
        gauge("State of charge", "percent", [target(battery_latest("soc_pct"), alias=BAT_ALIAS)], fields="/^soc_pct$/",
              decimals=0, thresholds=SOC, defaults={"min": 0, "max": 100}, time_from="1h", hide_time_override=True,
              description="The newest estimate, like a BMV's SoC. " + unknown),
        stat("Time to go", "s", [target(battery_latest("time_to_go_s"), alias=BAT_ALIAS)], fields="/^time_to_go_s$/",
             graph_mode="none", decimals=0, time_from="1h", hide_time_override=True,
             description="Until the discharge floor (discharge_floor_pct) at the averaged discharge current. "
                         "No data while charging or idle, or while the state of charge is unknown."),
        stat("Synchronisations", "short", [target(
            f'SELECT last("synchronisations") AS "synchronisations", last("time_since_full_s") AS "since full" '
            f'FROM {BAT} {BAT_WHERE} GROUP BY {BAT_GROUP}', alias=f"{BAT_ALIAS} $col")],
            graph_mode="none", decimals=0, time_from="30d", hide_time_override=True, w=4,
            defaults={"displayName": "${__series.name}"},
            description="How many times the battery was found full (voltage above the charged voltage, current "
                        "below the tail current, for the detection time), and the seconds since the last one."),
        graph("Net current", "amp", [target(battery_over_time("net_current_a"), alias=BAT_ALIAS)], w=12, decimals=2,
              description="Into the battery (+) minus out of it (-): the charge meters' sum minus the load meters'."),
        graph("Battery state of charge", "percent", [target(battery_over_time("soc_pct"), alias=BAT_ALIAS)],
              decimals=0, defaults={"min": 0, "max": 100}, thresholds=SOC,
              description="Gaps: unknown (not synchronised, or lost). " + unknown),
        graph("Ah charged and discharged per day", "suffix: Ah",
              [target(battery_ah_per_day(), alias=f"{BAT_ALIAS} $col")], bars=True, time_from="7d", decimals=1,
              description="From the monitor's history counters (charge efficiency and Peukert not applied): "
                          "what flowed in and out each day, days starting at midnight in $tz."),
    ]


# thresholds: [(colour, from value)], the first from -infinity (None)
LATENCY = [("green", None), ("orange", 300), ("red", 1000)]        # bus timeout_s is 0.5 s by default
FAILED = [("green", None), ("orange", 1), ("red", 5)]
BACKLOG_AGE = [("green", None), ("orange", 120), ("red", 900)]     # the alert rule fires at 15 min
LOST = [("green", None), ("red", 1)]
PF = [("red", None), ("orange", 0.7), ("green", 0.9)]

# ----------------------------------------------------------------------------------------- dashboards

def query_var(name: str, label: str, query: str, *, multi: bool, all_value: str | None = None) -> dict:
    var = {"type": "query", "name": name, "label": label, "datasource": DS, "query": query, "refresh": 2,
           "sort": 1, "regex": "", "multi": multi, "includeAll": multi, "options": [], "hide": 0, "skipUrlSync": False}
    if multi:
        var["current"] = {"selected": True, "text": ["All"], "value": ["$__all"]}
    if all_value is not None:
        var["allValue"] = all_value
    return var


def extra_vars() -> list[dict]:
    """One variable per configured extra tag. "All" is ``.*``, so that points without the tag still match."""
    return [query_var(t, t.capitalize(), tag_values(t, ' WHERE "host" =~ /^$host$/'), multi=True, all_value=".*")
            for t in EXTRA_TAGS]


def tag_filter(*names: str) -> str:
    return " WHERE " + " AND ".join(f'"{n}" =~ /^${n}$/' for n in names)


TZ_VAR = {**query_var("tz", "Day/week time zone", TZ_QUERY, multi=False),
          "current": {"selected": True, "text": "UTC", "value": "UTC"},
          "description": "The local time zone of the selected host (written by dcmon influx-setup from "
                         "influxdb.timezone or the Pi's own): daily and weekly energy totals start at its midnight"}
RP_VAR = {**query_var("rp", "Retention policy", RP_QUERY, multi=False), "hide": 2,
          "current": {"selected": True, "text": "autogen", "value": "autogen"},
          "description": "Chosen by the time range: raw data below 2 days, 1-minute series below 60 days, "
                         "1-hour series beyond (dcmon_meta.dcmon_rp, written by dcmon influx-setup)"}


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
    day_note = ("Days start at midnight in the host's time zone ($tz). From the 1-minute series "
                "(dcmon influx-setup), so the newest minute or two is not in yet.")
    panels = [
        row("Now"),
        stat("Voltage", "volt", [target(now_value(v))], decimals=2, link=True, time_from="1h", hide_time_override=True),
        stat("Current", "amp", [target(now_value(a))], decimals=2, link=True, time_from="1h", hide_time_override=True),
        stat("Power", "watt", [target(now_value(w))], decimals=1, link=True, time_from="1h", hide_time_override=True),
        stat("Energy today", "watth", [target(energy_days("1d"))], time_from="7d", graph_mode="none", link=True,
             hide_time_override=True,
             description="Energy used since midnight in $tz: the last bar of 'Energy per day'. " + day_note),
        freshness(w=8),
        row("DC"),
        graph("Voltage", "volt", [target(over_time("mean", v, DC))], decimals=2, link=True),
        graph("Current", "amp", [target(over_time("mean", a, DC))], decimals=2, link=True),
        graph("Power", "watt", [target(over_time("mean", w, DC))], decimals=1, link=True),
        states("Alarms", "bool_on_off", [target(
            f'SELECT last("high_voltage_alarm") AS "high voltage", last("low_voltage_alarm") AS "low voltage" '
            f'FROM {DC} {sel()} GROUP BY time($__interval), {GROUP} fill(none)', alias="$tag_sensor ($tag_host) $col")],
            ALARM_MAPPINGS, description="The meters' own high/low voltage alarms (thresholds set on the meter)."),
        row("Energy"),
        graph("Energy per day", "watth", [target(energy_days("1d"))], bars=True, time_from="7d", link=True,
              description="Energy per day from each meter's counter. " + day_note),
        graph("Energy per week", "watth", [target(energy_days("7d, 4d", HOUR))], bars=True, time_from="8w", link=True,
              description="Energy per week (Monday to Sunday in $tz) from each meter's counter, from the 1-hour "
                          "series (in a zone with a half-hour offset the week starts 30 minutes off)."),
        graph("Energy per day, all selected", "watth", [target(energy_days("1d", by=""), alias="all selected sensors")],
              bars=True, time_from="7d", w=24, h=6,
              description="The sum over every selected host and sensor, each counted from its own counter first."),
        row("AC"),
        graph("AC voltage", "volt", [target(over_time("mean", v, AC))], w=8, decimals=1, link=True),
        graph("AC current", "amp", [target(over_time("mean", a, AC))], w=8, decimals=2, link=True),
        graph("AC power", "watt", [target(over_time("mean", w, AC))], w=8, decimals=1, link=True),
        graph("Frequency", "hertz", [target(over_time("mean", "frequency_hz", AC))], w=8, decimals=1),
        graph("Power factor", "none", [target(over_time("mean", "power_factor", AC))], w=8, decimals=2,
              defaults={"min": 0, "max": 1}, thresholds=PF),
        states("AC power alarm", "bool_on_off", [target(
            f'SELECT last("power_alarm") AS "power alarm" FROM {AC} {sel()} '
            f'GROUP BY time($__interval), {GROUP} fill(none)')], ALARM_MAPPINGS, w=8),
        *battery_row(),
        row("Poller health"),
        states("Sensor answering", "bool_on_off", [target(health("last", "up"))], UP_MAPPINGS, w=8,
               description="From dcmon_health: did the meter answer its last poll (written every "
                           "poller.health_interval_s)."),
        graph("Failed polls", "short", [target(FAILED_POLLS)], bars=True, w=8, decimals=0, thresholds=FAILED,
              description="Polls per interval that got no valid answer (timeouts, CRC errors, exceptions)."),
        graph("Poll latency", "ms", [target(health("mean", "latency_ms"))], w=8, decimals=0, thresholds=LATENCY),
        graph("Spool depth", "short", [target(poller("max", "spool_depth"), alias="$tag_host")], w=8, decimals=0,
              description="Readings waiting in the poller's spool for InfluxDB. Grows while InfluxDB is away."),
        graph("Oldest unsent reading", "s", [target(poller("max", "spool_oldest_age_s"), alias="$tag_host")],
              w=8, decimals=0, thresholds=BACKLOG_AGE,
              description="Age of the oldest reading still in the spool: orange after 2 minutes, red (and the "
                          "alert rule) after 15."),
        stat("Readings lost", "short", [target(SPOOL_LOSSES, alias="$tag_host $col")], w=8, h=8,
             graph_mode="none", decimals=0, thresholds=LOST,
             description="Counters since the poller started: readings dropped because the spool was full "
                         "or too old, and batches InfluxDB refused (kept in quarantine: dcmon spool). "
                         "Red from the first one."),
    ]
    return dashboard(OVERVIEW_UID, "dcmon: overview",
                     "Every PZEM meter of every host at a glance: values now, trends, energy per day and week, "
                     "alarms, data freshness and the pollers' health.",
                     [query_var("host", "Host", tag_values("host"), multi=True), *extra_vars(),
                      query_var("bus", "Bus", tag_values("bus", tag_filter("host", *EXTRA_TAGS)), multi=True),
                      query_var("sensor", "Sensor", tag_values("sensor", tag_filter("host", *EXTRA_TAGS, "bus")),
                                multi=True),
                      TZ_VAR, RP_VAR], panels)


def sensor() -> dict:
    def band(field: str) -> list[dict]:
        return [target(f'SELECT {f}(/^{field}(_{f})?$/) FROM "$rp".{DC}, "$rp".{AC} {sel()} '
                       f'GROUP BY time($__interval) fill(none)', alias=f, ref=ref)
                for f, ref in (("min", "A"), ("mean", "B"), ("max", "C"))]

    panels = [
        row("Now"),
        stat("Voltage", "volt", [target(now_value("voltage_v"))], decimals=2, time_from="1h", hide_time_override=True),
        stat("Current", "amp", [target(now_value("current_a"))], decimals=2, time_from="1h", hide_time_override=True),
        stat("Power", "watt", [target(now_value("power_w"))], decimals=1, time_from="1h", hide_time_override=True),
        stat("Energy today", "watth", [target(energy_days("1d"))], time_from="7d", graph_mode="none",
             hide_time_override=True, description="The last bar of 'Energy per day'."),
        stat("Energy counter", "kwatth", [target(
            f'SELECT last("energy_wh") / 1000 AS "energy_kwh" FROM {BOTH} {sel()} GROUP BY {GROUP}')],
            decimals=2, graph_mode="none", time_from="7d", hide_time_override=True,
            description="The meter's own total (reset with dcmon reset-energy)."),
        freshness(w=4),
        row("Trends"),
        graph("Voltage", "volt", band("voltage_v"), decimals=2),
        graph("Current", "amp", band("current_a"), decimals=2),
        graph("Power", "watt", band("power_w"), decimals=1),
        states("Alarms", "bool_on_off", [
            target(f'SELECT last("high_voltage_alarm") AS "high voltage", last("low_voltage_alarm") AS "low voltage" '
                   f'FROM {DC} {sel()} GROUP BY time($__interval) fill(none)', alias="$col"),
            target(f'SELECT last("power_alarm") AS "power" FROM {AC} {sel()} GROUP BY time($__interval) fill(none)',
                   alias="$col", ref="B")], ALARM_MAPPINGS,
            description="DC meters: high/low voltage alarms; AC meters: the power alarm."),
        row("Energy"),
        graph("Energy per hour", "watth", [target(energy_over("1h"))], bars=True, decimals=0,
              description="From the raw readings for short ranges, the downsampled series for long ones."),
        graph("Energy per day", "watth", [target(energy_days("1d"))], bars=True, time_from="30d", decimals=0,
              description="Days start at midnight in $tz (1-minute series)."),
        row("AC meters only"),
        graph("Frequency", "hertz", [target(over_time("mean", "frequency_hz", AC, by=""), alias="frequency")], decimals=1),
        graph("Power factor", "none", [target(over_time("mean", "power_factor", AC, by=""), alias="power factor")], decimals=2,
              defaults={"min": 0, "max": 1}, thresholds=PF),
        row("Polling"),
        states("Answering", "bool_on_off", [target(health("last", "up"))], UP_MAPPINGS, w=8),
        graph("Failed polls", "short", [target(FAILED_POLLS)], bars=True, w=8, decimals=0, thresholds=FAILED),
        graph("Poll latency", "ms", [target(health("mean", "latency_ms"))], w=8, decimals=0, thresholds=LATENCY),
    ]
    return dashboard(SENSOR_UID, "dcmon: sensor", "One meter in detail: choose the host, the bus and the sensor above.",
                     [query_var("host", "Host", tag_values("host"), multi=False), *extra_vars(),
                      query_var("bus", "Bus", tag_values("bus", tag_filter("host", *EXTRA_TAGS)), multi=True),
                      query_var("sensor", "Sensor", tag_values("sensor", tag_filter("host", *EXTRA_TAGS, "bus")),
                                multi=False),
                      TZ_VAR, RP_VAR], panels)


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


# --------------------------------------------------------------------------------------------- alerts
# Grafana-managed alert rules, file-provisioned (grafana/provisioning/alerting/dcmon.yaml). Grafana evaluates
# them centrally, so a host that died entirely still raises one (the dead-man rule). Each rule: an InfluxQL
# query (A, and B for the thresholds), Grafana server-side expressions (__expr__) to reduce and compare.

ALERT_FOLDER = "DC monitoring"
BACKLOG_MINUTES = 15
EXPR = "__expr__"


def q_data(ref: str, query: str, seconds: int) -> dict:
    return {"refId": ref, "relativeTimeRange": {"from": seconds, "to": 0}, "datasourceUid": DS_UID,
            "model": {"refId": ref, "datasource": DS, "rawQuery": True, "query": query,
                      "resultFormat": "time_series", "intervalMs": 60000, "maxDataPoints": 43200}}


def expr(ref: str, **model) -> dict:
    return {"refId": ref, "relativeTimeRange": {"from": 0, "to": 0}, "datasourceUid": EXPR,
            "model": {"refId": ref, "datasource": {"type": "__expr__", "uid": EXPR}, **model}}


def reduce_(ref: str, of: str, reducer: str = "last") -> dict:
    return expr(ref, type="reduce", expression=of, reducer=reducer, settings={"mode": "dropNN"})


def threshold(ref: str, of: str, op: str, value: float) -> dict:
    return expr(ref, type="threshold", expression=of,
                conditions=[{"evaluator": {"type": op, "params": [value]}}])


def rule(uid: str, title: str, data: list[dict], *, summary: str, description: str, for_: str,
         no_data: str = "OK", severity: str = "warning") -> dict:
    return {"uid": uid, "title": title, "condition": data[-1]["refId"], "data": data,
            "noDataState": no_data, "execErrState": "Error", "for": for_,
            "annotations": {"summary": summary, "description": description},
            "labels": {"severity": severity, "project": "dcmon"}, "isPaused": False}


ALERT_QUERIES = {
    # polls that got an answer, per meter, over 10 minutes: a counter that did not move = no answer
    "meter": (f'SELECT spread("polls_ok") AS "answered" FROM {HEALTH} WHERE $timeFilter AND "sensor" != \'_poller\' '
              f'GROUP BY {GROUP}', 600),
    # poller heartbeats per 5 minutes, over a day: a host that wrote nothing for 10 minutes shows 0 (fill)
    "host": (f'SELECT count("cycles") AS "heartbeats" FROM {HEALTH} WHERE $timeFilter AND "sensor" = \'_poller\' '
             f'GROUP BY time(5m), "host" fill(0)', 86400),
    "backlog": (f'SELECT last("spool_oldest_age_s") AS "oldest_s" FROM {HEALTH} WHERE $timeFilter '
                f'AND "sensor" = \'_poller\' GROUP BY "host"', 900),
    "lost": (f'SELECT spread("spool_dropped") + spread("quarantined") AS "lost" FROM {HEALTH} WHERE $timeFilter '
             f'AND "sensor" = \'_poller\' GROUP BY "host"', 3600),
    "voltage": (f'SELECT last("voltage_v") AS "voltage_v" FROM {BOTH} WHERE $timeFilter GROUP BY {GROUP}', 600),
    "voltage_min": ('SELECT last("low_voltage_v") AS "low_voltage_v" FROM "dcmon_meta"."dcmon_thresholds" '
                    f'WHERE time >= 0 GROUP BY {GROUP}', 600),
    # the state of charge of each battery's newest point, only where that point knows it: the inner query takes
    # the newest point (last of soc_known, a field every point has) with its soc_pct; a battery whose newest point
    # is unknown gives no row (last("soc_pct") alone would give the last known value, however old)
    "soc": (f'SELECT "soc_pct" FROM (SELECT last("soc_known") AS "soc_known", "soc_pct" FROM {BAT} '
            f'WHERE $timeFilter GROUP BY {BAT_GROUP}) WHERE $timeFilter AND "soc_known" = true GROUP BY {BAT_GROUP}',
            600),
    # each battery's discharge floor (lead-acid 50 %, LiFePO4 10 %, or discharge_floor_pct), by dcmon influx-setup
    "soc_floor": ('SELECT last("discharge_floor_pct") AS "discharge_floor_pct" FROM "dcmon_meta"."dcmon_thresholds" '
                  f'WHERE time >= 0 GROUP BY {BAT_GROUP}', 600),
}


def alert_rules() -> dict:
    Q = ALERT_QUERIES
    rules = [
        rule("dcmon-meter-silent", "Meter not answering",
             [q_data("A", *Q["meter"]), reduce_("B", "A"), threshold("C", "B", "lt", 1)], for_="0s",
             summary="{{ $labels.sensor }} on {{ $labels.host }} has not answered for 10 minutes",
             description="No valid reply to any poll. Check the meter's power and RS485 wiring; "
                         "`dcmon status` on the host shows the last error."),
        rule("dcmon-host-silent", "No data from a host",
             [q_data("A", *Q["host"]), reduce_("B", "A"), threshold("C", "B", "lt", 1)], for_="10m",
             no_data="Alerting", severity="critical",
             summary="{{ $labels.host }} has sent nothing for 10 minutes or more",
             description="The Pi, its poller or its uplink is down (dead-man rule, evaluated by Grafana). "
                         "When no host at all sends, this fires as 'no data'. A host silent for over a day "
                         "drops out of the query: check the dashboards' Host list."),
        rule("dcmon-spool-backlog", f"Spool backlog older than {BACKLOG_MINUTES} minutes",
             [q_data("A", *Q["backlog"]), reduce_("B", "A"), threshold("C", "B", "gt", BACKLOG_MINUTES * 60)],
             for_="5m",
             summary="{{ $labels.host }}: readings have waited in the spool for over "
                     f"{BACKLOG_MINUTES} minutes",
             description="InfluxDB refuses or cannot keep up with this host's writes; `dcmon spool` on the host "
                         "shows the last error. Nothing is lost while the spool has room."),
        rule("dcmon-readings-lost", "Readings lost",
             [q_data("A", *Q["lost"]), reduce_("B", "A", "max"), threshold("C", "B", "gt", 0)], for_="0s",
             severity="critical",
             summary="{{ $labels.host }} lost or set aside readings in the last hour",
             description="The spool was full or too old (dropped), or InfluxDB refused lines for good "
                         "(quarantine: `dcmon spool quarantine list`)."),
        rule("dcmon-low-voltage", "Voltage below the sensor's threshold",
             [q_data("A", *Q["voltage"]), q_data("B", *Q["voltage_min"]), reduce_("C", "A"), reduce_("D", "B"),
              expr("E", type="math", expression="$C < $D")], for_="5m", severity="critical",
             summary="{{ $labels.sensor }} on {{ $labels.host }} is below its low-voltage threshold",
             description="Thresholds per sensor: influxdb.low_voltage_v in the host's config.toml, written to "
                         "InfluxDB by `dcmon influx-setup`."),
        # warning, not critical: the battery has reached the floor its owner set for planning (Victron's SoC
        # alarm), nothing is lost; the hard limit is the low-voltage rule. No data (no battery configured, or
        # every battery's state of charge unknown) is not low: OK.
        rule("dcmon-battery-soc-low", "Battery state of charge low",
             [q_data("A", *Q["soc"]), q_data("B", *Q["soc_floor"]), reduce_("C", "A"), reduce_("D", "B"),
              expr("E", type="math", expression="$C <= $D")], for_="5m",
             summary="Battery {{ $labels.battery }} on {{ $labels.host }} is at or below its discharge floor",
             description="Its state of charge has been at or below the floor for 5 minutes: charge it or shed "
                         "load. The floor is [[batteries]] discharge_floor_pct (lead-acid 50 %, LiFePO4 10 %), "
                         "written to InfluxDB by `dcmon influx-setup` (run it again after changing a battery). "
                         "An unknown state of charge never fires this."),
    ]
    return {"apiVersion": 1, "groups": [{"orgId": 1, "name": "dcmon", "folder": ALERT_FOLDER, "interval": "1m",
                                          "rules": rules}]}


def build() -> dict[Path, dict]:
    files: dict[Path, dict] = {}
    for name, dash in (("overview", overview()), ("sensor", sensor())):
        files[HERE / "dashboards" / f"dcmon-{name}.json"] = dash
        files[HERE / "import" / f"dcmon-{name}.json"] = for_ui_import(copy.deepcopy(dash))
    files[HERE / "provisioning" / "alerting" / "dcmon.yaml"] = alert_rules()
    return files


ALERT_HEADER = ("# Grafana alert rules for dcmon (file provisioning). Generated by grafana/build_dashboards.py: edit\n"
                "# that and rebuild. JSON is YAML too; docs/grafana.md says how to add a contact point.\n")


def render(d: dict) -> str:
    text = json.dumps(d, indent=2, ensure_ascii=False) + "\n"
    return ALERT_HEADER + text if "apiVersion" in d else text


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
