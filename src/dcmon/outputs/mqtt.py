"""MQTT output with Home Assistant discovery (paho-mqtt 2.x, MQTT 3.1.1).

Topics (``<p>`` = ``mqtt.topic_prefix``, ``<h>`` = the host, ``<s>`` = the sensor; names outside
``[A-Za-z0-9_-]`` become ``_``):

    <p>/<h>/status                  online / offline, retained; "offline" is also the last will
    <p>/<h>/<s>/availability        online / offline, retained: does the meter answer?
    <p>/<h>/<s>/state               newest reading as JSON (retained when mqtt.retain_state)
    <p>/<h>/<s>/reading             opt-in stream: every reading, QoS 1, in order, at least once
    <p>/<h>/battery/<b>/state       a battery monitor's newest state as JSON (``<b>`` = the battery; unknown = null)
    <p>/<h>/battery/<b>/availability  online / offline, retained: are all its meters read?
    <d>/sensor/dcmon_<h>/<s>_<field>/config          Home Assistant discovery (``<d>`` = discovery_prefix)
    <d>/binary_sensor/dcmon_<h>/<s>_<alarm>/config   alarms
    <d>/sensor/dcmon_<h>/_battery_<b>_<value>/config a battery's entities
    <d>/binary_sensor/dcmon_<h>/poller/config        the poller's own device (connectivity)

A battery's topics have one level more than a meter's, and its discovery object ids start with ``_`` (which
no sensor's slug does), so a sensor named "battery" cannot collide with them.

Two kinds of delivery, because Home Assistant and a database want different things after an outage:
- ``publish_state(reading)`` never blocks and never queues history: it keeps the newest reading per meter
  and a publisher thread sends it when connected, with at most one state message per meter in flight.
  After a broker outage only the newest state per meter goes out (plus, at most, the one that was in
  flight when the connection dropped, which paho re-sends first). ``publish_battery(state)`` does the same
  for each battery monitor's state (``[[batteries]]``).
- ``flush()`` (``dcmon run --once``) waits, up to ``mqtt.timeout_s``, for the connection and for everything
  pending to be acknowledged (QoS 1) or written (QoS 0).
- ``send_batch(lines)`` (alias ``write``, the InfluxSink contract the sender drives) publishes every line
  of a spool batch on ``.../reading`` at QoS 1 and returns once the broker acknowledged all of them, or
  raises SinkRetryable (not connected, no PUBACK within ``mqtt.timeout_s``) / SinkAuth (the broker refused
  the credentials) / SinkPermanent (a line that is not line protocol). A failed batch is re-sent by the
  sender: consumers see every reading at least once, the first copies in order.

Discovery is re-announced on every (re)connect and when Home Assistant's birth message
(``<d>/status`` = online, not retained) arrives. The set of announced entities is read back from the
broker: at start-up the output subscribes to its own discovery topics, and every retained config there
that it would not announce now (a meter that left the config, ``discovery = false``) is cleared with an
empty retained message, which makes Home Assistant remove the entity. The retained state and availability
topics that entity named (and no entity announced now uses) are cleared the same way, so nothing of a
removed meter or battery is left on the broker.

The password never appears in a log line, an error or ``repr(settings)``.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Generic, Iterable, Mapping, Sequence, TypeVar
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from .. import __version__
from ..errors import ConfigError, SinkAuth, SinkError, SinkPermanent, SinkRetryable
from ..battery_service import FIELDS, influx_fields
from ..models import Model, decimals
from ..reading import FieldScalar, Reading
from .base import Output, OutputContext

if TYPE_CHECKING:
    from ..battery import BatterySettings, BatteryState
    from ..config import Config

log = logging.getLogger(__name__)

ONLINE, OFFLINE = "online", "offline"
MANUFACTURER = "Peacefair"           # maker of the PZEM meters
READING_MEASUREMENTS = ("dc_power", "ac_power")  # the config's defaults; health points are not streamed
_IDLE_S = 5.0                        # the publisher thread looks around this often without a wake-up

# ------------------------------------------------------------------------------------------ settings

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


@dataclass(frozen=True)
class MqttSettings:
    """The ``[mqtt]`` section. ``from_dict`` validates it; the password is read from ``password_file``
    there (first line) when not given directly."""

    enabled: bool = False
    url: str = "mqtt://localhost:1883"
    username: str = ""
    password: str = field(default="", repr=False)
    password_file: str = ""
    client_id: str = ""              # "" = dcmon-<host>
    ca_file: str = ""                # mqtts: the CA that signed the broker's certificate ("" = the system's)
    certfile: str = ""               # mqtts: a client certificate, if the broker asks for one
    keyfile: str = ""
    qos: int = 1                     # state, availability and discovery; the stream is always QoS 1
    topic_prefix: str = "dcmon"
    discovery: bool = True
    discovery_prefix: str = "homeassistant"
    retain_state: bool = True
    stream: bool = False             # also publish every reading from the spool on .../reading
    timeout_s: float = 10.0          # how long to wait for the broker's acknowledgement of a message
    source: str = field(default="", compare=False)  # the file the settings came from (for errors)

    KEYS = ("enabled", "url", "username", "password", "password_file", "client_id", "ca_file", "certfile",
            "keyfile", "qos", "topic_prefix", "discovery", "discovery_prefix", "retain_state", "stream",
            "timeout_s")

    @property
    def tls(self) -> bool:
        return self.url.startswith("mqtts://")

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (8883 if self.tls else 1883)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every key with its default (for docs and the config loader)."""
        d = cls()
        return {k: getattr(d, k) for k in cls.KEYS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str, *,
                  base_dir: str | Path | None = None) -> MqttSettings:
        """Validate the ``[mqtt]`` table (values may also be strings, as from the environment). Relative
        file names are relative to ``base_dir`` (default: the folder of ``where``). Raises ConfigError."""
        data = dict(data or {})
        base = Path(base_dir) if base_dir is not None else Path(where).resolve().parent
        for k in data:
            if k not in cls.KEYS:
                near = difflib.get_close_matches(str(k), cls.KEYS, n=1)
                raise ConfigError(where, f"mqtt.{k}", "unknown key",
                                  f"did you mean mqtt.{near[0]}?" if near else "see docs/home-assistant.md")
        d = cls.defaults()

        def err(key: str, problem: str, fix: str = "") -> ConfigError:
            return ConfigError(where, f"mqtt.{key}", problem, fix)

        def text(key: str) -> str:
            v = data.get(key, d[key])
            if not isinstance(v, str):
                raise err(key, f"must be a string, not {type(v).__name__}", 'put it in quotes')
            return v.strip()

        def flag(key: str) -> bool:
            v = data.get(key, d[key])
            if isinstance(v, bool):
                return v
            if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
                return v.strip().lower() in _TRUE
            raise err(key, f"must be true or false (got {v!r})")

        def prefix(key: str) -> str:
            v = text(key)
            if not v or v.startswith("/") or v.endswith("/") or "//" in v or set(v) & {"+", "#", "\0"}:
                raise err(key, f"{v!r} is not a usable topic prefix",
                          "use levels of letters, digits, '_' or '-', separated by '/', e.g. \"dcmon\"")
            return v

        def path(key: str, value: str) -> str:
            if not value:
                return ""
            p = Path(value).expanduser()
            p = p if p.is_absolute() else base / p
            if not p.is_file():
                raise err(key, f"{p} does not exist", "give the path of the PEM file")
            return str(p)

        out: dict[str, Any] = {"source": where}
        out["enabled"] = flag("enabled")
        out["discovery"] = flag("discovery")
        out["retain_state"] = flag("retain_state")
        out["stream"] = flag("stream")

        url = text("url")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise err("url", "has an invalid port", "e.g. mqtt://192.168.1.10:1883") from None
        if "@" in parts.netloc:  # never echo it: it holds a password
            raise err("url", "must not contain a user name or password",
                      "put the user in mqtt.username and the password in mqtt.password_file")
        if parts.scheme not in ("mqtt", "mqtts"):
            raise err("url", f"{url!r} must start with mqtt:// or mqtts:// (TLS)", "e.g. mqtt://192.168.1.10:1883")
        if not parts.hostname:
            raise err("url", f"{url!r} has no host name", "e.g. mqtt://192.168.1.10:1883")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise err("url", f"{url!r}: only scheme, host and port are used", "e.g. mqtt://192.168.1.10:1883")
        out["url"] = f"{parts.scheme}://{parts.netloc}" + ("" if port else f":{8883 if parts.scheme == 'mqtts' else 1883}")

        out["username"] = text("username")
        v = data.get("password", d["password"])
        if not isinstance(v, str):
            raise err("password", "must be a string", "put it in quotes")
        out["password"] = v
        out["password_file"] = text("password_file")
        if not out["password"] and out["password_file"]:
            p = Path(out["password_file"]).expanduser()
            p = p if p.is_absolute() else base / p
            try:
                lines = p.read_text(encoding="utf-8").splitlines()
            except OSError as e:
                raise err("password_file", f"cannot read {p}: {e.strerror}",
                          "create the file or fix its permissions") from None
            out["password"] = lines[0].strip() if lines else ""
            if not out["password"]:
                raise err("password_file", f"{p} is empty", "put the password on its first line")
        if out["password"] and not out["username"]:
            raise err("username", "is empty but a password is set", "set mqtt.username too")

        out["client_id"] = text("client_id")
        if len(out["client_id"].encode()) > 65535 or "\0" in out["client_id"]:
            raise err("client_id", "is not a usable client id", "letters, digits, '-' or '_'")
        for key in ("ca_file", "certfile", "keyfile"):
            out[key] = text(key)
            if out[key] and not url.startswith("mqtts://"):
                raise err(key, "is set but the url is not mqtts://", "use mqtts://host:8883, or remove it")
            out[key] = path(key, out[key])
        if out["keyfile"] and not out["certfile"]:
            raise err("keyfile", "is set without mqtt.certfile", "set both, or neither")

        q = data.get("qos", d["qos"])
        if isinstance(q, str) and q.strip() in ("0", "1"):
            q = int(q)
        if isinstance(q, bool) or q not in (0, 1):
            raise err("qos", f"must be 0 or 1 (got {q!r})", "1: the broker acknowledges every message")
        out["qos"] = int(q)

        out["topic_prefix"] = prefix("topic_prefix")
        out["discovery_prefix"] = prefix("discovery_prefix")

        t = data.get("timeout_s", d["timeout_s"])
        try:
            if isinstance(t, bool):
                raise ValueError
            t = float(t)
        except (TypeError, ValueError):
            raise err("timeout_s", f"must be a number of seconds (got {t!r})") from None
        if not 0.1 <= t <= 600:
            raise err("timeout_s", f"must be between 0.1 and 600 s (got {t:g})")
        out["timeout_s"] = t
        return cls(**out)


# ------------------------------------------------------------------------------------------ meters

@dataclass(frozen=True)
class MeterInfo:
    """What discovery needs to know about one configured meter."""

    sensor: str          # the configured name (the ``sensor`` tag of its readings)
    model: Model
    bus: str = ""
    address: int = 0


def slug(name: str) -> str:
    """A topic level / Home Assistant id from a name: ``[A-Za-z0-9_-]`` kept, runs of anything else → ``_``."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "_"


# field -> (entity name, device_class, state_class, unit)
_SENSORS: dict[str, tuple[str, str | None, str, str | None]] = {
    "voltage_v": ("Voltage", "voltage", "measurement", "V"),
    "current_a": ("Current", "current", "measurement", "A"),
    "power_w": ("Power", "power", "measurement", "W"),
    "energy_wh": ("Energy", "energy", "total_increasing", "Wh"),
    "frequency_hz": ("Frequency", "frequency", "measurement", "Hz"),
    "power_factor": ("Power factor", "power_factor", "measurement", None),
}


def iso_time(time_ns: int) -> str:
    """ISO 8601 with zone (UTC), to the millisecond."""
    sec, rest = divmod(int(time_ns), 1_000_000_000)
    return datetime.fromtimestamp(sec, tz=timezone.utc).replace(microsecond=rest // 1000) \
        .isoformat(timespec="milliseconds")


def state_payload(r: Reading) -> str:
    """The JSON of one reading: ``time`` (ISO 8601, UTC), then every field under its InfluxDB name."""
    d: dict[str, Any] = {"time": iso_time(r.time_ns)}
    d.update(r.fields)
    return json.dumps(d, separators=(",", ":"), allow_nan=False)


def stream_payload(r: Reading) -> str:
    """The stream's JSON: as the state, plus ``time_ns`` (exact, for de-duplication) and the tags."""
    d: dict[str, Any] = {"time": iso_time(r.time_ns), "time_ns": int(r.time_ns)}
    d.update(r.fields)
    d["tags"] = dict(r.tags)
    return json.dumps(d, separators=(",", ":"), allow_nan=False)


# ------------------------------------------------------------------------------------------ batteries

@dataclass(frozen=True)
class BatteryInfo:
    """What the MQTT output needs to know about one configured battery (``[[batteries]]``)."""

    name: str                      # the configured name (the ``battery`` tag in InfluxDB)
    sensors: tuple[str, ...] = ()  # its meters: the battery is unavailable while one of them is down
    model: str = "battery monitor"  # shown as the Home Assistant device's model

    @classmethod
    def of(cls, b: BatterySettings) -> BatteryInfo:
        chem = {"lead-acid": "lead-acid", "lifepo4": "LiFePO4"}.get(b.chemistry, b.chemistry)
        return cls(b.name, tuple(b.sensors), f"battery monitor ({chem}, {b.capacity_ah:g} Ah, {b.nominal_v:g} V)")


# Every key of a battery's state JSON: the fields of InfluxDB's ``battery`` measurement (docs/battery.md),
# each present in every message, null while unknown (never 0).
BATTERY_KEYS = FIELDS
# (charged/discharged Ah and kWh, which Home Assistant reads as total_increasing, only ever grow: dcmon.battery)


def battery_payload(st: BatteryState, time_ns: int) -> str:
    """A battery's state as JSON: ``time`` (ISO 8601, UTC), every key of BATTERY_KEYS (the InfluxDB field
    names and values; null = unknown), ``last_full`` (ISO 8601 or null) and ``stale_sensors``."""
    d: dict[str, Any] = {"time": iso_time(time_ns)}
    d.update(dict.fromkeys(BATTERY_KEYS))
    d.update(influx_fields(st))
    d["last_full"] = iso_time(st.last_full_ns) if st.last_full_ns is not None else None
    d["stale_sensors"] = list(st.stale_sensors)
    return json.dumps(d, separators=(",", ":"), allow_nan=False)


# entity key -> (name, device_class, state_class, unit, display precision, value template)
_HOURS = "{{ none if value_json.%s is none else (value_json.%s / 3600) | round(3) }}"
_STATUSES = ("charging", "discharging", "idle")
BATTERY_ENTITIES: dict[str, tuple[str, str | None, str | None, str | None, int | None, str]] = {
    "soc": ("State of charge", "battery", "measurement", "%", 1, "{{ value_json.soc_pct }}"),
    "time_to_go": ("Time to go", "duration", "measurement", "h", 1, _HOURS % ("time_to_go_s", "time_to_go_s")),
    "net_current": ("Net current", "current", "measurement", "A", 2, "{{ value_json.net_current_a }}"),
    "voltage": ("Voltage", "voltage", "measurement", "V", 2, "{{ value_json.voltage_v }}"),
    "net_power": ("Net power", "power", "measurement", "W", 1, "{{ value_json.net_power_w }}"),
    "consumed": ("Consumed", None, "measurement", "Ah", 1, "{{ value_json.consumed_ah }}"),
    "charged_energy": ("Energy charged", "energy", "total_increasing", "kWh", 3, "{{ value_json.charged_kwh }}"),
    "discharged_energy": ("Energy discharged", "energy", "total_increasing", "kWh", 3,
                          "{{ value_json.discharged_kwh }}"),
    "status": ("Status", "enum", None, None, None,
               "{{ value_json.status if value_json.status in %s else none }}" % (list(_STATUSES),)),
    "synchronisations": ("Synchronisations", None, "total_increasing", None, 0, "{{ value_json.synchronisations }}"),
    "time_since_full": ("Time since full charge", "duration", "measurement", "h", 1,
                        _HOURS % ("time_since_full_s", "time_since_full_s")),
}


# ------------------------------------------------------------------------------------------ output

class MqttOutput:
    """One connection to one broker. ``start()`` connects in the background; every method may be called
    from any thread; none of them waits on the network except ``send_batch`` and ``close``."""

    def __init__(self, settings: MqttSettings, *, host: str, meters: Sequence[MeterInfo],
                 batteries: Sequence[BatteryInfo] = (),
                 reading_measurements: Sequence[str] = READING_MEASUREMENTS,
                 reconnect_min_s: int = 1, reconnect_max_s: int = 60, keepalive_s: int = 60) -> None:
        self.settings = s = settings
        self.host = host or socket.gethostname()
        self.where = f"MQTT broker at {s.url}"
        self.client_id = s.client_id or f"dcmon-{slug(self.host)}"
        self._measurements = frozenset(reading_measurements)
        h = slug(self.host)
        self.base = f"{s.topic_prefix}/{h}"
        self.status_topic = f"{self.base}/status"
        self.node_id = f"dcmon_{h}"
        self._poller_device_id = f"dcmon_{h}"
        meters, batteries = list(meters), list(batteries)
        self.meters: dict[str, MeterInfo] = {m.sensor: m for m in meters}
        self._slugs = _unique_slugs([m.sensor for m in meters], s.source, "sensors", "sensor")
        self.batteries: dict[str, BatteryInfo] = {b.name: b for b in batteries}
        self._bslugs = _unique_slugs([b.name for b in batteries], s.source, "batteries", "battery")
        self.configs: dict[str, str] = self._discovery_configs() if s.discovery else {}
        # the state/availability topics the entities announced now use (never cleared with a removed entity)
        self._in_use = _entity_topics(self.configs.values()) | {self.status_topic}
        self._config_filters = [f"{s.discovery_prefix}/{c}/{self.node_id}/+/config" for c in ("sensor", "binary_sensor")]
        self._birth_topic = f"{s.discovery_prefix}/status"

        # shared state, guarded by _cv; paho is never called while _cv is held (paho calls our callbacks
        # while holding its own locks, so the other order would deadlock)
        self._cv = threading.Condition()
        self._connected = False
        self._resync = False            # (re)connected: announce, status, availability and states again
        # the broker's retained configs of ours have all arrived (removals known): the SUBACK of a second,
        # later subscription (the broker answers a connection's packets in order) — flush() waits for it
        self._configs_read = not s.discovery
        self._barrier_mid: int | None = None
        self._subacks: set[int] = set()    # SUBACKs seen (one can come before subscribe() returns its mid)
        self._announce = False
        self._removals: set[str] = set()
        self._clear: set[str] = set()   # retained state/availability topics of removed entities
        self._meter_ch: _Channel[Reading] = _Channel(self.topic, state_payload)
        self._bat_ch: _Channel[tuple[BatteryState, int]] = _Channel(self.battery_topic, lambda v: battery_payload(*v))
        self._channels: tuple[_Channel[Any], ...] = (self._meter_ch, self._bat_ch)   # sent in this order
        self._pending: list[mqtt.MQTTMessageInfo] = []              # other messages not acknowledged yet (flush)
        self._flushing = 0
        self._sending = False                                       # work taken from the sets, not yet published
        self._stopping = False
        self._closing = False
        self._thread: threading.Thread | None = None
        self._stream_lock = threading.Lock()
        self._stream_pending: list[mqtt.MQTTMessageInfo] = []
        self._state_key: str | None = "connecting"   # the condition last logged
        self._refused = ""              # the broker refused our credentials: its reason
        self.last_error = "not connected yet"
        self.last_progress = time.monotonic()
        self.connects = 0
        self.states_coalesced = 0       # newer readings (or battery states) that replaced one not yet sent
        self.stream_sent = 0
        self.announcements = 0
        self.entities_removed = 0

        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=True,
                        protocol=mqtt.MQTTv311)
        c.will_set(self.status_topic, OFFLINE, qos=s.qos, retain=True)
        if s.username:
            c.username_pw_set(s.username, s.password or None)
        if s.tls:
            try:
                c.tls_set(ca_certs=s.ca_file or None, certfile=s.certfile or None, keyfile=s.keyfile or None)
            except (ssl.SSLError, OSError, ValueError) as e:
                key = "certfile" if s.certfile else "ca_file"
                raise ConfigError(s.source or "config", f"mqtt.{key}", f"cannot use the TLS files: {_tls_text(e)}",
                                  "give PEM files: the CA certificate, the client certificate and its key") from None
        c.reconnect_delay_set(min_delay=max(1, reconnect_min_s), max_delay=max(1, reconnect_max_s))
        c.max_inflight_messages_set(100)
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        self._client = c
        self._keepalive = keepalive_s

    # --------------------------------------------------------------------------------- topics

    def topic(self, sensor: str, leaf: str) -> str:
        """``<prefix>/<host>/<sensor>/<leaf>`` (leaf: availability, state, reading)."""
        return f"{self.base}/{self._slugs.get(sensor) or slug(sensor)}/{leaf}"

    def battery_topic(self, battery: str, leaf: str) -> str:
        """``<prefix>/<host>/battery/<battery>/<leaf>`` (leaf: availability, state): one level more than a
        meter's topics, so no sensor name can give the same topic."""
        return f"{self.base}/battery/{self._bslugs.get(battery) or slug(battery)}/{leaf}"

    # ------------------------------------------------------------------------------ life cycle

    def start(self) -> MqttOutput:
        """Connect in the background (paho's thread, with its reconnect back-off) and start the publisher
        thread. Returns at once; an unreachable broker is logged, not raised."""
        s = self.settings
        self._client.connect_async(s.host, s.port, keepalive=self._keepalive)
        self._client.loop_start()
        self._thread = threading.Thread(target=self._run, name="mqtt-publish", daemon=True)
        self._thread.start()
        log.info("%s: connecting as %r (topics %s/..., discovery %s)", self.where, self.client_id, self.base,
                 f"under {s.discovery_prefix}/" if s.discovery else "off")
        return self

    @property
    def connected(self) -> bool:
        return self._connected

    states_sent = property(lambda self: self._meter_ch.sent)          # state messages handed to paho
    battery_states_sent = property(lambda self: self._bat_ch.sent)

    def ping(self) -> bool:
        """The Sink contract's probe: connected again? (the sender then sends the stream's backlog at once)"""
        return self._connected

    def wait_connected(self, timeout_s: float) -> bool:
        """True once connected (for tests and `run --once`)."""
        with self._cv:
            return self._cv.wait_for(lambda: self._connected, timeout_s)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait, up to ``timeout_s`` in all (default mqtt.timeout_s), for the connection and until everything
        handed over so far (discovery, availability, newest states) was acknowledged by the broker (QoS 1) or
        written to it (QoS 0): `dcmon run --once` calls it before it exits. False (and one warning line) if not."""
        t = self.settings.timeout_s if timeout_s is None else timeout_s
        end = time.monotonic() + t
        if not self.wait_connected(t):
            log.warning("%s: not connected within %g s (%s): this run's states were not published", self.where,
                        t, self.last_error)
            return False
        with self._cv:
            self._flushing += 1
            try:
                while not self._idle():
                    left = end - time.monotonic()
                    if left <= 0 or not self._connected:
                        break
                    self._cv.wait(min(0.05, left))  # paho marks a message acknowledged just after on_publish
                done = self._idle()
                waiting = sum(ch.waiting() for ch in self._channels) + sum(1 for i in self._pending if not _done(i))
            finally:
                self._flushing -= 1
        if not done:
            log.warning("%s: %d message(s) not acknowledged within %g s (%s)", self.where, waiting, t,
                        self.last_error or "the broker is slow")
        return done

    def _idle(self) -> bool:
        """Connected, nothing left to send and nothing in flight (call with _cv held)."""
        if not self._connected or self._sending or self._resync or self._announce or self._removals or self._clear \
                or not self._configs_read or any(ch.avail_dirty or ch.dirty for ch in self._channels):
            return False
        self._pending = [i for i in self._pending if not _done(i)]
        return not self._pending and all(_done(i) for ch in self._channels for i in ch.inflight.values())

    def close(self, timeout_s: float | None = None) -> None:
        """Stop: send what is pending (discovery, availability, newest states), publish ``offline`` on the
        status topic (a clean stop; a crash leaves it to the last will), then disconnect. Waits at most
        about ``timeout_s`` (default mqtt.timeout_s) for the broker."""
        t = self.settings.timeout_s if timeout_s is None else timeout_s
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=t)
        if self._connected:
            info = self._publish(self.status_topic, OFFLINE, self.settings.qos, True)
            try:
                info.wait_for_publish(t)
            except (RuntimeError, ValueError):
                pass
        self._closing = True
        self._client.disconnect()
        self._client.loop_stop()
        with self._cv:
            self._connected = False
        log.info("%s: disconnected (status offline)", self.where)

    # ----------------------------------------------------------------------- state and availability

    def publish_state(self, reading: Reading) -> None:
        """Send this reading as the meter's newest state (never blocks). Marks the meter available. While
        disconnected only the newest reading per meter is kept."""
        sensor = reading.sensor or reading.tags.get("sensor", "")
        if sensor not in self.meters:
            log.debug("%s: reading for unknown sensor %r not published as state", self.where, sensor)
            return
        with self._cv:
            if self._meter_ch.put(sensor, reading):
                self.states_coalesced += 1
            if self._meter_ch.set_avail(sensor, ONLINE):
                self._update_battery_avail(sensor)
            self._cv.notify_all()

    def meter_up(self, sensor: str) -> None:
        self._set_avail(sensor, ONLINE)

    def meter_down(self, sensor: str) -> None:
        """The meter stopped answering: Home Assistant shows its entities as unavailable."""
        self._set_avail(sensor, OFFLINE)

    def _set_avail(self, sensor: str, value: str) -> None:
        if sensor not in self.meters:
            return
        with self._cv:
            if self._meter_ch.set_avail(sensor, value):
                self._update_battery_avail(sensor)
                self._cv.notify_all()

    def publish_battery(self, state: BatteryState) -> None:
        """Send this battery monitor's state as its newest (never blocks; only the newest per battery is kept
        while disconnected). The battery is available while none of its meters is stale or down."""
        name = state.name
        if name not in self.batteries:
            log.debug("%s: state of unknown battery %r not published", self.where, name)
            return
        with self._cv:
            if self._bat_ch.put(name, (state, time.time_ns())):
                self.states_coalesced += 1
            self._update_battery_avail(None, name)
            self._cv.notify_all()

    def _update_battery_avail(self, sensor: str | None, battery: str | None = None) -> None:
        """Recompute the availability of ``battery``, or of every battery that has ``sensor`` (_cv held)."""
        for name, b in self.batteries.items():
            if name != battery and (sensor is None or sensor not in b.sensors):
                continue
            latest = self._bat_ch.latest.get(name)
            if latest is None:
                continue   # nothing to show yet: Home Assistant keeps it unavailable
            up = not latest[0].stale_sensors and all(self._meter_ch.avail.get(m) != OFFLINE for m in b.sensors)
            self._bat_ch.set_avail(name, ONLINE if up else OFFLINE)

    # ------------------------------------------------------------------------------ the stream

    def send_batch(self, items: Sequence[str | Reading]) -> None:
        """Publish every reading of a spool batch on ``.../reading`` (QoS 1, in order) and return once the
        broker acknowledged all of them. Items: Reading objects or their line-protocol lines; lines of
        other measurements (health points) are skipped. Raises SinkRetryable (not connected, no PUBACK
        within mqtt.timeout_s), SinkAuth (credentials refused) or SinkPermanent (bad lines, with
        ``bad_lines``). Never leaves more than one batch waiting in paho's queue."""
        msgs: list[tuple[str, str]] = []
        bad: list[int] = []
        for i, it in enumerate(items):
            try:
                r = it if isinstance(it, Reading) else parse_line(it)
            except ValueError:
                bad.append(i)
                continue
            sensor = r.sensor or r.tags.get("sensor", "")
            if not sensor or (not isinstance(it, Reading) and r.measurement not in self._measurements):
                continue
            msgs.append((self.topic(sensor, "reading"), stream_payload(r)))
        if bad:
            sample = str(items[bad[0]])[:80]
            raise SinkPermanent(f"{self.where}: {len(bad)} line(s) are not readings, e.g. {sample!r}",
                                bad_lines=bad)
        with self._stream_lock:
            self._wait_acked(self._stream_pending)   # the last failed batch first, if paho still holds it
            self._stream_pending = []
            if not msgs:
                return
            if not self._connected:
                raise self._unreachable()
            infos = [self._publish(t, p, 1, False) for t, p in msgs]
            self._stream_pending = infos
            self._wait_acked(infos)
            self._stream_pending = []
            self.stream_sent += len(infos)

    write = send_batch  # the Sink contract (dcmon.outputs.base.Sink): a Sender drains the stream's spool into it

    def _wait_acked(self, infos: list[mqtt.MQTTMessageInfo]) -> None:
        """Wait for each PUBACK, up to timeout_s per message (a slow big batch is not a dead broker)."""
        t = self.settings.timeout_s
        for info in infos:
            if not _acked(info):
                if not self._connected:
                    raise self._unreachable()
                end = time.monotonic() + t
                while not _acked(info) and time.monotonic() < end:
                    if not self._connected:
                        raise self._unreachable()
                    try:
                        info.wait_for_publish(min(0.5, max(0.0, end - time.monotonic())))
                    except (RuntimeError, ValueError):  # paho refused it (queue full, ...): send again later
                        raise SinkRetryable(f"{self.where}: message not queued ({info.rc})") from None
                if not _acked(info):
                    raise SinkRetryable(f"{self.where}: no acknowledgement within {t:g} s")

    def _unreachable(self) -> SinkError:
        if self._refused:
            return SinkAuth(f"{self.where} refused the login ({self._refused}); fix mqtt.username / "
                            f"mqtt.password_file; readings stay in the spool")
        return SinkRetryable(f"{self.where}: not connected ({self.last_error})")

    # ------------------------------------------------------------------------------ status

    def status(self) -> dict[str, object]:
        with self._cv:
            return {
                "url": self.settings.url, "connected": self._connected, "last_error": "" if self._connected else self.last_error,
                "connects": self.connects, "states_sent": self.states_sent, "states_coalesced": self.states_coalesced,
                "states_waiting": sum(len(ch.dirty) for ch in self._channels), "stream_sent": self.stream_sent,
                "stream_in_flight": sum(1 for i in self._stream_pending if not _acked(i)),
                "announcements": self.announcements, "entities_removed": self.entities_removed,
                "meters_offline": self._meter_ch.offline(),
                "battery_states_sent": self.battery_states_sent,
                "batteries_offline": self._bat_ch.offline(),
            }

    # --------------------------------------------------------------------------- discovery

    def _availability(self, topic: str) -> list[dict[str, str]]:
        return [{"topic": t, "payload_available": ONLINE, "payload_not_available": OFFLINE}
                for t in (self.status_topic, topic)]

    def _discovery_configs(self) -> dict[str, str]:
        """topic → retained JSON payload, for every entity this output announces."""
        s = self.settings
        dp, node = s.discovery_prefix, self.node_id
        origin = {"name": "dcmon", "sw_version": __version__}
        out: dict[str, str] = {}
        poller = {"identifiers": [self._poller_device_id], "name": f"dcmon {self.host}", "manufacturer": "dcmon",
                  "model": "dcmon poller", "sw_version": __version__}
        out[f"{dp}/binary_sensor/{node}/poller/config"] = _dumps({
            "name": "Status", "unique_id": f"{self._poller_device_id}_status", "state_topic": self.status_topic,
            "payload_on": ONLINE, "payload_off": OFFLINE, "device_class": "connectivity",
            "entity_category": "diagnostic", "qos": s.qos, "device": poller, "origin": origin})
        for sensor, m in self.meters.items():
            sl = self._slugs[sensor]
            dev_id = f"{self._poller_device_id}_{sl}"
            device = {"identifiers": [dev_id], "name": sensor, "manufacturer": MANUFACTURER, "model": m.model.title,
                      "via_device": self._poller_device_id}
            state, availability = self.topic(sensor, "state"), self._availability(self.topic(sensor, "availability"))
            for reg in m.model.inputs:
                f = reg.name
                common: dict[str, Any] = {"unique_id": f"{dev_id}_{f}", "state_topic": state,
                                          "availability": availability, "availability_mode": "all",
                                          "qos": s.qos, "device": device, "origin": origin}
                if f.endswith("_alarm"):
                    cfg = {"name": f.replace("_", " ").capitalize(),
                           "value_template": "{{ 'ON' if value_json.%s else 'OFF' }}" % f,
                           "payload_on": "ON", "payload_off": "OFF", "device_class": "problem",
                           "entity_category": "diagnostic", **common}
                    out[f"{dp}/binary_sensor/{node}/{sl}_{f}/config"] = _dumps(cfg)
                    continue
                name, dclass, sclass, unit = _SENSORS.get(f, (f.replace("_", " ").capitalize(), None, "measurement", None))
                cfg = {"name": name, "value_template": "{{ value_json.%s }}" % f, "state_class": sclass,
                       "suggested_display_precision": decimals(reg.scale), **common}
                if dclass:
                    cfg["device_class"] = dclass
                if unit:
                    cfg["unit_of_measurement"] = unit
                out[f"{dp}/sensor/{node}/{sl}_{f}/config"] = _dumps(cfg)
        for name, b in self.batteries.items():
            out.update(self._battery_configs(name, b, origin))
        return out

    def _battery_configs(self, name: str, b: BatteryInfo, origin: dict[str, str]) -> dict[str, str]:
        """One Home Assistant device per battery (via the poller's), one sensor per BATTERY_ENTITIES entry.
        Object ids and unique ids carry ``_battery_`` after the node id: a sensor's never starts with ``_``."""
        s = self.settings
        dp, node = s.discovery_prefix, self.node_id
        bs = self._bslugs[name]
        dev_id = f"{self._poller_device_id}__battery_{bs}"
        device = {"identifiers": [dev_id], "name": name, "manufacturer": "dcmon", "model": b.model,
                  "via_device": self._poller_device_id}
        availability = self._availability(self.battery_topic(name, "availability"))
        out: dict[str, str] = {}
        for key, (label, dclass, sclass, unit, places, template) in BATTERY_ENTITIES.items():
            cfg: dict[str, Any] = {"name": label, "unique_id": f"{dev_id}_{key}",
                                   "state_topic": self.battery_topic(name, "state"), "value_template": template,
                                   "availability": availability, "availability_mode": "all", "qos": s.qos,
                                   "device": device, "origin": origin}
            if dclass:
                cfg["device_class"] = dclass
            if sclass:
                cfg["state_class"] = sclass
            if unit:
                cfg["unit_of_measurement"] = unit
            if places is not None:
                cfg["suggested_display_precision"] = places
            if dclass == "enum":
                cfg["options"] = list(_STATUSES)
            if key == "soc":   # why it is unknown, and which meters are stale, as attributes
                cfg["json_attributes_topic"] = self.battery_topic(name, "state")
                cfg["json_attributes_template"] = ("{{ {'unknown_reason': value_json.unknown_reason, "
                                                   "'stale_sensors': value_json.stale_sensors} | tojson }}")
            if key == "synchronisations":
                cfg["entity_category"] = "diagnostic"
            out[f"{dp}/sensor/{node}/_battery_{bs}_{key}/config"] = _dumps(cfg)
        return out

    # --------------------------------------------------------------------- publisher thread

    def _run(self) -> None:
        """Thread body: send what changed (discovery, removals, availability, newest states) while
        connected. Never raises."""
        while True:
            try:
                with self._cv:
                    # a state waiting for its predecessor's acknowledgement: look again soon (paho marks a
                    # message acknowledged just after on_publish, so that wake-up can come too early)
                    idle = 0.05 if self._connected and any(ch.dirty for ch in self._channels) else _IDLE_S
                    self._cv.wait_for(lambda: self._stopping or self._has_work(), idle)
                    self.last_progress = time.monotonic()
                    if not self._has_work():
                        if self._stopping:  # close(): what was pending has gone out first
                            return
                        continue
                    work = self._take_work()
                    self._sending = True
                try:
                    self._do(work)
                finally:
                    with self._cv:
                        self._sending = False
                        self._cv.notify_all()
            except Exception as e:  # noqa: BLE001 - the thread must outlive a surprise; logged, retried
                log.warning("%s: publishing failed (%s: %s); will retry", self.where, type(e).__name__, e)
                time.sleep(1.0)

    def _has_work(self) -> bool:
        if not self._connected:
            return False
        if self._resync or self._announce or self._removals or any(ch.avail_dirty for ch in self._channels):
            return True
        return any(ch.can_send(k) for ch in self._channels for k in ch.dirty)

    def _take_work(self) -> _Work:
        resync, self._resync = self._resync, False
        if resync:
            self._announce = True
            for ch in self._channels:
                ch.avail_dirty |= set(ch.avail)
                ch.dirty |= set(ch.latest)
        announce, self._announce = self._announce, False
        removals, self._removals = sorted(self._removals), set()
        clear, self._clear = sorted(self._clear), set()
        avail: list[tuple[str, str]] = []
        states: list[tuple[_Channel[Any], str, Any]] = []
        for ch in self._channels:
            avail += [(ch.topic(k, "availability"), ch.avail[k]) for k in sorted(ch.avail_dirty)]
            ch.avail_dirty.clear()
            if not announce:  # Home Assistant wants the configs before the states
                ready = [k for k in sorted(ch.dirty) if ch.can_send(k)]
                states += [(ch, k, ch.latest[k]) for k in ready]
                ch.dirty -= set(ready)
        return _Work(resync, announce, removals, avail, states, clear)

    def _do(self, w: _Work) -> None:
        s = self.settings
        resync, announce, removals, avail, states = w.resync, w.announce, w.removals, w.avail, w.states
        pending: list[mqtt.MQTTMessageInfo] = []
        if resync:
            self._publish(self.status_topic, ONLINE, s.qos, True)
            subs = [(self._birth_topic, 0)] + [(f, 0) for f in self._config_filters]
            self._client.subscribe(subs)
            if self.settings.discovery:   # the barrier: answered after the retained configs above were sent
                with self._cv:
                    self._configs_read = False
                _rc, mid = self._client.subscribe(f"{self.base}/_sync", 0)   # base: the host as a safe topic level
                with self._cv:
                    self._barrier_mid = mid
                    self._configs_read = mid in self._subacks
                    self._subacks.clear()
                    self._cv.notify_all()
        if announce:
            for t, payload in self.configs.items():
                pending.append(self._publish(t, payload, s.qos, True))
            with self._cv:
                self.announcements += 1
                for ch in self._channels:  # after a Home Assistant restart it needs states again
                    ch.dirty |= set(ch.latest)
                self._cv.notify_all()
        for t in removals:
            pending.append(self._publish(t, "", s.qos, True))
            log.info("%s: removed the Home Assistant entity %s (no longer in the config)", self.where,
                     t.rsplit("/", 2)[-2])
        if removals:
            with self._cv:
                self.entities_removed += len(removals)
        for t in w.clear:
            pending.append(self._publish(t, "", s.qos, True))
        if w.clear:
            log.info("%s: cleared %d retained state/availability topic(s) of removed entities", self.where,
                     len(w.clear))
        for topic, value in avail:
            pending.append(self._publish(topic, value, s.qos, True))
        for ch, name, value in states:
            info = self._publish(ch.topic(name, "state"), ch.payload(value), s.qos, s.retain_state)
            with self._cv:
                ch.inflight[name] = info
                ch.sent += 1
        if pending:
            with self._cv:
                self._pending = [i for i in self._pending if not _done(i)] + pending

    def _publish(self, topic: str, payload: str, qos: int, retain: bool) -> mqtt.MQTTMessageInfo:
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos > 0:
            # paho keeps a QoS 1 message queued and sends it after the reconnect; the info only says
            # "no connection" at the time of the call. Mark it pending, so waiting on it works.
            info.rc = MQTTErrorCode.MQTT_ERR_AGAIN
        return info

    # ------------------------------------------------------------------------ paho callbacks
    # They run on paho's thread while it holds its own locks: only flags and notify here.

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason_code: Any,
                    properties: object) -> None:
        try:
            if reason_code.is_failure:
                text = str(reason_code)
                auth = reason_code.value in (134, 135) or "authori" in text.lower() or "password" in text.lower()
                with self._cv:
                    self._refused = text if auth else ""
                    self.last_error = f"the broker refused the connection: {text}"
                hint = ("; check mqtt.username and mqtt.password_file (the password is not shown)" if auth else "")
                self._note(f"refused:{text}", logging.ERROR if auth else logging.WARNING,
                           f"{self.where} refused the connection: {text}{hint}; retrying with back-off")
                return
            with self._cv:
                self._connected = True
                self._refused = ""
                self._resync = True
                self.connects += 1
                self.last_error = ""
                self._cv.notify_all()
            self._note("up", logging.INFO, f"{self.where}: connected as {self.client_id!r}")
        except Exception:  # noqa: BLE001 - never let a callback kill paho's thread
            log.exception("%s: on_connect failed", self.where)

    def _on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        try:
            e = sys.exc_info()[1]  # paho calls this from its `except OSError` block
            text = _connect_error_text(e, self.settings)
            with self._cv:
                self.last_error = text
            self._note(f"fail:{text}", logging.WARNING, f"{self.where}: {text}; retrying with back-off")
        except Exception:  # noqa: BLE001
            log.exception("%s: on_connect_fail failed", self.where)

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object, reason_code: Any,
                       properties: object) -> None:
        try:
            with self._cv:
                was = self._connected
                self._connected = False
                if self._closing:
                    return
                if was:
                    self.last_error = f"connection lost ({reason_code})"
                elif not self._refused:
                    self.last_error = ("the broker closed the connection before accepting it"
                                       + ("" if self.settings.tls else " (a TLS port? then use mqtts://)"))
                text = self.last_error
            if was or not self._refused:
                self._note(f"down:{text}", logging.WARNING,
                           f"{self.where}: {text}; reconnecting with back-off, keeping the newest state per meter")
        except Exception:  # noqa: BLE001
            log.exception("%s: on_disconnect failed", self.where)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            if msg.topic == self._birth_topic:
                if msg.retain or msg.payload.strip().lower() != ONLINE.encode():
                    return  # a stored birth message is not Home Assistant (re)starting now
                log.info("%s: Home Assistant (re)started: announcing the meters again", self.where)
                with self._cv:
                    self._announce = self.settings.discovery
                    self._cv.notify_all()
                return
            if msg.payload and msg.topic not in self.configs and msg.topic.endswith("/config"):
                with self._cv:  # ours (our node id) but not announced now: remove it from Home Assistant
                    self._removals.add(msg.topic)
                    self._clear |= _entity_topics([msg.payload.decode("utf-8", "replace")]) - self._in_use
                    self._cv.notify_all()
        except Exception:  # noqa: BLE001
            log.exception("%s: on_message failed", self.where)

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int, reason_codes: object,
                      properties: object) -> None:
        try:
            with self._cv:
                if mid == self._barrier_mid:
                    self._configs_read = True
                    self._cv.notify_all()
                else:
                    self._subacks.add(mid)
        except Exception:  # noqa: BLE001
            log.exception("%s: on_subscribe failed", self.where)

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int, reason_code: object,
                    properties: object) -> None:
        try:
            with self._cv:
                if self._flushing or any(ch.dirty for ch in self._channels):
                    self._cv.notify_all()
        except Exception:  # noqa: BLE001
            log.exception("%s: on_publish failed", self.where)

    def _note(self, key: str, level: int, message: str) -> None:
        """Log a connection state once per change."""
        if key != self._state_key:
            self._state_key = key
            log.log(level, "%s", message)


# ------------------------------------------------------------------------------------------ helpers

@dataclass
class _Work:
    """What the publisher thread sends in one round (taken under _cv, sent without it)."""

    resync: bool
    announce: bool
    removals: list[str]
    avail: list[tuple[str, str]]                    # (topic, online/offline)
    states: list[tuple[_Channel[Any], str, Any]]    # (channel, meter or battery, its newest value)
    clear: list[str] = field(default_factory=list)  # retained topics of removed entities, cleared


_V = TypeVar("_V")


@dataclass(eq=False)
class _Channel(Generic[_V]):
    """The newest state and the availability of each meter (or of each battery), guarded by the output's _cv;
    at most one state message per name in flight."""

    topic: Callable[[str, str], str]    # (name, leaf) -> topic
    payload: Callable[[_V], str]        # the state message's JSON
    latest: dict[str, _V] = field(default_factory=dict)   # a battery's: (state, wall time of the state)
    dirty: set[str] = field(default_factory=set)          # latest not sent yet
    inflight: dict[str, mqtt.MQTTMessageInfo] = field(default_factory=dict)   # the last state message sent
    avail: dict[str, str] = field(default_factory=dict)   # online / offline
    avail_dirty: set[str] = field(default_factory=set)    # avail not sent yet
    sent: int = 0                       # state messages handed to paho

    def put(self, name: str, value: _V) -> bool:
        """Keep ``value`` as the newest, to be sent; True if it replaced one not sent yet."""
        coalesced = name in self.dirty
        self.latest[name] = value
        self.dirty.add(name)
        return coalesced

    def set_avail(self, name: str, value: str) -> bool:
        """True if that changed the availability (then it is sent)."""
        if self.avail.get(name) == value:
            return False
        self.avail[name] = value
        self.avail_dirty.add(name)
        return True

    def can_send(self, name: str) -> bool:
        info = self.inflight.get(name)
        return info is None or _done(info)

    def waiting(self) -> int:
        return len(self.dirty) + sum(1 for i in self.inflight.values() if not _done(i))

    def offline(self) -> list[str]:
        return sorted(k for k, v in self.avail.items() if v == OFFLINE)


def _unique_slugs(names: Iterable[str], source: str | None, key: str, what: str) -> dict[str, str]:
    """name → its topic level; two names giving the same one are a ConfigError (one line, the fix)."""
    out: dict[str, str] = {}
    taken: dict[str, str] = {}
    for name in names:
        sl = slug(name)
        if sl in taken and taken[sl] != name:
            raise ConfigError(source or "config", key,
                              f"{what} names {taken[sl]!r} and {name!r} give the same MQTT topic {sl!r}",
                              "rename one of them")
        taken[sl] = name
        out[name] = sl
    return out


def _entity_topics(payloads: Iterable[str]) -> set[str]:
    """The state, attributes and availability topics that discovery configs name (a config that is not
    JSON names none)."""
    out: set[str] = set()
    for p in payloads:
        try:
            d = json.loads(p)
        except ValueError:
            continue
        if not isinstance(d, dict):
            continue
        for k in ("state_topic", "json_attributes_topic"):
            if isinstance(d.get(k), str):
                out.add(d[k])
        for a in d.get("availability") or []:
            if isinstance(a, dict) and isinstance(a.get("topic"), str):
                out.add(a["topic"])
    return out


def _dumps(d: dict[str, Any]) -> str:
    return json.dumps(d, separators=(",", ":"))


def _acked(info: mqtt.MQTTMessageInfo) -> bool:
    try:
        return info.is_published()
    except (RuntimeError, ValueError):
        return False


def _done(info: mqtt.MQTTMessageInfo) -> bool:
    """Nothing more will happen to this message: acknowledged (QoS 1) or written (QoS 0), or a QoS 0 message
    paho dropped because the connection was gone (a reconnect sends every newest state again)."""
    return info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN or _acked(info)


def _tls_text(e: BaseException) -> str:
    reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or type(e).__name__
    return str(reason).replace("_", " ").lower()


def _connect_error_text(e: BaseException | None, s: MqttSettings) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        why = e.verify_message or "not trusted"
        return (f"the broker's TLS certificate was refused ({why}); set mqtt.ca_file to the CA that signed it, "
                "and use the host name the certificate names")
    if isinstance(e, ssl.SSLError):
        return f"TLS handshake failed ({_tls_text(e)}); is {s.port} a TLS port?"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused (is the broker running, and is the port right?)"
    if isinstance(e, socket.gaierror):
        return f"host name {s.host!r} not found"
    if isinstance(e, (TimeoutError, socket.timeout)):
        return "no answer (timeout): is the host reachable?"
    if isinstance(e, OSError):
        return f"connection failed ({e.strerror or type(e).__name__})"
    return "connection failed"


# ------------------------------------------------------------------------------------------ line protocol

_KEY_UNESC = {",": ",", "=": "=", " ": " ", "n": "\n", "\\": "\\"}


def _read_token(line: str, i: int, stops: str) -> tuple[str, int]:
    """Read up to an unescaped stop character; returns (text, index of the stop or len)."""
    out: list[str] = []
    n = len(line)
    while i < n:
        c = line[i]
        if c == "\\" and i + 1 < n and line[i + 1] in _KEY_UNESC:
            out.append(_KEY_UNESC[line[i + 1]])
            i += 2
            continue
        if c in stops:
            break
        out.append(c)
        i += 1
    return "".join(out), i


def parse_line(line: str) -> Reading:
    """One line of line protocol as dcmon.reading writes it, back into a Reading. Raises ValueError."""
    line = line.rstrip("\n")
    measurement, i = _read_token(line, 0, ", ")
    if not measurement or i >= len(line):
        raise ValueError("no measurement")
    tags: dict[str, str] = {}
    while line[i] == ",":
        k, i = _read_token(line, i + 1, "=, ")
        if i >= len(line) or line[i] != "=":
            raise ValueError("bad tag")
        v, i = _read_token(line, i + 1, ", ")
        if i >= len(line):
            raise ValueError("no fields")
        tags[k] = v
    i += 1  # the space
    fields: dict[str, FieldScalar] = {}
    n = len(line)
    while True:
        k, i = _read_token(line, i, "= ")
        if i >= n or line[i] != "=" or not k:
            raise ValueError("bad field")
        i += 1
        if i < n and line[i] == '"':
            out: list[str] = []
            i += 1
            while i < n and line[i] != '"':
                if line[i] == "\\" and i + 1 < n:
                    out.append("\n" if line[i + 1] == "n" else line[i + 1])
                    i += 2
                else:
                    out.append(line[i])
                    i += 1
            if i >= n:
                raise ValueError("unterminated string")
            i += 1
            fields[k] = "".join(out)
        else:
            j = i
            while j < n and line[j] not in ", ":
                j += 1
            raw = line[i:j]
            i = j
            if raw in ("t", "T", "true", "True", "TRUE"):
                fields[k] = True
            elif raw in ("f", "F", "false", "False", "FALSE"):
                fields[k] = False
            elif raw.endswith("i"):
                fields[k] = int(raw[:-1])
            else:
                fields[k] = float(raw)
        if i < n and line[i] == ",":
            i += 1
            continue
        break
    if i >= n or line[i] != " ":
        raise ValueError("no timestamp")
    time_ns = int(line[i + 1:].strip())
    return Reading(measurement=measurement, time_ns=time_ns, tags=tags, fields=fields, sensor=tags.get("sensor", ""))


# ------------------------------------------------------------------------------------------- the output

class MqttService(Output):
    """MQTT as one of the service's outputs: each reading as its meter's newest state, availability from the
    poller's meter states, and, with ``mqtt.stream = true``, a durable output of its own (the spool beside
    spool.path, drained by its own Sender into ``send_batch``)."""

    name = "mqtt"

    def __init__(self, cfg: Config, settings: MqttSettings) -> None:
        self.settings = settings
        self.output = MqttOutput(settings, host=cfg.host,
                                 meters=[MeterInfo(s.name, s.meter, s.bus, s.address) for s in cfg.enabled_sensors()],
                                 batteries=[BatteryInfo.of(b) for b in cfg.batteries],
                                 reading_measurements=(cfg.influxdb.measurement, cfg.influxdb.measurement_ac))
        self.durable = settings.stream
        self.spool_path = cfg.mqtt_spool_path() if settings.stream else None

    def start(self) -> None:
        self.output.start()

    def on_reading(self, reading: Reading) -> None:
        self.output.publish_state(reading)

    def meter_state(self, sensor: str, up: bool, labels: Mapping[str, str]) -> None:
        (self.output.meter_up if up else self.output.meter_down)(sensor)

    def on_battery(self, state: BatteryState) -> None:
        self.output.publish_battery(state)

    def flush(self) -> bool:
        return self.output.flush()

    def sink(self) -> MqttOutput | None:
        return self.output if self.durable else None

    def status(self) -> dict[str, object]:
        return {**self.output.status(), "stream": self.durable}

    def close(self) -> None:
        self.output.close()


def from_config(cfg: Config, ctx: OutputContext) -> Output | None:
    if not cfg.mqtt.enabled:
        return None
    settings = cfg.mqtt.settings
    if settings is None:   # a Config made without load(): validate here
        from ..config import table_values

        settings = MqttSettings.from_dict(table_values(cfg.mqtt), cfg.source,
                                          base_dir=cfg.base_dir or None)
    return MqttService(cfg, settings)
