"""The HTTP output: a small server in the poller process (off by default) for Prometheus and for a phone.

    /metrics   Prometheus text format (prometheus_client, a private registry with a custom collector)
    /status    the JSON of `dcmon status --json` (the poller's status dict), secrets filtered out
    /healthz   200 "ok" when every loop progressed recently, else 503 (no login needed: it says nothing else)
    /          one small page (no build step, nothing from the internet) that updates live from
    /events    server-sent events: a snapshot of every meter at most 4 times a second (unnamed events), and
               each battery's state as its own ``battery`` event when it changed
    /state     the same snapshot with every battery in it, as one JSON document (the page's polling fallback)

Decisions:
- The feeding side (``on_reading``, ``meter_state``) only stores into memory under a lock and sets an event:
  no I/O, no per-client work, so a slow or stalled client can never stall a bus. One broadcaster thread makes
  each snapshot once and appends it to every SSE client's bounded queue (drop-oldest); each client's own
  thread writes it out, with a write timeout after which the client is dropped.
- Batteries (``on_battery``): the newest ``BatteryState`` per battery is kept as it came (a frozen dataclass:
  no copy, no conversion on the bus thread). The page's battery object is ``BatteryService.status()``'s entry
  for it (the same keys and values; None is null, never 0) plus what the HTTP output knows: ``sensors``,
  ``down_sensors`` (its meters whose last poll failed), ``updated_ns`` (when the state came) and ``stale``.
  A battery event replaces the same battery's event still queued for a client (the newest state is all a
  client needs), and a full queue drops the oldest meter snapshot before any battery event.
- A meter that is down has ``dcmon_up 0`` and no value series at all (absent, not stale).
- Energy is the meter's own counter as ``dcmon_energy_joules_total`` (Wh × 3600: promtool rejects "hours" as
  a unit, joules are Prometheus' base unit for energy). A counter may reset, and Prometheus' rate()/increase()
  treat a drop as a reset, which is exactly what a meter's reset is.
- "Energy today" on the page: the sum of the counter's non-negative steps since local midnight (a reset adds
  the new count), kept in memory. Until the first midnight after the poller started it is "since HH:MM"
  (the start), and the page says so.
- Basic auth (username + a PBKDF2-SHA256 hash in Django's format, made by `dcmon http-password`) guards every
  path except /healthz. A login checked once is remembered in memory (as a SHA-256 of the header), failed
  checks are serialised and slowed, so a guessing client costs one PBKDF2 a second at most.
- Keys named like token/password/secret are replaced by "<redacted>" in /status, and user:password@ in URLs.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import collections
import difflib
import getpass
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass, field, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from .. import __version__
from ..errors import ConfigError, DcmonError
from ..reading import Reading
from .base import Output, OutputContext

if TYPE_CHECKING:
    from ..battery import BatterySettings, BatteryState
    from ..config import Config

log = logging.getLogger("dcmon.http")

DEFAULT_PORT = 9917
DEFAULT_ITERATIONS = 100_000      # about 0.1 s on a Pi 4, under 1 s on a Pi Zero; checked once per login
MAX_CONNECTIONS = 96              # a thread each: bounded, for a Pi Zero
MAX_SSE_CLIENTS = 64
SSE_QUEUE = 8                     # messages queued per client; the oldest is dropped beyond that
SSE_WRITE_TIMEOUT_S = 20.0        # a client that takes no bytes for this long is dropped
SSE_SNDBUF = 32 * 1024
SNAPSHOT_MIN_INTERVAL_S = 0.25    # at most 4 snapshots a second, however many readings come in
SNAPSHOT_MAX_INTERVAL_S = 5.0     # and one at least this often (spool line, heartbeat)
BATTERY_STALE_S = 60.0            # a battery whose state has not come for this long is stale (BatterySettings.max_gap_s)
REQUEST_TIMEOUT_S = 10.0          # to send a request's head
FAILED_LOGIN_DELAY_S = 1.0
HASH_PREFIX = "pbkdf2_sha256"

LABELS = ("host", "sensor", "bus", "model")
SECRET_KEY = re.compile(r"token|passw|secret|api_?key|authori[sz]ation|credential|cookie", re.I)
URL_USERINFO = re.compile(r"(?<=://)[^/@\s:]*:[^/@\s]*@")


# ---------------------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class HttpSettings:
    """The ``[http]`` table."""

    enabled: bool = False
    listen: str = f"127.0.0.1:{DEFAULT_PORT}"
    username: str = ""
    password_hash: str = ""
    page: bool = True
    source: str = field(default="config.toml", compare=False)   # the file it came from, for errors

    KEYS: ClassVar[tuple[str, ...]] = ("enabled", "listen", "username", "password_hash", "page")

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every key with its default (for the docs and the config loader)."""
        d = cls()
        return {k: getattr(d, k) for k in cls.KEYS}

    @property
    def address(self) -> tuple[str, int]:
        return parse_listen(self.listen)

    @property
    def auth(self) -> bool:
        return bool(self.username)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str) -> HttpSettings:
        """Validate the ``[http]`` table (values may also be strings, as from the environment).
        Raises ConfigError naming the file and the key."""
        data = dict(data or {})

        def err(key: str, problem: str, fix: str = "") -> ConfigError:
            return ConfigError(where, f"http.{key}", problem, fix)

        if "password" in data:
            raise err("password", "a plain-text password is not accepted",
                      "put its hash in http.password_hash: make one with `dcmon http-password`")
        for k in data:
            if k not in cls.KEYS:
                near = difflib.get_close_matches(str(k), cls.KEYS, n=1)
                raise err(str(k), "unknown key", f"did you mean http.{near[0]}?" if near else "see docs/http.md")
        d = cls.defaults()

        def flag(key: str) -> bool:
            v = data.get(key, d[key])
            if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                return v.strip().lower() in ("true", "1", "yes", "on")
            if not isinstance(v, bool):
                raise err(key, f"must be true or false, not {v!r}")
            return v

        def text(key: str) -> str:
            v = data.get(key, d[key])
            if not isinstance(v, str):
                raise err(key, f"must be a string, not {v!r}")
            return v.strip()

        listen = text("listen")
        try:
            parse_listen(listen)
        except ValueError as e:
            raise err("listen", str(e), f"e.g. \"127.0.0.1:{DEFAULT_PORT}\" (this machine only) or "
                                        f"\"0.0.0.0:{DEFAULT_PORT}\" (every network it is on)") from None
        username, pw_hash = text("username"), text("password_hash")
        if ":" in username:
            raise err("username", "must not contain ':' (basic auth splits there)")
        if username and not pw_hash:
            raise err("password_hash", "is empty but http.username is set",
                      "make one with `dcmon http-password`, or remove http.username to turn the login off")
        if pw_hash and not username:
            raise err("username", "is empty but http.password_hash is set", "set the user name to log in with")
        if pw_hash:
            try:
                _parse_hash(pw_hash)
            except ValueError as e:
                raise err("password_hash", str(e), "make one with `dcmon http-password`") from None
        return cls(enabled=flag("enabled"), listen=listen, username=username, password_hash=pw_hash,
                   page=flag("page"), source=where)


def parse_listen(text: str) -> tuple[str, int]:
    """``"127.0.0.1:9917"``, ``"[::1]:9917"``, ``"0.0.0.0:9917"``, ``"localhost:9917"`` → (host, port)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not address:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            if ipaddress.ip_address(host).version != 6:
                raise ValueError
        except ValueError:
            raise ValueError(f"{text!r}: [{host}] is not an IPv6 address") from None
    elif host != "localhost":
        try:
            if ipaddress.ip_address(host).version != 4:
                raise ValueError
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv4 address (IPv6 goes in brackets: \"[::1]:port\")") from None
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{text!r}: the port {port_text!r} is not a number") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"{text!r}: the port must be 1 to 65535")
    return host, port


# ---------------------------------------------------------------------------------------- passwords

def hash_password(password: str, *, iterations: int = DEFAULT_ITERATIONS, salt: str | None = None) -> str:
    """``pbkdf2_sha256$<iterations>$<salt>$<base64 of 32 bytes>``: Django's format, stdlib hashlib only."""
    if not password:
        raise ValueError("the password is empty")
    salt = salt or secrets.token_urlsafe(16)
    dk = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), iterations, dklen=32)
    return f"{HASH_PREFIX}${iterations}${salt}${base64.b64encode(dk).decode()}"


def _parse_hash(text: str) -> tuple[int, str, bytes]:
    parts = text.split("$")
    if len(parts) != 4 or parts[0] != HASH_PREFIX:
        raise ValueError(f"is not a {HASH_PREFIX}$iterations$salt$hash string")
    try:
        iterations = int(parts[1])
        digest = base64.b64decode(parts[3], validate=True)
    except (ValueError, binascii.Error):
        raise ValueError(f"is not a {HASH_PREFIX}$iterations$salt$hash string") from None
    if iterations < 1000 or not parts[2] or len(digest) < 16:
        raise ValueError("is too weak (fewer than 1000 iterations, no salt or a short hash)")
    return iterations, parts[2], digest


def verify_password(password: str, encoded: str) -> bool:
    iterations, salt, digest = _parse_hash(encoded)
    got = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), iterations, dklen=len(digest))
    return hmac.compare_digest(got, digest)


# --------------------------------------------------------------------------------------- redaction

def redact(value: Any) -> Any:
    """A copy of a status dict with secrets taken out: values of keys named like token/password/secret,
    and user:password@ in URLs inside any string."""
    if isinstance(value, Mapping):
        return {k: ("<redacted>" if isinstance(k, str) and SECRET_KEY.search(k) and v not in ("", None) else redact(v))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str) and "@" in value:
        return URL_USERINFO.sub("<redacted>@", value)
    return value


# ------------------------------------------------------------------------------------------- state

@dataclass
class _Meter:
    """What the output keeps per meter: its labels, up/down, the latest fields, energy today."""

    sensor: str
    labels: dict[str, str]
    up: bool | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)
    time_ns: int = 0
    kind: str = ""
    day: tuple[int, int, int] | None = None   # the local date energy today counts in
    today_wh: float = 0.0
    since_midnight: bool = False              # False: counting since the poller started (since_ns)
    since_ns: int = 0
    last_energy: float | None = None
    reported: bool = False                    # meter_state() was called for it (else: the status dict's "up")


def _labels_from(tags: Mapping[str, str], sensor: str, host: str) -> dict[str, str]:
    return {"host": str(tags.get("host") or host), "sensor": sensor, "bus": str(tags.get("bus", "")),
            "model": str(tags.get("model", ""))}


def _local_day(time_ns: int) -> tuple[int, int, int]:
    t = time.localtime(time_ns / 1e9)
    return t.tm_year, t.tm_mon, t.tm_mday


class _Store:
    """The latest values, under one lock. Writers: the poller's threads. Readers: scrapes and snapshots."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.lock = threading.Lock()
        self.meters: dict[str, _Meter] = {}
        self.batteries: dict[str, tuple[BatteryState, int]] = {}   # name → (its newest state, wall ns it came)
        self.version = 0

    def put(self, r: Reading) -> None:
        sensor = r.sensor or str(r.tags.get("sensor", ""))
        energy = r.fields.get("energy_wh")
        with self.lock:
            m = self.meters.get(sensor)
            if m is None:
                m = self.meters[sensor] = _Meter(sensor, _labels_from(r.tags, sensor, self.host))
            m.up, m.fields, m.time_ns = True, r.fields, r.time_ns
            m.kind = "ac" if "frequency_hz" in r.fields else "dc"
            if isinstance(energy, (int, float)) and not isinstance(energy, bool):
                self._count_energy(m, float(energy), r.time_ns)
            self.version += 1

    @staticmethod
    def _count_energy(m: _Meter, energy: float, time_ns: int) -> None:
        day = _local_day(time_ns)
        if m.day is None:                       # first reading since start: "since HH:MM"
            m.day, m.since_ns, m.today_wh = day, time_ns, 0.0
        elif day != m.day:                      # local midnight passed since the previous reading
            m.day, m.since_midnight, m.today_wh = day, True, 0.0
        elif m.last_energy is not None:
            m.today_wh += energy - m.last_energy if energy >= m.last_energy else energy   # a reset counts from 0
        m.last_energy = energy

    def state(self, sensor: str, up: bool, labels: Mapping[str, str]) -> None:
        with self.lock:
            m = self.meters.get(sensor)
            if m is None:
                m = self.meters[sensor] = _Meter(sensor, _labels_from(labels, sensor, self.host))
            else:
                for k in LABELS:
                    if labels.get(k) and k != "sensor":
                        m.labels[k] = str(labels[k])
            m.up, m.reported = bool(up), True
            self.version += 1

    def battery(self, st: BatteryState) -> None:
        with self.lock:
            self.batteries[st.name] = (st, time.time_ns())
            self.version += 1

    def copy(self) -> list[_Meter]:
        """Shallow copies (the fields dicts are never changed after a reading is made)."""
        with self.lock:
            return [_Meter(**vars(m)) for m in self.meters.values()]

    def copy_batteries(self) -> tuple[dict[str, tuple[BatteryState, int]], dict[str, bool | None]]:
        """The batteries' newest states (immutable: shared, not copied) and every meter's up/down."""
        with self.lock:
            return dict(self.batteries), {name: m.up for name, m in self.meters.items()}


# ----------------------------------------------------------------------------------------- metrics

# reading field → (metric name, help); gauges
VALUE_METRICS = {
    "voltage_v": ("dcmon_voltage_volts", "Voltage the meter measured."),
    "current_a": ("dcmon_current_amperes", "Current the meter measured."),
    "power_w": ("dcmon_power_watts", "Power the meter measured."),
    "frequency_hz": ("dcmon_frequency_hertz", "AC frequency the meter measured."),
    "power_factor": ("dcmon_power_factor_ratio", "AC power factor the meter measured (0 to 1)."),
}
ENERGY = ("dcmon_energy_joules", "The meter's energy counter in joules (Wh x 3600; a drop is a reset of the meter's counter).")
JOULES_PER_WH = 3600.0


def _sensors_of(st: Mapping[str, Any]) -> Mapping[str, Any]:
    v = st.get("sensors")
    return v if isinstance(v, Mapping) else {}


def _with_status(meters: list[_Meter], sensors: Mapping[str, Any], host: str) -> list[_Meter]:
    """Meters the output has not been told about yet come from the status dict (labels, up); a meter whose
    up/down was never reported through meter_state() is down when the status says so."""
    known = {m.sensor: m for m in meters}
    for name, s in sensors.items():
        if not isinstance(s, Mapping):
            continue
        up = s.get("up") if isinstance(s.get("up"), bool) else None
        m = known.get(name)
        if m is None:
            meters.append(_Meter(name, _labels_from(s, name, host), up=up))
        elif not m.reported and up is False:
            m.up = False
    return meters


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


class DcmonCollector:
    """Yields metric families from the stored latest values and the poller's status dict at scrape time."""

    def __init__(self, store: _Store, status: Callable[[], dict]) -> None:
        self.store, self.status = store, status

    def collect(self) -> Iterator[Metric]:
        meters = self.store.copy()
        try:
            st = self.status() or {}
        except Exception as e:   # noqa: BLE001 - a failing status callable must not break the readings' metrics
            log.warning("http: status() failed: %s", e)
            st = {}
        sensors = _sensors_of(st)
        meters = _with_status(meters, sensors, self.store.host)
        yield from self._values(meters)
        yield from self._health(meters, st, sensors)

    def _values(self, meters: list[_Meter]) -> Iterator[Metric]:
        up = GaugeMetricFamily("dcmon_up", "1 when the meter answered its last poll, 0 when it did not.", labels=LABELS)
        fams = {k: GaugeMetricFamily(n, h, labels=LABELS) for k, (n, h) in VALUE_METRICS.items()}
        energy = CounterMetricFamily(*ENERGY, labels=LABELS)
        alarm = GaugeMetricFamily("dcmon_alarm", "1 while the meter's alarm is on.", labels=(*LABELS, "alarm"))
        last = GaugeMetricFamily("dcmon_last_reading_timestamp_seconds", "When the meter's latest reading was taken.",
                                 labels=LABELS)
        for m in meters:
            if m.up is None:
                continue
            lv = [m.labels.get(k, "") for k in LABELS]
            up.add_metric(lv, 1.0 if m.up else 0.0)
            if not m.up or not m.fields:
                continue                            # down: its value series are absent, not stale
            for k, v in m.fields.items():
                x = _num(v)
                if k in fams and x is not None:
                    fams[k].add_metric(lv, x)
                elif k == "energy_wh" and x is not None:
                    energy.add_metric(lv, x * JOULES_PER_WH)
                elif k.endswith("_alarm") and isinstance(v, bool):
                    alarm.add_metric([*lv, k[:-len("_alarm")]], 1.0 if v else 0.0)
            last.add_metric(lv, m.time_ns / 1e9)
        yield up
        yield from fams.values()
        yield from (energy, alarm, last)

    def _health(self, meters: list[_Meter], st: Mapping[str, Any], sensors: Mapping[str, Any]) -> Iterator[Metric]:
        host = self.store.host
        by_name = {m.sensor: m for m in meters}
        info = GaugeMetricFamily("dcmon_build_info", "Always 1; the dcmon version in a label.", labels=("host", "version"))
        info.add_metric([host, __version__], 1.0)
        yield info
        cycles = _num(st.get("cycles"))
        if cycles is not None:
            yield CounterMetricFamily("dcmon_poll_cycles", "Bus poll cycles since the poller started.", value=cycles)

        polls = CounterMetricFamily("dcmon_polls", "Polls of the meter since the poller started.", labels=LABELS)
        failures = CounterMetricFamily("dcmon_poll_failures", "Polls the meter did not answer.", labels=LABELS)
        discarded = CounterMetricFamily("dcmon_readings_discarded", "Readings discarded (settling or implausible).",
                                        labels=LABELS)
        latency = GaugeMetricFamily("dcmon_poll_latency_seconds", "Duration of the meter's last successful poll.",
                                    labels=LABELS)
        for name, s in sensors.items():
            if not isinstance(s, Mapping):
                continue
            m = by_name.get(name)
            lv = [(m.labels if m else _labels_from(s, name, host)).get(k, "") for k in LABELS]
            ok, bad = _num(s.get("polls_ok")), _num(s.get("polls_failed"))
            if ok is not None or bad is not None:
                polls.add_metric(lv, (ok or 0.0) + (bad or 0.0))
            if bad is not None:
                failures.add_metric(lv, bad)
            if (x := _num(s.get("discarded"))) is not None:
                discarded.add_metric(lv, x)
            if (x := _num(s.get("latency_ms"))) is not None:
                latency.add_metric(lv, x / 1000.0)
        yield from (polls, failures, discarded, latency)

        buses = st.get("buses")
        if isinstance(buses, Mapping):
            bus_up = GaugeMetricFamily("dcmon_bus_up", "1 when the bus's serial port is open, 0 when it failed.",
                                       labels=("host", "bus"))
            for name, b in buses.items():
                if isinstance(b, Mapping):
                    bus_up.add_metric([host, str(name)], 0.0 if b.get("error") else 1.0)
            yield bus_up
        yield from _output_metrics(host, _outputs_of(st))
        batteries = st.get("batteries")
        if isinstance(batteries, Mapping) and batteries:
            yield from _battery_metrics(host, batteries)


# status.json's "batteries" → metric (unknown values: the series is absent, not 0)
BATTERY_METRICS = {
    "soc_pct": ("dcmon_battery_state_of_charge_ratio", "Estimated state of charge, 0 to 1.", 0.01),
    "time_to_go_s": ("dcmon_battery_time_to_go_seconds", "Estimated time until the discharge floor.", 1.0),
    "current_a": ("dcmon_battery_net_current_amperes", "Net current into the battery (negative: discharging).", 1.0),
    "voltage_v": ("dcmon_battery_voltage_volts", "The battery's voltage.", 1.0),
    "time_since_full_s": ("dcmon_battery_time_since_full_charge_seconds", "Time since the last synchronisation "
                          "to 100 %.", 1.0),
}
# the history's energy totals (only ever grow: dcmon.battery), kWh → J as dcmon_energy_joules_total
BATTERY_COUNTERS = {
    "charged_kwh": ("dcmon_battery_charged_joules", "Energy into the battery since set-up (net flow while charging).",
                    3.6e6),
    "discharged_kwh": ("dcmon_battery_discharged_joules", "Energy out of the battery since set-up (net flow while "
                       "discharging).", 3.6e6),
    "synchronisations": ("dcmon_battery_synchronisations", "Synchronisations to 100 % since set-up.", 1.0),
}


def _battery_metrics(host: str, batteries: Mapping[str, Any]) -> Iterator[Metric]:
    fams: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
        k: GaugeMetricFamily(n, h, labels=("host", "battery")) for k, (n, h, _) in BATTERY_METRICS.items()}
    fams.update({k: CounterMetricFamily(n, h, labels=("host", "battery")) for k, (n, h, _) in BATTERY_COUNTERS.items()})
    factors = {k: f for table in (BATTERY_METRICS, BATTERY_COUNTERS) for k, (_n, _h, f) in table.items()}
    for name, b in batteries.items():
        if not isinstance(b, Mapping):
            continue
        for k, factor in factors.items():
            if (x := _num(b.get(k))) is not None:
                fams[k].add_metric([host, str(name)], x * factor)
    yield from fams.values()


def _outputs_of(st: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-output stats from the status dict, tolerant of its shape: ``outputs`` {name: {...}}, ``spool`` as
    {name: {...}} (one spool per output), or ``spool`` as one flat dict (today's single InfluxDB spool, whose
    sender's counters sit at the top level)."""
    found: dict[str, dict[str, Any]] = {}
    for key in ("spool", "outputs"):
        v = st.get(key)
        if not isinstance(v, Mapping):
            continue
        if v and all(isinstance(x, Mapping) for x in v.values()):
            for name, stats in v.items():
                found.setdefault(str(name), {}).update(stats)
        elif key == "spool":
            flat = found.setdefault("influxdb", {})
            flat.update(v)
            for k in ("sent_points", "send_failures"):
                if k in st:
                    flat.setdefault(k, st[k])
            if st.get("sender_error"):
                flat.setdefault("last_error", st["sender_error"])
    return found


def _output_metrics(host: str, outputs: Mapping[str, Mapping[str, Any]]) -> Iterator[Metric]:
    L = ("host", "output")
    depth = GaugeMetricFamily("dcmon_spool_depth", "Readings queued in the spool for the output.", labels=L)
    size = GaugeMetricFamily("dcmon_spool_size_bytes", "Size of the output's queue in the spool.", labels=L)
    age = GaugeMetricFamily("dcmon_spool_oldest_age_seconds", "Age of the oldest reading queued for the output "
                            "(0 when none).", labels=L)
    dropped = CounterMetricFamily("dcmon_spool_dropped", "Readings dropped (spool cap) or lost (disk errors).", labels=L)
    quarantined = GaugeMetricFamily("dcmon_spool_quarantined", "Readings the output refused, kept aside.", labels=L)
    sent = CounterMetricFamily("dcmon_output_sent_points", "Readings the output delivered.", labels=L)
    failed = CounterMetricFamily("dcmon_output_send_failures", "Failed deliveries.", labels=L)
    ok = GaugeMetricFamily("dcmon_output_ok", "0 while the output reports an error, else 1.", labels=L)
    now_ns = time.time_ns()
    for name, s in outputs.items():
        lv = [host, name]
        if (x := _num(s.get("depth"))) is not None:
            depth.add_metric(lv, x)
        if (x := _num(s.get("bytes"))) is not None:
            size.add_metric(lv, x)
        if (x := _num(s.get("oldest_age_s"))) is not None:
            age.add_metric(lv, x)
        elif "oldest_time_ns" in s:
            x = _num(s.get("oldest_time_ns")) or 0.0
            age.add_metric(lv, max(0.0, (now_ns - x) / 1e9) if x else 0.0)
        lost = [_num(s.get(k)) for k in ("dropped_total", "lost_total")]
        if any(x is not None for x in lost):
            dropped.add_metric(lv, sum(x or 0.0 for x in lost))
        if (x := _num(s.get("quarantined"))) is not None:
            quarantined.add_metric(lv, x)
        if (x := _num(s.get("sent_points"))) is not None:
            sent.add_metric(lv, x)
        if (x := _num(s.get("send_failures"))) is not None:
            failed.add_metric(lv, x)
        ok.add_metric(lv, 0.0 if s.get("last_error") or s.get("connected") is False else 1.0)
    yield from (depth, size, age, dropped, quarantined, sent, failed, ok)


# ---------------------------------------------------------------------------------------- the page

def _outputs_line(st: Mapping[str, Any]) -> str:
    """One line for the page: each output's queue and error."""
    parts = []
    now_ns = time.time_ns()
    for name, s in _outputs_of(st).items():
        text = f"{name}: {int(_num(s.get('depth')) or 0)} queued"
        oldest = _num(s.get("oldest_age_s"))
        if oldest is None and _num(s.get("oldest_time_ns")):
            oldest = max(0.0, (now_ns - (_num(s.get("oldest_time_ns")) or 0.0)) / 1e9)
        if oldest:
            text += f" (oldest {_age_text(oldest)})"
        dropped = (_num(s.get("dropped_total")) or 0) + (_num(s.get("lost_total")) or 0)
        if dropped:
            text += f", {int(dropped)} dropped"
        if s.get("last_error"):
            text += f", error: {str(s['last_error'])[:120]}"
        elif s.get("connected") is False:
            text += ", not connected"
        else:
            text += ", ok"
        parts.append(text)
    return redact("; ".join(parts)) or "no outputs reported"


def _age_text(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def _snapshot(meters: list[_Meter], st: Mapping[str, Any]) -> dict[str, Any]:
    out = []
    for m in sorted(meters, key=lambda m: m.sensor):
        f = m.fields
        row: dict[str, Any] = {"sensor": m.sensor, "bus": m.labels.get("bus", ""), "model": m.labels.get("model", ""),
                               "up": m.up, "time_ns": m.time_ns}
        for k in ("voltage_v", "current_a", "power_w", "energy_wh", "frequency_hz", "power_factor"):
            if (x := _num(f.get(k))) is not None:
                row[k] = x
        row["alarms"] = sorted(k[:-len("_alarm")] for k, v in f.items() if k.endswith("_alarm") and v is True)
        if m.day is not None:
            row["today_wh"] = round(m.today_wh, 3)
            row["today_since"] = "midnight" if m.since_midnight else time.strftime("%H:%M", time.localtime(m.since_ns / 1e9))
        out.append(row)
    return {"time": time.time(), "meters": out, "outputs": _outputs_line(st)}


@dataclass(frozen=True)
class _BatteryInfo:
    """What the HTTP output knows of a configured battery (from its ``[[batteries]]`` table)."""

    sensors: tuple[str, ...]
    stale_after_s: float
    settings: BatterySettings

    @classmethod
    def of(cls, s: BatterySettings, interval_s: float) -> _BatteryInfo:
        return cls(tuple(s.sensors), s.stale_after_s(interval_s), s)


def _batteries(states: Mapping[str, tuple[BatteryState, int]], up: Mapping[str, bool | None],
               info: Mapping[str, _BatteryInfo], st: Mapping[str, Any], now_ns: int) -> list[dict[str, Any]]:
    """Every battery for the page: its status.json entry, overridden by the newest state from on_battery
    (newer), plus ``sensors``, ``down_sensors``, ``updated_ns`` (None: no state came yet), ``reason`` (the
    unknown_reason, short) and ``stale``."""
    from_status = st.get("batteries")
    from_status = from_status if isinstance(from_status, Mapping) else {}
    names = sorted({*info, *states, *(str(k) for k, v in from_status.items() if isinstance(v, Mapping))})
    if not names:
        return []
    from ..battery import BatteryState
    from ..battery_service import settings_entry, short_reason, status_entry

    blank = dict.fromkeys((f.name for f in fields(BatteryState)), None)   # the same keys, always
    out = []
    for name in names:
        i = info.get(name)
        b: dict[str, Any] = {**blank, "name": name, "status": "unknown", "unknown_reason": "no reading yet",
                             "stale_sensors": list(i.sensors) if i is not None else []}
        b.update(from_status.get(name) or {})
        got = states.get(name)
        if got is not None:
            b.update(status_entry(got[0]))
        if i is not None:
            for k, v in settings_entry(i.settings).items():
                b.setdefault(k, v)
        sensors = list(i.sensors) if i is not None else sorted(set(b.get("stale_sensors") or []))
        down = [s for s in sensors if up.get(s) is False]
        stale_after = i.stale_after_s if i is not None else BATTERY_STALE_S
        b["sensors"], b["down_sensors"] = sensors, down
        b["updated_ns"] = got[1] if got is not None else None
        reason = str(b.get("unknown_reason") or "")
        b["reason"] = short_reason(name, reason) if reason else ""
        b["stale"] = bool(b.get("stale_sensors") or down or got is None
                          or (now_ns - got[1]) / 1e9 > stale_after)
        out.append(b)
    return out


def _page_html() -> bytes:
    return resources.files("dcmon.outputs").joinpath("http_page.html").read_bytes()


# ---------------------------------------------------------------------------------------- SSE clients

class _Client:
    """One SSE connection's bounded queue (drop-oldest). A message with a ``key`` (a battery's event)
    replaces the one with the same key still queued, and a full queue drops its oldest message without a
    key (a meter snapshot, which the next one supersedes) before any keyed one."""

    def __init__(self) -> None:
        self.queue: collections.deque[tuple[str, bytes]] = collections.deque()
        self.cv = threading.Condition()
        self.closed = False
        self.dropped = 0

    def push(self, msg: bytes, key: str = "") -> None:
        with self.cv:
            q = self.queue
            if key:
                for i, (k, _) in enumerate(q):
                    if k == key:
                        del q[i]
                        break
            if len(q) >= SSE_QUEUE:
                self.dropped += 1
                for i, (k, _) in enumerate(q):
                    if not k:
                        del q[i]
                        break
                else:
                    q.popleft()
            q.append((key, msg))
            self.cv.notify()

    def take(self, timeout: float) -> list[bytes]:
        with self.cv:
            if not self.queue and not self.closed:
                self.cv.wait(timeout)
            items = [m for _, m in self.queue]
            self.queue.clear()
            return items

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify()


# ------------------------------------------------------------------------------------------ server

class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    output: HttpOutput

    def __init__(self, addr: tuple[str, int], output: HttpOutput) -> None:
        self.output = output
        self._active = 0
        self._active_lock = threading.Lock()
        host = addr[0]
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__(addr, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._active_lock:
            full = self._active >= MAX_CONNECTIONS
            if not full:
                self._active += 1
        if full:
            log.debug("http: %d connections open: refusing %s", MAX_CONNECTIONS, client_address)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._active_lock:
                self._active -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        e = sys.exc_info()[1]
        log.debug("http: %s: %s", client_address, e)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = REQUEST_TIMEOUT_S
    protocol_version = "HTTP/1.1"
    server_version = f"dcmon/{__version__}"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:   # noqa: A002 - the base class's name
        log.debug("http: %s %s", self.address_string(), format % args)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        out = self.server.output
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            try:
                ok = bool(out.healthy())
            except Exception as e:   # noqa: BLE001 - a broken check is "not healthy", said once per request
                log.warning("http: healthy() failed: %s", e)
                ok = False
            return self._send(200 if ok else 503, b"ok\n" if ok else b"unhealthy\n", "text/plain; charset=utf-8")
        if not out.authorized(self.headers.get("Authorization")):
            return self._send(401, b"login required\n", "text/plain; charset=utf-8",
                              {"WWW-Authenticate": 'Basic realm="dcmon", charset="UTF-8"'})
        if path == "/metrics":
            encoder, ctype = choose_encoder(self.headers.get("Accept", ""))
            return self._send(200, encoder(out.registry), ctype)
        if path == "/status":
            return self._send(200, json.dumps(out.status_json(), indent=2, default=str).encode(), "application/json")
        if path == "/state":
            return self._send(200, json.dumps(out.snapshot(), default=str).encode(), "application/json")
        if path == "/events":
            return self._events()
        if path in ("/", "/index.html") and out.settings.page:
            return self._send(200, out.page, "text/html; charset=utf-8")
        return self._send(404, b"not found\n", "text/plain; charset=utf-8")

    def _send(self, code: int, body: bytes, ctype: str, headers: Mapping[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _events(self) -> None:
        out = self.server.output
        client = out.add_client()
        if client is None:
            return self._send(503, b"too many live clients\n", "text/plain; charset=utf-8", {"Retry-After": "10"})
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Accel-Buffering", "no")
            self.end_headers()
            self.close_connection = True
            if self.command == "HEAD":
                return
            self.connection.settimeout(SSE_WRITE_TIMEOUT_S)
            # a small kernel buffer: a client that stops reading holds little memory and is noticed sooner
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SSE_SNDBUF)
            self.wfile.write(b"retry: 3000\n" + _sse(out.snapshot(batteries=False))
                             + b"".join(_sse(b, "battery") for b in out.batteries()))
            while not client.closed:
                for msg in client.take(1.0):
                    self.wfile.write(msg)
        except OSError as e:        # the client went away, or stopped reading for SSE_WRITE_TIMEOUT_S
            log.debug("http: live client %s left: %s", self.address_string(), e)
        finally:
            out.remove_client(client)


def _sse(data: Mapping[str, Any], event: str = "") -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + json.dumps(data, default=str, separators=(",", ":")).encode() + b"\n\n"


# ------------------------------------------------------------------------------------------ output

class HttpOutput:
    """The server, in the poller's process. ``on_reading``, ``meter_state`` and ``on_battery`` only store into memory."""

    def __init__(self, settings: HttpSettings, *, status: Callable[[], dict], healthy: Callable[[], bool],
                 host: str | None = None, batteries: Iterable[BatterySettings] = (), interval_s: float = 5.0) -> None:
        """``batteries``: the ``[[batteries]]`` tables (their meters, for "stale"/DOWN on the page); a battery
        not listed still shows, from on_battery and status.json, stale only by age."""
        self.settings = settings
        self.status = status
        self.healthy = healthy
        self._store = _Store(host or socket.gethostname())
        self._battery_info = {b.name: _BatteryInfo.of(b, interval_s) for b in batteries}
        self._battery_sent: dict[str, bytes] = {}   # the broadcaster's last battery event per battery
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(DcmonCollector(self._store, self._safe_status))
        ProcessCollector(registry=self.registry)
        self.page = _page_html() if settings.page else b""
        self._clients: set[_Client] = set()
        self._clients_lock = threading.Lock()
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._status_error = ""
        self._login_ok: set[bytes] = set()
        self._login_lock = threading.Lock()
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ the feeding side (never blocks)
    def on_reading(self, reading: Reading) -> None:
        """Keep the reading as its meter's latest (and mark the meter up)."""
        self._store.put(reading)
        self._changed.set()

    def meter_state(self, sensor: str, up: bool, labels: Mapping[str, str]) -> None:
        """After every poll of a meter: ``up`` False hides its value series (``dcmon_up 0``). ``labels``:
        host, bus, model (as the reading's tags)."""
        self._store.state(sensor, up, labels)
        self._changed.set()

    def on_battery(self, state: BatteryState) -> None:
        """A battery monitor's new state: kept as the battery's newest (the object itself: it is frozen)."""
        self._store.battery(state)
        self._changed.set()

    # ------------------------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        if self._server is None:
            return ""
        addr, port = self._server.server_address[:2]
        host = addr.decode() if isinstance(addr, bytes) else str(addr)
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> HttpOutput:
        host, port = self.settings.address
        try:
            self._server = _Server((host, port), self)
        except OSError as e:
            raise ConfigError(self.settings.source, "http.listen", f"cannot listen on {self.settings.listen}: "
                              f"{e.strerror or e}", "choose another port, or stop the program that uses it") from None
        self._threads = [threading.Thread(target=self._serve, name="http", daemon=True),
                         threading.Thread(target=self._broadcast, name="http live", daemon=True)]
        for t in self._threads:
            t.start()
        log.info("http: serving /metrics%s on %s%s", " and the page" if self.settings.page else "", self.url,
                 " (login required)" if self.settings.auth else "")
        return self

    def close(self) -> None:
        self._stop.set()
        self._changed.set()
        with self._clients_lock:
            for c in self._clients:
                c.close()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for t in self._threads:
            t.join(timeout=5.0)
        self._server = None

    def __enter__(self) -> HttpOutput:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _serve(self) -> None:
        assert self._server is not None
        try:
            self._server.serve_forever(poll_interval=0.5)
        except Exception as e:   # noqa: BLE001 - the thread's guard: say it, the poller carries on
            log.error("http: the server stopped: %s", e)

    def _broadcast(self) -> None:
        """One snapshot for all live clients, at most every SNAPSHOT_MIN_INTERVAL_S."""
        while not self._stop.is_set():
            self._changed.wait(SNAPSHOT_MAX_INTERVAL_S)
            if self._stop.is_set():
                return
            self._changed.clear()
            try:
                with self._clients_lock:
                    clients = list(self._clients)
                if clients:
                    st = self._safe_status()
                    msg = _sse(self._meters_snapshot(st))
                    events = []
                    for b in self._batteries_now(st):   # only those that changed since the last round
                        ev = _sse(b, "battery")
                        if self._battery_sent.get(b["name"]) != ev:
                            self._battery_sent[b["name"]] = ev
                            events.append(("battery:" + b["name"], ev))
                    for c in clients:
                        c.push(msg)
                        for key, ev in events:
                            c.push(ev, key)
            except Exception as e:   # noqa: BLE001 - the thread's guard
                log.warning("http: live update failed: %s", e)
            self._stop.wait(SNAPSHOT_MIN_INTERVAL_S)

    # ------------------------------------------------------------------------------------- serving
    def _safe_status(self) -> dict:
        try:
            st = self.status()
        except Exception as e:   # noqa: BLE001 - one line (once per different error), the rest still works
            if str(e) != self._status_error:
                log.warning("http: status() failed: %s", e)
                self._status_error = str(e)
            return {}
        self._status_error = ""
        return st if isinstance(st, dict) else {}

    def status_json(self) -> Any:
        return redact(self._safe_status())

    def snapshot(self, batteries: bool = True) -> dict[str, Any]:
        """What /state serves: every meter, the outputs' line and (``batteries``) every battery."""
        st = self._safe_status()
        snap = self._meters_snapshot(st)
        if batteries:
            snap["batteries"] = self._batteries_now(st)
        return snap

    def batteries(self) -> list[dict[str, Any]]:
        """Every battery as the page shows it (see ``_batteries``)."""
        return self._batteries_now(self._safe_status())

    def _meters_snapshot(self, st: Mapping[str, Any]) -> dict[str, Any]:
        return _snapshot(_with_status(self._store.copy(), _sensors_of(st), self._store.host), st)

    def _batteries_now(self, st: Mapping[str, Any]) -> list[dict[str, Any]]:
        states, up = self._store.copy_batteries()
        for name, s in _sensors_of(st).items():   # meters not reported through meter_state() yet
            if isinstance(s, Mapping) and isinstance(s.get("up"), bool):
                up.setdefault(str(name), s["up"])
        return _batteries(states, up, self._battery_info, st, time.time_ns())

    def add_client(self) -> _Client | None:
        with self._clients_lock:
            if len(self._clients) >= MAX_SSE_CLIENTS or self._stop.is_set():
                return None
            c = _Client()
            self._clients.add(c)
            return c

    def remove_client(self, c: _Client) -> None:
        with self._clients_lock:
            self._clients.discard(c)

    @property
    def live_clients(self) -> int:
        with self._clients_lock:
            return len(self._clients)

    def authorized(self, header: str | None) -> bool:
        s = self.settings
        if not s.auth:
            return True
        if not header or not header.startswith("Basic "):
            return False
        key = hashlib.sha256(header.encode()).digest()
        if key in self._login_ok:
            return True
        try:
            user, sep, password = base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")
        except (ValueError, binascii.Error, UnicodeDecodeError):
            return False
        with self._login_lock:   # one check at a time, and a failed one holds the lock a while
            ok = hmac.compare_digest(user.encode(), s.username.encode()) & verify_password(password, s.password_hash)
            if not ok:
                log.warning("http: failed login as %r", user[:64])
                time.sleep(FAILED_LOGIN_DELAY_S)
                return False
            if len(self._login_ok) >= 32:
                self._login_ok.clear()
            self._login_ok.add(key)
        return True


# ---------------------------------------------------------------------------------------- command

def cmd_http_password(args: argparse.Namespace) -> int:
    """Ask for a password (twice, on a terminal; else one line from stdin) and print its hash."""
    if sys.stdin.isatty():
        pw = getpass.getpass("password for the page and /metrics: ")
        if getpass.getpass("again: ") != pw:
            raise DcmonError("the two passwords differ; nothing printed")
    else:
        pw = sys.stdin.readline().rstrip("\r\n")
    if not pw:
        raise DcmonError("the password is empty; nothing printed")
    if args.iterations < 1000:
        raise DcmonError("--iterations must be at least 1000")
    print(f'password_hash = "{hash_password(pw, iterations=args.iterations)}"')
    return 0


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from ..helptext import Formatter, examples

    p = sub.add_parser("http-password", parents=[common], formatter_class=Formatter,
                       help="make an http.password_hash (the login for the page and /metrics)",
                       description="Ask for a password (twice on a terminal, or one line on standard input) and print "
                                   "its PBKDF2-SHA256 hash for http.password_hash. The password itself is never "
                                   "stored or printed.",
                       epilog=examples("dcmon http-password",
                                       "dcmon http-password --iterations 200000    # slower to guess, slower to check"))
    p.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS,
                   help=f"PBKDF2 iterations (default {DEFAULT_ITERATIONS})")
    p.set_defaults(func=cmd_http_password)


# ------------------------------------------------------------------------------------------- the output

class HttpService(Output):
    """The HTTP endpoint as one of the service's outputs (live only: nothing to spool)."""

    name = "http"

    def __init__(self, settings: HttpSettings, ctx: OutputContext, host: str,
                 batteries: Iterable[BatterySettings] = (), interval_s: float = 5.0) -> None:
        self.server = HttpOutput(settings, status=ctx.status, healthy=ctx.healthy, host=host,
                                 batteries=batteries, interval_s=interval_s)

    def start(self) -> None:
        self.server.start()   # a port that cannot be had: ConfigError naming http.listen, before any poll

    def on_reading(self, reading: Reading) -> None:
        self.server.on_reading(reading)

    def meter_state(self, sensor: str, up: bool, labels: Mapping[str, str]) -> None:
        self.server.meter_state(sensor, up, labels)

    def on_battery(self, state: BatteryState) -> None:
        self.server.on_battery(state)

    def status(self) -> dict[str, object]:
        return {"url": self.server.url, "clients": self.server.live_clients}

    def close(self) -> None:
        self.server.close()


def from_config(cfg: Config, ctx: OutputContext) -> Output | None:
    if not cfg.http.enabled:
        return None
    settings = cfg.http.settings
    if settings is None:   # a Config made without load(): validate here
        from ..config import table_values

        settings = HttpSettings.from_dict(table_values(cfg.http), cfg.source)
    return HttpService(settings, ctx, cfg.host, cfg.batteries, cfg.poller.interval_s)
