"""The one validated configuration model, and the loader.

Where each value comes from, lowest to highest precedence (documented in docs/configuration.md):

1. the defaults in this module;
2. ``config.toml`` (committed, commented) or the file given with ``--config``;
3. ``config.local.toml`` beside it (git-ignored: local overrides and secrets), merged key by key;
4. environment variables ``DCMON_<SECTION>_<KEY>`` for the scalar keys of every section (``[poller]``,
   ``[spool]``, ``[influxdb]``, ``[grafana]``, …), e.g. ``DCMON_INFLUXDB_TOKEN``, ``DCMON_SPOOL_PATH``;
5. command-line overrides (``dcmon run --interval``), validated like the rest;
6. for a secret still empty after that: ``influxdb.token_file`` / ``influxdb.password_file`` (first line).

Everything is validated before any I/O. An invalid value gives one ConfigError naming the file (or the
environment variable, or the option), the key, the problem and the fix. Unknown keys are errors.

Adding a section: a ``@dataclass(kw_only=True)`` class with ``key(...)`` limits (see dcmon.schema), and one
field on ``Config`` (``mqtt: MqttConfig = key(factory=MqttConfig)``); environment variables, unknown-key
suggestions and the error format follow. Document its keys in docs/configuration.md (a test checks).
"""

from __future__ import annotations

import dataclasses
import grp
import math
import os
import pwd
import socket
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal
from urllib.parse import urlsplit

from . import __version__
from .battery import BatterySettings, check_batteries
from .errors import ConfigError
from .models import MODELS, Model, Register, RegType, SerialDefaults, WordType, shunt_amps
from .schema import INTERNAL, EnvText, Invalid, Loc, is_scalar, is_table, key, keys, parse, hint, rule_of

if TYPE_CHECKING:
    from .bus import BusSettings

ENV_PREFIX = "DCMON_"
# Real serial rates (PZEM meters: 9600). Anything else is a typo that would only show as silence on the line.
BAUD_RATES = (1200, 2400, 4800, 9600, 14400, 19200, 38400, 57600, 115200)
REQUEST_BYTES = 8  # a Modbus RTU read request: address, function, start, count, CRC


# ------------------------------------------------------------------------------------------ checks

def line_protocol_safe(v: str) -> str:
    """A name that becomes a measurement, tag key or tag value: InfluxDB's line protocol cannot carry it
    if it is empty or ends in a backslash (that would escape the separator after it)."""
    if not v:
        raise Invalid("must not be empty")
    if v.endswith("\\"):
        raise Invalid("must not end with a backslash (InfluxDB's line protocol cannot carry it)",
                      "remove the trailing backslash")
    return v


def _host_tag(v: str) -> str:
    return line_protocol_safe(v) if v else v


def _url_checker(section: str, user_key: str, password_hint: str) -> Callable[[str], str]:
    def check(v: str) -> str:
        creds = "@" in v
        try:
            parts = urlsplit(v)
            netloc = parts.netloc
        except ValueError:
            raise Invalid("is not a valid URL", 'e.g. "http://127.0.0.1:8086"', show=not creds) from None
        if parts.scheme not in ("http", "https"):
            raise Invalid("must start with http:// or https://", show=not creds)
        if "@" in netloc:  # before anything that would echo it: it holds a password
            raise Invalid("must not contain a user name or password",
                          f"put the user in {section}.{user_key} and the password in {password_hint}", show=False)
        if any(c.isspace() for c in v):
            raise Invalid("must not contain spaces", "remove them (a space in a path is written %20)")
        if not parts.hostname:
            raise Invalid("has no host name", 'e.g. "http://127.0.0.1:8086"')
        try:
            port = parts.port
        except ValueError:
            port = 0
        if port == 0 or (port is None and netloc.endswith(":")):
            raise Invalid("has an invalid port", "use a port from 1 to 65535, or none for the scheme's default")
        if parts.query or parts.fragment:
            raise Invalid("must not have a ?query or #fragment", "give the server's base URL only")
        return v.rstrip("/")
    return check


def _api_token(v: str) -> str:
    if v and not all(33 <= ord(c) < 127 for c in v):
        raise Invalid("must be printable ASCII without spaces (as API tokens are)", "check what was pasted", show=False)
    return v


def _model_name(v: str) -> str:
    return v.lower().replace("-", "").replace("_", "")


def _known_model(v: str) -> str:
    """A built-in model, or (checked by Config.check, which knows them) a [models.NAME] table."""
    if not v:
        raise Invalid("must not be empty", f"use one of {', '.join(MODELS)}")
    return _model_name(v)


def _known_shunt(v: int) -> int:
    amps = shunt_amps()   # from the models' shunt codes (PZEM-017: 50, 100, 200, 300)
    if v not in amps:
        raise Invalid(f"must be one of {', '.join(str(a) for a in amps)}")
    return v


RESERVED_TAGS = ("sensor", "model", "address", "bus", "host")


def _tags(v: dict[str, str]) -> dict[str, str]:
    for k, val in v.items():
        if k in RESERVED_TAGS:
            raise Invalid(f"tag name {k!r} is set by dcmon itself", "pick another name", loc=(k,))
        if k == "time" or k.startswith("_"):
            raise Invalid(f"tag name {k!r} is reserved by InfluxDB", "pick another name", loc=(k,))
        for what in (k, val):
            try:
                line_protocol_safe(what)
            except Invalid as e:
                raise Invalid(("tag name " if what is k else "tag value ") + e.problem, e.fix, loc=(k,)) from None
    return v


# ------------------------------------------------------------------------------------------ tables

@dataclass(kw_only=True)
class BusConfig:
    """One serial port with meters on it. Framing defaults come from the models on the bus."""

    name: str = field(default="", metadata=INTERNAL)   # the NAME of [buses.NAME]
    port: str = key(min_len=1)
    baudrate: int = key(9600, choices=BAUD_RATES, fix="PZEM meters speak 9600")
    bytesize: Literal[7, 8] = 8
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] | None = None  # None: the models' own (PZEM DC 2, PZEM AC 1)
    timeout_s: float = key(0.5, gt=0, le=10)
    retries: int = key(1, ge=0, le=5)
    gap_s: float = key(0.02, ge=0, le=5)  # silence kept between one reply and the next request


@dataclass(kw_only=True)
class Calibration:
    """Per-sensor correction: value = raw × gain + offset (from `dcmon calibrate`)."""

    voltage_gain: float = key(1.0, gt=0.5, lt=1.5)
    voltage_offset: float = 0.0
    current_gain: float = key(1.0, gt=0.5, lt=1.5)
    current_offset: float = 0.0

    @property
    def is_identity(self) -> bool:
        return (self.voltage_gain, self.voltage_offset, self.current_gain, self.current_offset) == (1.0, 0.0, 1.0, 0.0)


@dataclass(kw_only=True)
class SensorConfig:
    name: str = key(min_len=1, max_len=64, check=line_protocol_safe)
    bus: str = key(min_len=1)
    address: int = key(ge=1, le=247, fix="Modbus addresses are 1 to 247")
    model: str = key("pzem017", check=_known_model)
    shunt_a: int | None = key(None, check=_known_shunt)  # a model with shunt codes; None = leave the meter as it is
    tags: dict[str, str] = key(factory=dict, check=_tags)
    calibration: Calibration = key(factory=Calibration)
    enabled: bool = True

    custom: Model | None = field(default=None, metadata=INTERNAL, repr=False)   # from [models.NAME]

    @property
    def meter(self) -> Model:
        return self.custom or MODELS[self.model]


@dataclass(kw_only=True)
class PollerConfig:
    interval_s: float = key(5.0, ge=0, le=3600)
    apply_shunt_codes: bool = False
    settle_s: float = key(3.0, ge=0, le=60)  # discard readings this long after a meter starts answering
    host: str = key("", check=_host_tag)  # the host tag; empty = this machine's hostname
    health_interval_s: float = key(60.0, ge=0, le=3600)  # 0 = do not write health points
    log_level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass(kw_only=True)
class SpoolConfig:
    path: str = key("var/spool.sqlite", min_len=1)  # relative paths are relative to the main config file's folder
    max_bytes: int = key(256 * 1024 * 1024, ge=1024 * 1024, le=2**40)
    max_age_days: float = key(365.0, gt=0, le=36500)
    durability: Literal["process", "power"] = "process"  # survive a kill / also survive power loss
    batch_lines: int = key(5000, ge=1, le=100_000)


@dataclass(kw_only=True)
class InfluxConfig:
    enabled: bool = True
    url: str = key("http://127.0.0.1:8086",
                   check=_url_checker("influxdb", "username", "influxdb.password_file or DCMON_INFLUXDB_PASSWORD"))
    api: Literal[1, 2] = 1
    # v1
    database: str = "dcmon"
    retention_policy: str = ""
    username: str = ""
    password: str = key("", secret=True)
    password_file: str = ""
    # v2 (also InfluxDB 3 and Cloud)
    org: str = ""
    bucket: str = ""
    token: str = key("", secret=True, check=_api_token)
    token_file: str = ""
    # common
    measurement: str = key("dc_power", check=line_protocol_safe)
    measurement_ac: str = key("ac_power", check=line_protocol_safe)
    health_measurement: str = key("dcmon_health", check=line_protocol_safe)
    timeout_s: float = key(10.0, gt=0, le=30)  # ≤ 30 s: a hung write must not outlast the systemd watchdog
    verify_tls: bool = True
    ca_file: str = ""
    # `dcmon influx-setup` only (src/dcmon/influx_setup.py; InfluxDB 1.x): retention and alert thresholds
    raw_days: float = key(90.0, ge=1, le=36500)       # raw readings kept this long (the raw retention policy)
    minute_days: float = key(730.0, ge=0, le=36500)   # the 1-minute series (retention policy dcmon_1m); 0 = forever
    hour_days: float = key(0.0, ge=0, le=36500)       # the 1-hour series (retention policy dcmon_1h); 0 = forever
    low_voltage_v: dict[str, float] = key(factory=dict)  # sensor name → alert below this voltage
    timezone: str = ""                         # IANA zone where the dashboards' days start; "" = this machine's

    def check(self) -> None:
        if not self.enabled:
            return
        if self.api == 1 and not self.database:
            raise Invalid("must not be empty with api = 1", "name the database", loc=("database",))
        if self.api == 2:
            for k in ("bucket", "org"):
                if not getattr(self, k):
                    raise Invalid("is required with api = 2", f"set influxdb.{k} (api = 2 needs bucket, org and a token)",
                                  loc=(k,), because=("api",))
            if not (self.token or self.token_file):
                raise Invalid("is required with api = 2", "set DCMON_INFLUXDB_TOKEN, or influxdb.token_file",
                              loc=("token",), because=("api",))


@dataclass(kw_only=True)
class GrafanaConfig:
    url: str = key("http://127.0.0.1:3000",
                   check=_url_checker("grafana", "username", "DCMON_GRAFANA_PASSWORD or config.local.toml"))
    username: str = "admin"
    password: str = key("", secret=True)
    token: str = key("", secret=True, check=_api_token)  # a service-account token; used instead of username/password
    folder: str = "DC monitoring"   # "" = the General folder


@dataclass(kw_only=True)
class MqttConfig:
    """``[mqtt]``: MQTT with Home Assistant discovery (docs/home-assistant.md). The keys' values are checked by
    ``dcmon.outputs.mqtt.MqttSettings.from_dict`` (URL, topic prefixes, TLS files, the password file, ranges),
    the one validator of this table, called by ``load`` (``_output_settings``); this table only gives the keys,
    their types and defaults (tests/test_config.py keeps the defaults equal to MqttSettings'), so the file, the
    DCMON_MQTT_* environment and "did you mean" work as for every table."""

    enabled: bool = False
    url: str = "mqtt://localhost:1883"
    username: str = ""
    password: str = key("", secret=True)
    password_file: str = ""
    client_id: str = ""
    ca_file: str = ""
    certfile: str = ""
    keyfile: str = ""
    qos: int = 1
    topic_prefix: str = "dcmon"
    discovery: bool = True
    discovery_prefix: str = "homeassistant"
    retain_state: bool = True
    stream: bool = False
    timeout_s: float = 10.0
    settings: Any = field(default=None, metadata=INTERNAL, repr=False)   # MqttSettings, set by load()


@dataclass(kw_only=True)
class HttpConfig:
    """``[http]``: the local HTTP endpoint (docs/http.md). Checked by ``dcmon.outputs.http.HttpSettings.from_dict``,
    as [mqtt] is by its output's settings."""

    enabled: bool = False
    listen: str = "127.0.0.1:9917"
    username: str = ""
    password_hash: str = ""
    page: bool = True
    settings: Any = field(default=None, metadata=INTERNAL, repr=False)   # HttpSettings, set by load()


# ------------------------------------------------------------------ user-defined register tables

MAX_BLOCK = 125   # registers one Modbus read may ask for


@dataclass(kw_only=True)
class FieldConfig:
    """One value of a user-defined model: ``[[models.NAME.fields]]``."""

    name: str = key(min_len=1, max_len=64, check=line_protocol_safe)
    register: int = key(ge=0, le=0xFFFF, fix="a register address 0 to 65535 (0x0000 to 0xFFFF)")
    type: Literal["u16", "s16", "u32", "s32", "f32", "alarm"] = "u16"
    word_order: Literal["high_first", "low_first"] = "high_first"
    scale: float = key(1.0, gt=0, fix="what one count is worth, e.g. 0.1 for a register in tenths")
    unit: str = ""
    resolution: float = key(0.0, ge=0)

    def check(self) -> None:
        if self.name in ("calibrated", "energy_reset", "time"):
            raise Invalid(f"field name {self.name!r} is set by dcmon itself", "pick another name", loc=("name",))

    @property
    def words(self) -> int:
        return REG_TYPES[self.type, self.word_order].words


@dataclass(kw_only=True)
class ModelConfig:
    """A meter nobody here has seen, as a register table: ``[models.NAME]`` (docs/custom-meters.md)."""

    title: str = ""                                    # for people; default: the NAME
    measurement: str = key(min_len=1, check=line_protocol_safe)
    function: Literal["input", "holding"] = "input"
    baudrate: int = key(9600, choices=(1200, 2400, 4800, 9600, 14400, 19200, 38400, 57600, 115200))
    bytesize: Literal[7, 8] = 8
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    max_voltage_v: float = key(0.0, ge=0)              # 0: no range check on voltage_v / current_a
    max_current_a: float = key(0.0, ge=0)
    fields: list[FieldConfig] = key(factory=list)
    name: str = field(default="", metadata=INTERNAL)   # the NAME of [models.NAME]

    def check(self) -> None:
        if not self.fields:
            raise Invalid("has no fields", "add [[models.NAME.fields]] tables: name, register, type, scale",
                          loc=("fields",))
        seen: dict[str, int] = {}
        taken: dict[int, str] = {}
        for i, f in enumerate(self.fields):
            if f.name in seen:
                raise Invalid(f"field name {f.name!r} is used twice", "give each field its own name",
                              loc=("fields", i, "name"))
            seen[f.name] = i
            for r in range(f.register, f.register + f.words):
                if r in taken:
                    raise Invalid(f"register 0x{r:04X} is already field {taken[r]!r}",
                                  "check the register addresses against the manual", loc=("fields", i, "register"))
                taken[r] = f.name
        span = max(taken) - min(taken) + 1
        if span > MAX_BLOCK:
            raise Invalid(f"the fields span {span} registers; one Modbus read takes at most {MAX_BLOCK}",
                          "keep the fields within 125 registers", loc=("fields",))

    def model(self) -> Model:
        """The register table, as the built-in models are written."""
        start = min(f.register for f in self.fields)
        end = max(f.register + f.words for f in self.fields)
        return Model(
            name=self.name, title=self.title or self.name, kind="dc",
            serial=SerialDefaults(baudrate=self.baudrate, bytesize=self.bytesize, parity=self.parity,
                                  stopbits=self.stopbits),
            input_start=start, input_count=end - start,
            inputs=tuple(Register(f.register, f.name, REG_TYPES[f.type, f.word_order], f.scale, unit=f.unit,
                                  resolution=f.resolution) for f in self.fields),
            has_reset_energy=False, max_current_a=self.max_current_a, max_voltage_v=self.max_voltage_v,
            function=self.function, measurement=self.measurement)


REG_TYPES: dict[tuple[str, str], WordType] = {
    ("u16", "high_first"): RegType.U16, ("u16", "low_first"): RegType.U16,
    ("s16", "high_first"): RegType.S16, ("s16", "low_first"): RegType.S16,
    ("alarm", "high_first"): RegType.ALARM_U16, ("alarm", "low_first"): RegType.ALARM_U16,
    ("u32", "high_first"): RegType.U32_HIGH_WORD_FIRST, ("u32", "low_first"): RegType.U32_LOW_WORD_FIRST,
    ("s32", "high_first"): RegType.S32_HIGH_WORD_FIRST, ("s32", "low_first"): RegType.S32_LOW_WORD_FIRST,
    ("f32", "high_first"): RegType.F32_HIGH_WORD_FIRST, ("f32", "low_first"): RegType.F32_LOW_WORD_FIRST,
}


def _bits_per_char(b: BusConfig, stopbits: int) -> int:
    return 1 + b.bytesize + (b.parity != "N") + stopbits


@dataclass(kw_only=True)
class Config:
    poller: PollerConfig = key(factory=PollerConfig)
    spool: SpoolConfig = key(factory=SpoolConfig)
    influxdb: InfluxConfig = key(factory=InfluxConfig)
    grafana: GrafanaConfig = key(factory=GrafanaConfig)
    mqtt: MqttConfig = key(factory=MqttConfig)
    http: HttpConfig = key(factory=HttpConfig)
    buses: dict[str, BusConfig] = key(factory=dict)
    sensors: list[SensorConfig] = key(factory=list)
    models: dict[str, ModelConfig] = key(factory=dict)   # user-defined register tables
    batteries: list[BatterySettings] = key(factory=list)  # [[batteries]]: dcmon.battery, docs/battery.md

    # where it came from (not part of the file format)
    source: str = field(default="", metadata=INTERNAL)
    base_dir: str = field(default="", metadata=INTERNAL)
    origins: list[str] = field(default_factory=list, metadata=INTERNAL)    # what was merged, for describe()
    source_of: Callable[[Loc], str] = field(default=lambda loc: "", metadata=INTERNAL, repr=False)

    def check(self) -> None:
        custom = self._custom_models()
        for i, s in enumerate(self.sensors):
            if s.model in custom:
                s.custom = custom[s.model]
            elif s.model not in MODELS:
                raise Invalid("unknown model", f"use one of {', '.join([*MODELS, *custom])}, or define it in a "
                              f"[models.{s.model}] table", loc=("sensors", i, "model"))
        for name, bus in self.buses.items():
            bus.name = name
            try:
                line_protocol_safe(name)
            except Invalid as e:
                raise e.at(("buses", name)) from None
        names: set[str] = set()
        used: set[tuple[str, int]] = set()
        for i, s in enumerate(self.sensors):
            if s.name in names:
                raise Invalid(f"sensor name {s.name!r} is used twice", "give each sensor its own name", loc=("sensors", i, "name"))
            names.add(s.name)
            if s.bus not in self.buses:
                known = ", ".join(self.buses) or "none defined"
                raise Invalid(f"no bus named {s.bus!r} (buses: {known})", "add a [buses.NAME] table or fix the name",
                              loc=("sensors", i, "bus"))
            if (s.bus, s.address) in used:
                raise Invalid(f"address {s.address} is used twice on bus {s.bus!r}",
                              "give each meter on a bus its own address (dcmon set-address)", loc=("sensors", i, "address"))
            used.add((s.bus, s.address))
            if s.shunt_a is not None and not s.meter.shunt_codes:
                raise Invalid(f"{s.meter.title} has no shunt setting", "remove shunt_a for this sensor", loc=("sensors", i, "shunt_a"))
            if s.shunt_a is not None and s.shunt_a not in s.meter.shunt_codes:
                raise Invalid(f"the {s.meter.title} has shunt codes for {', '.join(map(str, s.meter.shunt_amps_set))} A only",
                              "use one of those", loc=("sensors", i, "shunt_a"))
        for name, bus in self.buses.items():
            on_bus = [s for s in self.sensors if s.bus == name]
            stop = {s.meter.serial.stopbits for s in on_bus}
            if len(stop) > 1:
                raise Invalid("mixes 8N1 meters (PZEM-004T/014/016) and 8N2 meters (PZEM-003/017)",
                              "put AC and DC meters on separate RS485 adapters", loc=("buses", name))
            if bus.stopbits is not None and stop and bus.stopbits not in stop:
                raise Invalid(f"{bus.stopbits} does not match the meters on this bus ({stop.pop()})",
                              "remove stopbits to use the meters' own framing", loc=("buses", name, "stopbits"))
            self._check_timing(name, bus, [s.meter for s in on_bus] or list(MODELS.values()))
        check_batteries(self.batteries, [s.name for s in self.sensors])

    def _custom_models(self) -> dict[str, Model]:
        out: dict[str, Model] = {}
        for name, m in self.models.items():
            if _model_name(name) in MODELS:
                raise Invalid(f"{name!r} is a built-in model", "give the table another name", loc=("models", name))
            if _model_name(name) != name:
                raise Invalid("must be lower case letters and digits", f"name it [models.{_model_name(name)}]",
                              loc=("models", name))
            m.name = name
            out[name] = m.model()
        return out

    def _check_timing(self, name: str, b: BusConfig, models: list[Model]) -> None:
        """What a real RS485 line needs at this baud rate: Modbus RTU's 3.5-character silence between frames
        (1.75 ms above 19200 baud), and a timeout no shorter than a request and the longest reply on the wire."""
        char_s = _bits_per_char(b, self.stopbits(name)) / b.baudrate
        min_gap = 3.5 * char_s if b.baudrate <= 19200 else 0.00175
        if b.gap_s < min_gap * 0.999:
            raise Invalid(f"{b.gap_s:g} s is below the 3.5-character silence Modbus RTU needs at {b.baudrate} baud",
                          f"at least {math.ceil(min_gap * 1e4) / 1e4:g} s; 0.02 suits slow adapters",
                          loc=("buses", name, "gap_s"))
        reply = max(5 + 2 * m.input_count for m in models)
        min_timeout = (REQUEST_BYTES + reply) * char_s
        if b.timeout_s < min_timeout:
            raise Invalid(f"{b.timeout_s:g} s is shorter than a request and its {reply}-byte reply take on the wire "
                          f"at {b.baudrate} baud", f"at least {math.ceil(min_timeout * 1e3) / 1e3:g} s; 0.5 is the default",
                          loc=("buses", name, "timeout_s"))

    def stopbits(self, bus: str) -> int:
        b = self.buses[bus]
        if b.stopbits is not None:
            return b.stopbits
        for s in self.sensors:
            if s.bus == bus:
                return s.meter.serial.stopbits
        return 2

    def bus_settings(self, bus: str) -> BusSettings:
        """The serial settings of one configured bus, its framing resolved (``stopbits``)."""
        from .bus import BusSettings  # here, not at the top: pymodbus is heavy and most commands never need it

        b = self.buses[bus]
        return BusSettings(name=bus, port=b.port, baudrate=b.baudrate, bytesize=b.bytesize, parity=b.parity,
                           stopbits=self.stopbits(bus), timeout_s=b.timeout_s, retries=b.retries, gap_s=b.gap_s)

    def resolve(self, path: str) -> Path:
        """A path from the config, relative to the main config file's folder."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else Path(self.base_dir or ".") / p

    @property
    def host(self) -> str:
        return self.poller.host or socket.gethostname()

    def enabled_sensors(self, bus: str | None = None) -> list[SensorConfig]:
        return [s for s in self.sensors if s.enabled and (bus is None or s.bus == bus)]

    # ---- what `run` needs beyond a valid file (checked by `run` and `check-config` before any I/O)

    def require_sensors(self) -> None:
        if not self.enabled_sensors():
            problem = f"all {len(self.sensors)} sensors are disabled" if self.sensors else "no sensors: nothing to poll"
            raise ConfigError(self.source, "sensors", problem,
                              'add a [buses.NAME] table with port = "/dev/ttyUSB0" and a [[sensors]] table with '
                              'name, bus and address (see config.toml in the project and docs/configuration.md)')

    def check_spool(self) -> None:
        """The spool's file can be created or written, and its folder too (SQLite writes -wal/-shm beside it)."""
        p = self.resolve(self.spool.path)
        where = self.source_of(("spool", "path")) or self.source
        user = _user()

        def fail(problem: str, fix: str = "") -> None:
            raise ConfigError(where, "spool.path", problem, fix or
                              f"run as the service's user (sudo -u dcmon ...), or set spool.path to a file {user} can write")
        try:
            st = os.stat(p)
        except (FileNotFoundError, NotADirectoryError):
            st = None
        except PermissionError:
            fail(f"{p}: permission denied for user {user}")
        if st is not None:
            if stat.S_ISDIR(st.st_mode):
                fail(f"{p} is a folder", f"name a file in it, e.g. {p / 'spool.sqlite'}")
            if not os.access(p, os.R_OK | os.W_OK):
                fail(f"{p} is not writable by user {user}")
        folder = p.parent
        while True:
            try:
                st = os.stat(folder)
                break
            except FileNotFoundError:
                folder = folder.parent
            except (NotADirectoryError, PermissionError) as e:
                fail(f"{folder}: {(e.strerror or str(e)).lower()} for user {user}")
        if not stat.S_ISDIR(st.st_mode):
            fail(f"{folder} is a file, not a folder", "fix spool.path")
        if not os.access(folder, os.W_OK | os.X_OK):
            fail(f"{folder} is not writable by user {user}")

    def outputs_enabled(self) -> list[str]:
        """The enabled outputs, each with where it goes (never a secret), for describe()."""
        out = []
        if self.influxdb.enabled:
            out.append("InfluxDB")
        if self.mqtt.enabled:
            m = self.mqtt.settings
            url = m.url if m is not None else self.mqtt.url
            out.append(f"MQTT {url}" + (f" (stream of every reading, spool {self.mqtt_spool_path()})"
                                        if self.mqtt.stream else ""))
        if self.http.enabled:
            out.append(f"HTTP http://{self.http.listen}/")
        return out or ["none (readings stay in the spool)"]

    def mqtt_spool_path(self) -> Path:
        """The MQTT stream's own spool, beside spool.path (one spool per durable output)."""
        main = self.resolve(self.spool.path)
        return main.with_name(f"{main.stem}-mqtt{main.suffix}")

    def describe(self) -> list[str]:
        """What is in use, for `dcmon check-config` and the poller's first log lines (never a secret)."""
        ix = self.influxdb
        target = (f"bucket {ix.bucket!r}, org {ix.org!r}" if ix.api == 2 else
                  f"database {ix.database!r}" + (f", retention policy {ix.retention_policy!r}" if ix.retention_policy else ""))
        sensors = self.enabled_sensors()
        buses = dict.fromkeys(s.bus for s in sensors)
        return [
            f"configuration: {' + '.join(self.origins) or self.source} (dcmon {__version__})",
            f"InfluxDB: {ix.url} (api {ix.api}), {target}" if ix.enabled else "InfluxDB: disabled (influxdb.enabled = false)",
            f"spool: {self.resolve(self.spool.path)}",
            f"{len(sensors)} sensor(s) on {len(buses)} bus(es): "
            + ", ".join(f"{b} {self.buses[b].port} ({len(self.enabled_sensors(b))})" for b in buses),
            "outputs: " + ", ".join(self.outputs_enabled()),
        ] + [self._describe_battery(b) for b in self.batteries]

    def _describe_battery(self, b: BatterySettings) -> str:
        off = {s.name for s in self.sensors if not s.enabled}
        parts = [f"{k} {', '.join(n + (' (disabled)' if n in off else '') for n in getattr(b, k))}"
                 for k in ("charge", "discharge", "battery_cable") if getattr(b, k)]
        return (f"battery {b.name}: {b.capacity_ah:g} Ah {b.nominal_v:g} V {b.chemistry}, " + "; ".join(parts)
                + ("" if b.can_count else " (no state of charge: see docs/battery.md)"))


# --------------------------------------------------------------------------------------------- loader

def local_path_for(path: Path) -> Path:
    return path.with_name(path.stem + ".local" + path.suffix)


def _user() -> str:
    """Who we run as (not $USER: under sudo -u or setpriv that still names the caller)."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _group_of(path: Path) -> str:
    """The group that may read ``path`` (the installed layout: root:dcmon), from the first stat that works."""
    for p in (path, *path.parents):
        try:
            gid = os.stat(p).st_gid
        except OSError:
            continue
        if gid != 0:
            try:
                return grp.getgrgid(gid).gr_name
            except KeyError:
                return str(gid)
    return "dcmon"


def permission_fix(path: Path) -> str:
    g = _group_of(path)
    return f"run with sudo, join the group {g} (sudo adduser {_user()} {g}, then log in again), or pass --config FILE"


def _exists(p: Path) -> bool:
    """Never raises: a file we may not even look at counts as there (reading it then says so)."""
    try:
        os.stat(p)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True
    return True


def _read_toml(path: Path) -> dict[str, Any]:
    name = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(name, "", "file not found", "pass --config FILE, set DCMON_CONFIG, or copy config.toml "
                                                      "from the project") from None
    except IsADirectoryError:
        raise ConfigError(name, "", "is a folder, not a file", f"give the file, e.g. --config {path / 'config.toml'}") from None
    except PermissionError:
        raise ConfigError(name, "", f"permission denied for user {_user()}", permission_fix(path)) from None
    except OSError as e:
        raise ConfigError(name, "", f"cannot read: {e.strerror}", "check the file and its folder") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(name, "", f"line {line} is not UTF-8 text", "save the file as UTF-8") from None
    try:
        return tomllib.loads(text.removeprefix("\ufeff"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(name, "", f"not valid TOML: {e}", "fix the syntax at that line") from None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def env_keys() -> dict[str, tuple[str, str]]:
    """Every environment variable dcmon reads: DCMON_<SECTION>_<KEY> → (section, key), for every scalar key of
    every section table of Config."""
    out = {}
    for section in keys(Config):
        tp = hint(Config, section)
        if is_table(tp):
            for k in keys(tp):
                if is_scalar(hint(tp, k)):
                    out[f"{ENV_PREFIX}{section.upper()}_{k.upper()}"] = (section, k)
    return out


def _has_key(data: dict[str, Any], loc: Loc) -> bool:
    cur: Any = data
    for part in loc:
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and isinstance(part, int) and part < len(cur):
            cur = cur[part]
        else:
            return False
    return True


def loc_text(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def load(path: str | os.PathLike[str], *, local: str | os.PathLike[str] | None = None,
         env: dict[str, str] | None = None, cli: dict[str, tuple[str, Any]] | None = None) -> Config:
    """Load, merge and validate. ``cli`` maps a dotted key to (option, value), e.g.
    ``{"poller.interval_s": ("--interval", 2.0)}``. Raises ConfigError (one line) on any problem."""
    main = Path(path).absolute()
    data = _read_toml(main)
    origins = [str(main)]
    local_p = Path(local).absolute() if local is not None else local_path_for(main)
    local_data: dict[str, Any] = {}
    if _exists(local_p):
        local_data = _read_toml(local_p)
        data = _merge(data, local_data)
        origins.append(str(local_p))
    origin: dict[Loc, str] = {}
    environ = dict(os.environ) if env is None else env
    for var, (section, k) in env_keys().items():
        if var in environ:
            data = _merge(data, {section: {k: EnvText(environ[var])}})
            origin[(section, k)] = f"environment {var}"
            origins.append(var)
    for dotted, (option, value) in (cli or {}).items():
        section, k = dotted.split(".")
        data = _merge(data, {section: {k: value}})
        origin[(section, k)] = f"command line {option}"
        origins.append(option)

    def source_of(loc: Loc) -> str:
        for i in range(len(loc), 0, -1):
            if loc[:i] in origin:
                return origin[loc[:i]]
        return str(local_p) if local_data and _has_key(local_data, loc) else str(main)

    try:
        cfg: Config = parse(Config, data)
    except Invalid as e:
        raise ConfigError(source_of(e.because or e.loc), loc_text(e.loc), e.problem,
                          e.fix or "see docs/configuration.md") from None
    cfg.source, cfg.base_dir, cfg.origins, cfg.source_of = str(main), str(main.resolve().parent), origins, source_of
    _read_secret_files(cfg)
    _check_ca_file(cfg)
    _output_settings(cfg, data)
    return cfg


def table_values(table: object) -> dict[str, Any]:
    """A table's keys and values (not the loader's internal fields), as a from_dict validator takes them."""
    return {f.name: getattr(table, f.name) for f in dataclasses.fields(table)  # type: ignore[arg-type]
            if not rule_of(f).internal}


def _output_settings(cfg: Config, data: dict[str, Any]) -> None:
    """Validate [mqtt] and [http] with their outputs' own validators (imported only when the table is used:
    paho and prometheus_client are not part of every command's start-up)."""
    for section in ("mqtt", "http"):
        table = getattr(cfg, section)
        if not table.enabled and not data.get(section):
            continue
        values = table_values(table)
        try:
            if section == "mqtt":
                from .outputs.mqtt import MqttSettings

                table.settings = MqttSettings.from_dict(values, cfg.source_of((section,)), base_dir=cfg.base_dir)
            else:
                from .outputs.http import HttpSettings

                table.settings = HttpSettings.from_dict(values, cfg.source_of((section,)))
        except ConfigError as e:
            where = cfg.source_of(tuple(e.key.split(".")[:2])) if e.key else e.file
            raise ConfigError(where, e.key, e.problem, e.fix) from None


def _read_secret_files(cfg: Config) -> None:
    ix = cfg.influxdb
    for secret, file_key in (("token", "token_file"), ("password", "password_file")):
        fname = getattr(ix, file_key)
        if getattr(ix, secret) or not fname:
            continue
        p = cfg.resolve(fname)
        where, k = cfg.source_of(("influxdb", file_key)), f"influxdb.{file_key}"
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            raise ConfigError(where, k, f"{p} does not exist", f"create it with the {secret} on its first line") from None
        except IsADirectoryError:
            raise ConfigError(where, k, f"{p} is a folder", f"name the file holding the {secret}") from None
        except PermissionError:
            raise ConfigError(where, k, f"{p}: permission denied for user {_user()}", permission_fix(p)) from None
        except OSError as e:
            raise ConfigError(where, k, f"cannot read {p}: {e.strerror}", "check the file") from None
        try:
            lines = raw.decode("utf-8").removeprefix("\ufeff").splitlines()
        except UnicodeDecodeError:
            raise ConfigError(where, k, f"{p} is not UTF-8 text", f"write the {secret} as plain text on its first line") from None
        value = lines[0].strip() if lines else ""
        if not value:
            raise ConfigError(where, k, f"{p} is empty", f"put the {secret} on its first line")
        if secret == "token":
            try:
                _api_token(value)
            except Invalid as e:
                raise ConfigError(where, k, f"the token in {p} {e.problem}", e.fix) from None
        setattr(ix, secret, value)
        cfg.origins.append(f"{secret} from {p}")


def _check_ca_file(cfg: Config) -> None:
    ix = cfg.influxdb
    if not ix.ca_file:
        return
    p = cfg.resolve(ix.ca_file)
    where, k = cfg.source_of(("influxdb", "ca_file")), "influxdb.ca_file"
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise ConfigError(where, k, f"{p} does not exist", "give the CA bundle's path (PEM)") from None
    except OSError as e:
        raise ConfigError(where, k, f"{p}: {e.strerror}", permission_fix(p)) from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(where, k, f"{p} is not a file", "give the CA bundle's path (PEM)")
    if not os.access(p, os.R_OK):
        raise ConfigError(where, k, f"{p}: permission denied for user {_user()}", permission_fix(p))
    import ssl  # only here: most configurations have no ca_file

    try:
        ssl.create_default_context(cafile=str(p))
    except (ssl.SSLError, ValueError, UnicodeDecodeError):
        raise ConfigError(where, k, f"{p} holds no PEM certificate", "give the CA bundle (-----BEGIN CERTIFICATE-----)") from None
    ix.ca_file = str(p)
