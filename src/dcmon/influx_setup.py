"""``dcmon influx-setup``: an InfluxDB 1.x database that stays small for years, and its downsampling.

What it makes (every step idempotent: run it again after changing the config, or after an upgrade):

- the database ``influxdb.database``;
- retention policies: the raw one (``influxdb.retention_policy``, or the database's default, usually
  ``autogen``) kept ``influxdb.raw_days``; ``dcmon_1m`` (1-minute series, ``minute_days``) and ``dcmon_1h``
  (1-hour series, ``hour_days``; 0 = forever); ``dcmon_meta`` (forever, a few points: below);
- continuous queries, per measurement (``influxdb.measurement``, ``measurement_ac``):
  raw → 1 m: ``<field>_mean``, ``<field>_min``, ``<field>_max`` of voltage, current, power (AC also
  frequency and power factor), and ``energy_inc_wh``, the energy counted in the minute (below);
  1 m → 1 h: mean of the means, min of the mins, max of the maxes, sum of ``energy_inc_wh``;
- the same for the batteries' ``battery`` measurement (dcmon.battery_service; one point per battery and poll
  cycle, tags ``host`` and ``battery``), per host and battery: ``<field>_mean``, ``_min``, ``_max`` of
  ``BATTERY_STATS`` (state of charge, voltage, net current and power), and the last value in the bucket,
  under the field's own name, of ``BATTERY_LAST`` (the growing history totals, so that a day's increase is
  the difference of two buckets' totals at any resolution; the state at the bucket's end: consumed Ah, time
  to go, ``status``, ``soc_known``, ...). A value the monitor did not know is left out of the raw point; a
  bucket in which every point lacked it has no such field (never 0), and ``last()`` is the last value known
  in the bucket (``soc_known`` says whether the bucket ended known). ``unknown_reason`` stays raw-only: it is
  written only while unknown, so a bucket's last one would outlive a return to known within the bucket;
- in ``dcmon_meta``: ``dcmon_rp`` (which retention policy a dashboard reads for a time range: the point's
  timestamp is the shortest range, in ns since 1970, for which that policy is used) and
  ``dcmon_thresholds`` (``low_voltage_v`` per host and sensor, from ``influxdb.low_voltage_v``, and
  ``discharge_floor_pct`` per host and battery, from ``[[batteries]]``, for the Grafana alert rules) and ``dcmon_site`` (the host's time zone, ``influxdb.timezone`` or the machine's own,
  where the dashboards' days start);
- the first time the 1-minute policy is created, the raw data already there is downsampled into it, before
  the raw policy is shortened; likewise, a measurement whose continuous queries are created for the first
  time (the battery's, on a database set up before it had them) has its stored raw data downsampled once.

Energy in a bucket (1 m) is the sum of each reading's increase over the reading before: the counter's step,
or, for a reading marked ``energy_reset=true`` (the counter went down), its whole new count (energy counted
since the reset). The statement differences a cumulative sum (``difference(cumulative_sum(sum(...)))``) so
that each bucket is written with the steps inside it; InfluxDB reads one bucket before the window for that.
A continuous query (``RESAMPLE EVERY 1m FOR 2m``) therefore sees one minute back: a step whose previous
reading is more than a minute older (the poller was stopped, the meter silent, and the meter kept counting)
is in the raw data only. ``dcmon influx-setup --downsample 1d`` (and the backfill below) redoes a window a week
at a time, reaching a week before each: steps across gaps up to a week are then counted.

Continuous queries only see what arrives in time. Readings the spool delivers after an outage are
downsampled by :class:`Backfill`, which the poller's sender calls after a backlog is sent: it runs the same
SELECT ... INTO statements over the backlog's window (from its oldest reading), in a thread of its own.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from .battery_service import MEASUREMENT as BATTERY
from .config import Config, InfluxConfig, load
from .errors import ConfigError, SetupError, SinkError
from .outputs.influx import InfluxSink

log = logging.getLogger(__name__)

MINUTE_RP, HOUR_RP, META_RP = "dcmon_1m", "dcmon_1h", "dcmon_meta"
RP_MEASUREMENT, THRESHOLD_MEASUREMENT, SITE_MEASUREMENT = "dcmon_rp", "dcmon_thresholds", "dcmon_site"
# the shortest dashboard time range (seconds) that reads each policy: raw below 2 days, 1 m below 60 days
RP_FROM_RANGE_S = {"": 0, MINUTE_RP: 2 * 86400, HOUR_RP: 60 * 86400}
STATS_DC = ("voltage_v", "current_a", "power_w")
STATS_AC = STATS_DC + ("frequency_hz", "power_factor")
# the battery measurement's fields (dcmon.battery_service.influx_fields): mean/min/max per bucket; the last value
# in the bucket, same name (totals that only grow, and the state at the bucket's end); kept in the raw data only
BATTERY_STATS = ("soc_pct", "voltage_v", "net_current_a", "net_power_w")
BATTERY_LAST = ("charged_ah", "discharged_ah", "charged_kwh", "discharged_kwh", "full_cycles", "synchronisations",
                "consumed_ah", "time_to_go_s", "time_since_full_s", "deepest_discharge_ah", "last_discharge_ah",
                "average_discharge_ah", "min_voltage_v", "max_voltage_v", "status", "soc_known")
BATTERY_RAW_ONLY = ("unknown_reason",)
MINUTE_NS, HOUR_NS, DAY_NS = 60 * 10**9, 3600 * 10**9, 86400 * 10**9
CHUNK_NS = 7 * DAY_NS
OVERLAP_NS = 7 * DAY_NS           # downsampling by hand: a step across a gap up to this long at a chunk's start
CQ_PREFIX = "dcmon_"


def q(name: str) -> str:
    """An InfluxQL identifier, double-quoted."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def duration(days: float) -> str:
    """An InfluxQL duration; 0 = forever."""
    return "INF" if days <= 0 else f"{round(days * 24)}h"


# ------------------------------------------------------------------------------------- statements

@dataclass(frozen=True)
class Plan:
    """Every name and statement, derived from the config (no I/O)."""

    db: str
    raw_rp: str                     # resolved: the configured one or the database's default
    measurements: dict[str, tuple[str, ...]]  # the meters' measurement → its statistics fields
    battery: str = BATTERY                      # the batteries' measurement

    @property
    def all_measurements(self) -> tuple[str, ...]:
        return (*self.measurements, self.battery)

    def src(self, rp: str, m: str) -> str:
        return f"{q(self.db)}.{q(rp)}.{q(m)}"

    def stats_1m(self, m: str) -> str:
        cols = ", ".join(f'{f}("{x}") AS "{x}_{f}"' for x in self.measurements[m] for f in ("mean", "min", "max"))
        return f"SELECT {cols} INTO {self.src(MINUTE_RP, m)} FROM {self.src(self.raw_rp, m)}"

    def energy_1m(self, m: str) -> str:
        raw = self.src(self.raw_rp, m)
        steps = (f'(SELECT non_negative_difference("energy_wh") AS "wh" FROM {raw} GROUP BY *), '
                 f'(SELECT "energy_wh" AS "wh" FROM {raw} WHERE "energy_reset" = true GROUP BY *)')
        return (f'SELECT sum("d") AS "energy_inc_wh" INTO {self.src(MINUTE_RP, m)} FROM '
                f'(SELECT difference("c") AS "d" FROM (SELECT cumulative_sum(sum("wh")) AS "c" FROM {steps} '
                f'GROUP BY time(1m), * fill(0)) GROUP BY *)')

    def stats_1h(self, m: str) -> str:
        cols = [f'{f}("{x}_{f}") AS "{x}_{f}"' for x in self.measurements[m] for f in ("mean", "min", "max")]
        cols.append('sum("energy_inc_wh") AS "energy_inc_wh"')
        return f"SELECT {', '.join(cols)} INTO {self.src(HOUR_RP, m)} FROM {self.src(MINUTE_RP, m)}"

    def battery_1m(self) -> str:
        cols = [f'{f}("{x}") AS "{x}_{f}"' for x in BATTERY_STATS for f in ("mean", "min", "max")]
        cols += [f'last("{x}") AS "{x}"' for x in BATTERY_LAST]
        b = self.battery
        return f"SELECT {', '.join(cols)} INTO {self.src(MINUTE_RP, b)} FROM {self.src(self.raw_rp, b)}"

    def battery_1h(self) -> str:
        cols = [f'{f}("{x}_{f}") AS "{x}_{f}"' for x in BATTERY_STATS for f in ("mean", "min", "max")]
        cols += [f'last("{x}") AS "{x}"' for x in BATTERY_LAST]
        b = self.battery
        return f"SELECT {', '.join(cols)} INTO {self.src(HOUR_RP, b)} FROM {self.src(MINUTE_RP, b)}"

    def continuous_queries(self, only: str | None = None) -> dict[str, str]:
        """name → CREATE CONTINUOUS QUERY statement, of every measurement or of the measurement ``only``."""
        out = {}
        queries: list[tuple[str, tuple[tuple[str, str, str, str, str], ...]]]
        queries = [(m, (("1m_stats", self.stats_1m(m), "1m", "2m", "1m"),
                        ("1m_energy", self.energy_1m(m), "1m", "2m", "1m"),
                        ("1h", self.stats_1h(m), "10m", "2h", "1h"))) for m in self.measurements]
        queries.append((self.battery, (("1m", self.battery_1m(), "1m", "2m", "1m"),
                                       ("1h", self.battery_1h(), "10m", "2h", "1h"))))
        for m, kinds in queries:
            if only is not None and m != only:
                continue
            for kind, select, every, for_, group in kinds:
                name = f"{CQ_PREFIX}{m}_{kind}"
                out[name] = (f"CREATE CONTINUOUS QUERY {q(name)} ON {q(self.db)} RESAMPLE EVERY {every} FOR {for_} "
                             f"BEGIN {select} GROUP BY time({group}), * END")
        return out

    def downsample_statements(self, start_ns: int, end_ns: int, only: tuple[str, ...] | None = None) -> list[str]:
        """SELECT ... INTO statements that redo the downsampling of [start, end) (widened to whole buckets),
        of every measurement or of those in ``only``.

        A week at a time (bounded memory on a Pi), newest first, each reaching OVERLAP_NS back: a chunk's
        first buckets lack the steps from readings before the chunk, and the older chunk, run after it,
        rewrites them with those steps included. The battery's statistics and last values need nothing from
        before a bucket."""
        m0, m1 = start_ns // MINUTE_NS * MINUTE_NS, -(-end_ns // MINUTE_NS) * MINUTE_NS
        h0, h1 = m0 // HOUR_NS * HOUR_NS, -(-m1 // HOUR_NS) * HOUR_NS
        out = []
        starts = list(range(m0, m1, CHUNK_NS))
        if only is None or self.battery in only:
            for a in reversed(starts):
                b = min(m1, a + CHUNK_NS)
                out.append(f"{self.battery_1m()} WHERE time >= {a} AND time < {b} GROUP BY time(1m), *")
            out.append(f"{self.battery_1h()} WHERE time >= {h0} AND time < {h1} GROUP BY time(1h), *")
        for m in self.measurements:
            if only is not None and m not in only:
                continue
            for a in reversed(starts):           # CHUNK_NS each
                b = min(m1, a + CHUNK_NS)
                out.append(f"{self.stats_1m(m)} WHERE time >= {a} AND time < {b} GROUP BY time(1m), *")
                out.append(f"{self.energy_1m(m)} WHERE time >= {a - OVERLAP_NS} AND time < {b} "
                           "GROUP BY time(1m), *")
            out.append(f"{self.stats_1h(m)} WHERE time >= {h0} AND time < {h1} GROUP BY time(1h), *")
        return out


def plan_for(cfg: Config, raw_rp: str) -> Plan:
    ix = cfg.influxdb
    return Plan(db=ix.database, raw_rp=raw_rp, measurements={ix.measurement: STATS_DC, ix.measurement_ac: STATS_AC})


# ------------------------------------------------------------------------------------------ client

class Influx:
    """The /query endpoint of InfluxDB 1.x, with the poller's credentials."""

    def __init__(self, ix: InfluxConfig, timeout_s: float = 300.0) -> None:
        verify: bool | str = ix.ca_file if (ix.verify_tls and ix.ca_file) else ix.verify_tls
        auth = httpx.BasicAuth(ix.username, ix.password) if ix.username else None
        headers = {"Authorization": f"Token {ix.token}"} if (ix.token and not ix.username) else {}
        self.where = f"InfluxDB at {ix.url}"
        self.db = ix.database
        self.http = httpx.Client(base_url=ix.url, auth=auth, headers=headers, verify=verify, timeout=timeout_s)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Influx:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, statement: str, *, db: str | None = None) -> list[dict]:
        """One statement; returns its series. Raises SetupError with one line."""
        try:
            r = self.http.post("/query", params={"db": db if db is not None else self.db, "epoch": "ns"},
                               data={"q": statement})
        except httpx.HTTPError as e:
            raise SetupError(f"{self.where}: {type(e).__name__} (is InfluxDB running? check influxdb.url)") from None
        try:
            body = r.json()
        except ValueError:
            body = {}
        err = body.get("error") or next((x.get("error") for x in body.get("results", []) if x.get("error")), None)
        if r.status_code in (401, 403):
            raise SetupError(f"{self.where} refused the credentials ({r.status_code}): influx-setup needs an admin "
                             "user (influxdb.username / password)")
        if err or not r.is_success:
            raise SetupError(f"{self.where}: {' '.join(str(err or r.reason_phrase).split())[:300]} "
                             f"(statement: {statement[:120]}...)")
        return body.get("results", [{}])[0].get("series", [])

    def write(self, lines: list[str], rp: str) -> None:
        try:
            r = self.http.post("/write", params={"db": self.db, "rp": rp, "precision": "ns"},
                               content=("\n".join(lines) + "\n").encode())
        except httpx.HTTPError as e:
            raise SetupError(f"{self.where}: {type(e).__name__} while writing to {rp}") from None
        if not r.is_success:
            raise SetupError(f"{self.where} refused a write to {rp} ({r.status_code}): {r.text.strip()[:200]}")

    def rows(self, statement: str) -> list[dict]:
        out = []
        for s in self.run(statement):
            out += [dict(zip(s["columns"], v)) for v in s.get("values", [])]
        return out


# --------------------------------------------------------------------------------------------- setup

def _rp_line(name: str, days: float, rp: dict | None) -> str | None:
    """CREATE or ALTER for one policy, or None when it is already as wanted."""
    want = duration(days)
    if rp is None:
        return f"CREATE RETENTION POLICY {q(name)} ON {{db}} DURATION {want} REPLICATION 1"
    have_ns = _duration_ns(rp["duration"])
    want_ns = 0 if want == "INF" else int(want[:-1]) * 3600 * 10**9
    return None if have_ns == want_ns else f"ALTER RETENTION POLICY {q(name)} ON {{db}} DURATION {want}"


def _duration_ns(text: str) -> int:
    """InfluxDB's SHOW RETENTION POLICIES duration, e.g. '2160h0m0s'; '0s' = forever."""
    total, num = 0.0, ""
    units = {"h": 3600, "m": 60, "s": 1}
    for ch in text:
        if ch.isdigit() or ch == ".":
            num += ch
        elif ch in units:
            total += float(num or 0) * units[ch] * 10**9
            num = ""
    return int(total)


def setup(cfg: Config, api: Influx, *, say: Callable[[str], None] = print) -> Plan:
    """Make everything; return the plan. Each change is said in one line; nothing to do says so."""
    ix = cfg.influxdb
    db = q(ix.database)
    changed = 0
    dbs = {r["name"] for r in api.rows("SHOW DATABASES")}
    if ix.database not in dbs:
        api.run(f"CREATE DATABASE {db}", db="")
        say(f"created database {ix.database!r}")
        changed += 1
    rps = {r["name"]: r for r in api.rows(f"SHOW RETENTION POLICIES ON {db}")}
    raw_rp = ix.retention_policy or next((n for n, r in rps.items() if r.get("default")), "autogen")
    first_time = MINUTE_RP not in rps
    for name, days in ((MINUTE_RP, ix.minute_days), (HOUR_RP, ix.hour_days), (META_RP, 0)):
        stmt = _rp_line(name, days, rps.get(name))
        if stmt:
            api.run(stmt.format(db=db))
            say(f"retention policy {name}: {duration(days)}")
            changed += 1
    plan = plan_for(cfg, raw_rp)
    if raw_rp not in rps:          # a configured retention_policy that does not exist yet
        api.run(f"CREATE RETENTION POLICY {q(raw_rp)} ON {db} DURATION INF REPLICATION 1")
        rps[raw_rp] = {"name": raw_rp, "duration": "0s"}
    existing = {r["name"]: r["query"] for s in api.run("SHOW CONTINUOUS QUERIES") if s.get("name") == ix.database
                for r in (dict(zip(s["columns"], v)) for v in s.get("values", []))}
    # measurements none of whose continuous queries existed yet (the battery's on a database set up before)
    new = tuple(m for m in plan.all_measurements if existing.keys().isdisjoint(plan.continuous_queries(m)))
    for name, stmt in plan.continuous_queries().items():
        if name in existing and _same_cq(existing[name], stmt):
            continue
        if name in existing:
            api.run(f"DROP CONTINUOUS QUERY {q(name)} ON {db}")
        api.run(stmt)
        say(f"continuous query {name}")
        changed += 1
    todo = plan.all_measurements if first_time else new
    if todo:                       # downsample what is already there, before the raw policy may shorten
        first = _first_time_ns(api, plan, todo)
        if first is not None:
            what = "" if first_time else f" of {', '.join(repr(m) for m in todo)}"
            say(f"downsampling the raw data{what} already in the database (once) ...")
            downsample(api, plan, first, time.time_ns(), only=todo)
            changed += 1
    stmt = _rp_line(raw_rp, ix.raw_days, rps.get(raw_rp))
    if stmt:
        api.run(stmt.format(db=db))
        say(f"retention policy {raw_rp} (raw): {duration(ix.raw_days)}")
        changed += 1
    if write_meta(cfg, api, raw_rp):
        say(f"{META_RP}: time-range map, time zone and thresholds for host {cfg.host!r}")
        changed += 1
    if not changed:
        say(f"{ix.database!r} on {ix.url}: already set up, nothing changed")
    return plan


def _same_cq(shown: str, stmt: str) -> bool:
    """SHOW CONTINUOUS QUERIES prints the statement re-formatted; compare without quotes and spacing."""
    def norm(s: str) -> str:
        return "".join(s.replace('"', "").split()).lower()
    return norm(shown) == norm(stmt)


def _first_time_ns(api: Influx, plan: Plan, measurements: tuple[str, ...]) -> int | None:
    """The oldest raw point's time of these measurements (a field every point has), or None."""
    firsts = []
    for m in measurements:
        field = "status" if m == plan.battery else "voltage_v"
        for s in api.run(f'SELECT first("{field}") FROM {plan.src(plan.raw_rp, m)}'):
            firsts.append(int(s["values"][0][0]))
    return min(firsts) if firsts else None


def write_meta(cfg: Config, api: Influx, raw_rp: str) -> int:
    """The range → policy map and the per-sensor thresholds, in dcmon_meta (rewritten: same points)."""
    rp_lines = [f'{RP_MEASUREMENT} rp="{rp or raw_rp}" {s * 10**9}' for rp, s in RP_FROM_RANGE_S.items()]
    have = api.rows(f"SELECT * FROM {q(META_RP)}.{q(RP_MEASUREMENT)}")
    want = {(s * 10**9, rp or raw_rp) for rp, s in RP_FROM_RANGE_S.items()}
    changed = 0
    if {(r["time"], r["rp"]) for r in have} != want:
        api.run(f"DELETE FROM {q(RP_MEASUREMENT)}")
        api.write(rp_lines, META_RP)
        changed += 1
    from .reading import encode_line
    host = cfg.host
    # per sensor: low_voltage_v (tag sensor); per battery: its discharge floor (tag battery), for the SoC alert
    lines = [encode_line(THRESHOLD_MEASUREMENT, {"host": host, "sensor": name}, {"low_voltage_v": float(v)}, 0)
             for name, v in sorted(cfg.influxdb.low_voltage_v.items())]
    lines += [encode_line(THRESHOLD_MEASUREMENT, {"host": host, "battery": b.name},
                          {"discharge_floor_pct": float(b.discharge_floor_pct)}, 0) for b in cfg.batteries]
    have_t = {(k, r[tag]): r[k] for r in
              api.rows(f"SELECT * FROM {q(META_RP)}.{q(THRESHOLD_MEASUREMENT)} WHERE \"host\" = '{_esc(host)}'")
              for k, tag in (("low_voltage_v", "sensor"), ("discharge_floor_pct", "battery")) if r.get(k) is not None}
    want_t = {("low_voltage_v", n): float(v) for n, v in cfg.influxdb.low_voltage_v.items()}
    want_t |= {("discharge_floor_pct", b.name): float(b.discharge_floor_pct) for b in cfg.batteries}
    if have_t != want_t:
        api.run(f"DROP SERIES FROM {q(THRESHOLD_MEASUREMENT)} WHERE \"host\" = '{_esc(host)}'")
        if lines:
            api.write(lines, META_RP)
        changed += 1
    tz = cfg.influxdb.timezone or local_timezone()
    have_tz = [r["tz"] for r in api.rows(f"SELECT * FROM {q(META_RP)}.{q(SITE_MEASUREMENT)} WHERE \"host\" = '{_esc(host)}'")]
    if have_tz != [tz]:
        api.run(f"DROP SERIES FROM {q(SITE_MEASUREMENT)} WHERE \"host\" = '{_esc(host)}'")
        api.write([encode_line(SITE_MEASUREMENT, {"host": host, "tz": tz}, {"n": 1}, 0)], META_RP)
        changed += 1
    return changed


def local_timezone() -> str:
    """This machine's IANA zone name (Debian: /etc/timezone, or the /etc/localtime link); UTC if unknown."""
    try:
        name = Path("/etc/timezone").read_text(encoding="utf-8").strip()
        if name:
            return name
    except OSError:
        pass
    target = os.path.realpath("/etc/localtime")
    return target.split("zoneinfo/", 1)[1] if "zoneinfo/" in target else "UTC"


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("'", "\\'")


def downsample(api: Influx, plan: Plan, start_ns: int, end_ns: int, only: tuple[str, ...] | None = None) -> int:
    """Redo the 1 m and 1 h series of [start, end) from the raw data (every measurement, or ``only``).
    Returns the statements run."""
    stmts = plan.downsample_statements(start_ns, end_ns, only)
    for s in stmts:
        api.run(s)
    return len(stmts)


# ------------------------------------------------------------------------------------------ backfill

class Backfill:
    """The sender's ``on_backlog_sent`` callback: after readings from an outage reached InfluxDB, redo the
    downsampling of the window they cover (plus a margin), in a thread, so the sender never waits on it.
    The window starts at the oldest reading the first successful write after a failure carried (``watch``
    wraps the sink to see it: the spool sends oldest first), so a backlog older than the outage, e.g. from
    before a reboot, is covered too. Does nothing when the database was not set up (no dcmon_1m policy)."""

    MARGIN_NS = 2 * MINUTE_NS

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.runs = 0
        self._failing = False
        self._oldest_ns: int | None = None

    def watch(self, sink: InfluxSink) -> _WatchedSink:
        return _WatchedSink(sink, self)

    def _seen(self, ok: bool, first_line: str) -> None:
        if not ok:
            self._failing = True
        elif self._failing:
            self._failing = False
            try:
                t = int(first_line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                t = time.time_ns()
            self._oldest_ns = t if self._oldest_ns is None else min(self._oldest_ns, t)

    def __call__(self, outage_s: float) -> None:
        end = time.time_ns()
        start = end - int(outage_s * 1e9)
        if self._oldest_ns is not None:
            start, self._oldest_ns = min(start, self._oldest_ns), None
        self.thread = threading.Thread(target=self._run, args=(start - self.MARGIN_NS, end + self.MARGIN_NS),
                                       name="backfill", daemon=True)
        self.thread.start()

    def _run(self, start_ns: int, end_ns: int) -> None:
        if self.cfg.influxdb.api != 1:
            return
        with self._lock:                           # one at a time; a second outage waits for the first
            try:
                with Influx(self.cfg.influxdb) as api:
                    rps = {r["name"]: r for r in api.rows(f"SHOW RETENTION POLICIES ON {q(self.cfg.influxdb.database)}")}
                    if MINUTE_RP not in rps:
                        return
                    raw = self.cfg.influxdb.retention_policy or next((n for n, r in rps.items() if r.get("default")), "autogen")
                    n = downsample(api, plan_for(self.cfg, raw), start_ns, end_ns)
                self.runs += 1
                log.info("downsampled the %.0f minutes the backlog covered (%d statements)",
                         (end_ns - start_ns) / 60e9, n)
            except Exception as e:  # noqa: BLE001 - a thread of its own: log, never die silently
                log.warning("could not downsample the backlog's window (%s); run `dcmon influx-setup --downsample "
                            "%dm` later", e, (end_ns - start_ns) // MINUTE_NS + 1)


class _WatchedSink:
    """An InfluxSink that tells the backfill whether each write worked, and the first line's timestamp."""

    def __init__(self, sink: InfluxSink, backfill: Backfill) -> None:
        self._sink, self._backfill = sink, backfill
        self.where, self.cfg = sink.where, sink.cfg

    def write(self, lines: list[str]) -> None:
        try:
            self._sink.write(lines)
        except SinkError:
            self._backfill._seen(False, "")
            raise
        self._backfill._seen(True, lines[0] if lines else "")

    def ping(self) -> bool:
        """The sender's probe while it backs off (without it the probe never saw the server come back)."""
        return self._sink.ping()

    def close(self) -> None:
        self._sink.close()


# --------------------------------------------------------------------------------------------- flux

def flux_tasks(cfg: Config) -> str:
    """InfluxDB 2.x/3.x (Flux tasks, not run here): the same 1 m downsampling into a second bucket."""
    ix = cfg.influxdb
    bucket = ix.bucket or ix.database
    out = [f"// dcmon downsampling for InfluxDB 2.x: create the buckets first, e.g.\n"
           f"//   influx bucket create -n {bucket} -r {round(ix.raw_days)}d\n"
           f"//   influx bucket create -n {bucket}_1m -r {round(ix.minute_days) or 0}d   (0 = forever)\n"
           f"// then: influx task create -f THIS_FILE (one task per block; split the file if your CLI wants one)\n"]
    for m, fields in plan_for(cfg, "").measurements.items():
        flist = " or ".join(f'r._field == "{f}"' for f in fields)
        out.append(f"""import "date"

option task = {{name: "dcmon_{m}_1m", every: 1m, offset: 10s}}

data = from(bucket: "{bucket}")
    |> range(start: -task.every * 2)
    |> filter(fn: (r) => r._measurement == "{m}")

stats = data |> filter(fn: (r) => {flist})
for_agg = (fn, suffix) => stats
    |> aggregateWindow(every: 1m, fn: fn, createEmpty: false)
    |> map(fn: (r) => ({{r with _field: r._field + suffix}}))
union(tables: [for_agg(fn: mean, suffix: "_mean"), for_agg(fn: min, suffix: "_min"), for_agg(fn: max, suffix: "_max")])
    |> to(bucket: "{bucket}_1m")

// energy: each reading's increase (the counter step, or the new count after a reset), summed per minute
data
    |> filter(fn: (r) => r._field == "energy_wh")
    |> duplicate(column: "_value", as: "count")
    |> difference(keepFirst: false)
    |> map(fn: (r) => ({{r with _value: if r._value < 0.0 then r.count else r._value}}))
    |> drop(columns: ["count"])
    |> aggregateWindow(every: 1m, fn: sum, createEmpty: false)
    |> filter(fn: (r) => r._time > date.sub(d: 1m, from: now()))   // the older minute lacks its first step
    |> map(fn: (r) => ({{r with _field: "energy_inc_wh"}}))
    |> to(bucket: "{bucket}_1m")
""")
    stats = " or ".join(f'r._field == "{f}"' for f in BATTERY_STATS)
    last = " or ".join(f'r._field == "{f}"' for f in BATTERY_LAST)
    out.append(f"""// the batteries: mean/min/max of the state of charge, voltage, current and power; the last value of the
// history totals and the state (same field name); unknown_reason stays in the raw bucket
option task = {{name: "dcmon_{BATTERY}_1m", every: 1m, offset: 10s}}

data = from(bucket: "{bucket}")
    |> range(start: -task.every * 2)
    |> filter(fn: (r) => r._measurement == "{BATTERY}")

stats = data |> filter(fn: (r) => {stats})
for_agg = (fn, suffix) => stats
    |> aggregateWindow(every: 1m, fn: fn, createEmpty: false)
    |> map(fn: (r) => ({{r with _field: r._field + suffix}}))
last_values = data
    |> filter(fn: (r) => {last})
    |> aggregateWindow(every: 1m, fn: last, createEmpty: false)
union(tables: [for_agg(fn: mean, suffix: "_mean"), for_agg(fn: min, suffix: "_min"), for_agg(fn: max, suffix: "_max"),
               last_values])
    |> to(bucket: "{bucket}_1m")
""")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ command

def _parse_window(text: str) -> int:
    units = {"m": 60, "h": 3600, "d": 86400}
    try:
        return int(float(text[:-1]) * units[text[-1]] * 1e9)
    except (KeyError, ValueError, IndexError):
        raise ConfigError("command line", "--downsample", f"{text!r} is not a duration",
                          "give minutes, hours or days, e.g. 90m, 12h, 3d") from None


def cmd_influx_setup(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    if args.print_flux:
        print(flux_tasks(cfg))
        return 0
    if cfg.influxdb.api != 1:
        raise ConfigError(cfg.source, "influxdb.api", "influx-setup speaks InfluxDB 1.x only",
                          "on 2.x/3.x set the bucket's retention and create tasks: dcmon influx-setup --print-flux "
                          "(docs/install.md)")
    if args.log_level != "debug":
        logging.getLogger("httpx").setLevel(logging.WARNING)
    with Influx(cfg.influxdb) as api:
        plan = setup(cfg, api)
        if args.downsample:
            end = time.time_ns()
            n = downsample(api, plan, end - _parse_window(args.downsample), end)
            print(f"downsampled the last {args.downsample} again ({n} statements)")
    return 0


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from .helptext import Formatter, examples

    p = sub.add_parser("influx-setup", parents=[common], formatter_class=Formatter,
                       help="create the database, retention policies and downsampling (InfluxDB 1.x; safe to re-run)",
                       description="Create the database, the retention policies (raw readings for influxdb.raw_days, "
                                   "1-minute series for minute_days, 1-hour series for hour_days) and the continuous "
                                   "queries that downsample into them, then downsample what is already stored. Safe to "
                                   "run again: it changes only what differs and says what it changed.",
                       epilog=examples("dcmon influx-setup",
                                       "dcmon influx-setup --downsample 3d     # redo the last 3 days' series by hand",
                                       "dcmon influx-setup --print-flux       # the InfluxDB 2.x equivalent, changing nothing"))
    p.add_argument("--downsample", metavar="WINDOW", default=None,
                   help="also redo the 1-minute and 1-hour series of the last WINDOW (e.g. 6h, 3d) from the raw data")
    p.add_argument("--print-flux", action="store_true",
                   help="print the InfluxDB 2.x equivalent (Flux tasks) instead, and change nothing")
    p.set_defaults(func=cmd_influx_setup)
