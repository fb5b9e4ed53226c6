# The pydantic configuration model as it was before it was replaced (commit e00e206, src/dcmon/config.py),
# unchanged but for its imports, kept ONLY for bench/bench_config.py to compare start-up against. dcmon never imports it.
# ruff: noqa
"""The one validated configuration model, and the loader.

Where each value comes from, lowest to highest precedence (documented in docs/configuration.md):

1. the defaults in this module;
2. ``config.toml`` (committed, commented) or the file given with ``--config``;
3. ``config.local.toml`` beside it (git-ignored: local overrides and secrets), merged key by key;
4. environment variables ``DCMON_<SECTION>_<KEY>`` for the scalar keys of the ``poller``, ``spool``,
   ``influxdb`` and ``grafana`` sections, e.g. ``DCMON_INFLUXDB_TOKEN``, ``DCMON_SPOOL_PATH``;
5. for a secret still empty after that: ``influxdb.token_file`` / ``influxdb.password_file``
   (first line of the file).

Everything is validated before any I/O. An invalid value gives one ConfigError naming the file, the key,
the problem and the fix. Unknown keys are errors: a typo must not pass silently.
"""

from __future__ import annotations

import difflib
import os
import socket
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dcmon.errors import ConfigError
from dcmon.models import MODELS, Model

if TYPE_CHECKING:
    from dcmon.bus import BusSettings

ENV_PREFIX = "DCMON_"
ENV_SECTIONS = ("poller", "spool", "influxdb", "grafana")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class BusConfig(_Strict):
    """One serial port with meters on it. Framing defaults come from the models on the bus."""

    name: str = ""
    port: str = Field(min_length=1)
    baudrate: int = Field(9600, gt=0)
    bytesize: Literal[7, 8] = 8
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] | None = None  # None: the models' own (PZEM DC 2, PZEM AC 1)
    timeout_s: float = Field(0.5, gt=0, le=10)
    retries: int = Field(1, ge=0, le=5)
    gap_s: float = Field(0.02, ge=0, le=5)  # silence kept between one reply and the next request


class Calibration(_Strict):
    """Per-sensor correction: value = raw × gain + offset (from `dcmon calibrate`)."""

    voltage_gain: float = Field(1.0, gt=0.5, lt=1.5)
    voltage_offset: float = 0.0
    current_gain: float = Field(1.0, gt=0.5, lt=1.5)
    current_offset: float = 0.0

    @property
    def is_identity(self) -> bool:
        return (self.voltage_gain, self.voltage_offset, self.current_gain, self.current_offset) == (1.0, 0.0, 1.0, 0.0)


class SensorConfig(_Strict):
    name: str = Field(min_length=1, max_length=64)
    bus: str = Field(min_length=1)
    address: int = Field(ge=1, le=247)
    model: str = "pzem017"
    shunt_a: Literal[50, 100, 200, 300] | None = None  # PZEM-017 only; None = leave the meter as it is
    tags: dict[str, str] = Field(default_factory=dict)
    calibration: Calibration = Field(default_factory=Calibration)
    enabled: bool = True

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        v = v.lower().replace("-", "").replace("_", "")
        if v not in MODELS:
            raise ValueError(f"unknown model; use one of {', '.join(MODELS)}")
        return v

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: dict[str, str]) -> dict[str, str]:
        reserved = {"sensor", "model", "address", "bus", "host"}
        clash = reserved & set(v)
        if clash:
            raise ValueError(f"tag names {sorted(clash)} are set by dcmon itself; pick other names")
        for k, val in v.items():
            if not k or not val:
                raise ValueError("tag names and values must not be empty")
        return v

    @property
    def meter(self) -> Model:
        return MODELS[self.model]


class PollerConfig(_Strict):
    interval_s: float = Field(5.0, ge=0, le=3600)
    apply_shunt_codes: bool = False
    settle_s: float = Field(3.0, ge=0, le=60)  # discard readings this long after a meter starts answering
    host: str = ""  # the host tag; empty = this machine's hostname
    health_interval_s: float = Field(60.0, ge=0, le=3600)  # 0 = do not write health points
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class SpoolConfig(_Strict):
    path: str = "var/spool.sqlite"  # relative paths are relative to the main config file's folder
    max_bytes: int = Field(256 * 1024 * 1024, ge=1024 * 1024)
    max_age_days: float = Field(365.0, gt=0)
    durability: Literal["process", "power"] = "process"  # survive a kill / also survive power loss
    batch_lines: int = Field(5000, ge=1, le=100_000)


class InfluxConfig(_Strict):
    enabled: bool = True
    url: str = "http://127.0.0.1:8086"
    api: Literal[1, 2] = 1
    # v1
    database: str = "dcmon"
    retention_policy: str = ""
    username: str = ""
    password: str = ""
    password_file: str = ""
    # v2 (also InfluxDB 3 and Cloud)
    org: str = ""
    bucket: str = ""
    token: str = ""
    token_file: str = ""
    # common
    measurement: str = Field("dc_power", min_length=1)
    measurement_ac: str = Field("ac_power", min_length=1)
    health_measurement: str = Field("dcmon_health", min_length=1)
    timeout_s: float = Field(10.0, gt=0, le=30)  # ≤ 30 s: a hung write must not outlast the systemd watchdog
    verify_tls: bool = True
    ca_file: str = ""

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _v2_needs_bucket(self) -> InfluxConfig:
        if self.enabled and self.api == 2 and not self.bucket:
            raise ValueError("api = 2 needs bucket (and org, and a token)")
        return self


class GrafanaConfig(_Strict):
    url: str = "http://127.0.0.1:3000"
    username: str = "admin"
    password: str = ""
    token: str = ""  # a service-account token; used instead of username/password when set
    folder: str = "DC monitoring"


class Config(_Strict):
    poller: PollerConfig = Field(default_factory=PollerConfig)
    spool: SpoolConfig = Field(default_factory=SpoolConfig)
    influxdb: InfluxConfig = Field(default_factory=InfluxConfig)
    grafana: GrafanaConfig = Field(default_factory=GrafanaConfig)
    buses: dict[str, BusConfig] = Field(default_factory=dict)
    sensors: list[SensorConfig] = Field(default_factory=list)

    # where it came from (not part of the file format)
    source: str = Field("", exclude=True)
    base_dir: str = Field("", exclude=True)

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        for name, bus in self.buses.items():
            bus.name = name
        names: set[str] = set()
        used: set[tuple[str, int]] = set()
        for i, s in enumerate(self.sensors):
            where = f"sensors[{i}]"
            if s.name in names:
                raise _CrossError(f"{where}.name", f"sensor name {s.name!r} is used twice", "give each sensor its own name")
            names.add(s.name)
            if s.bus not in self.buses:
                known = ", ".join(self.buses) or "none defined"
                raise _CrossError(f"{where}.bus", f"no bus named {s.bus!r} (buses: {known})", "add a [buses.NAME] table or fix the name")
            if (s.bus, s.address) in used:
                raise _CrossError(f"{where}.address", f"address {s.address} is used twice on bus {s.bus!r}",
                                  "give each meter on a bus its own address (dcmon set-address)")
            used.add((s.bus, s.address))
            if s.shunt_a is not None and not s.meter.shunt_codes:
                raise _CrossError(f"{where}.shunt_a", f"{s.meter.title} has no shunt setting", "remove shunt_a for this sensor")
        for name, bus in self.buses.items():
            on_bus = [s for s in self.sensors if s.bus == name]
            stop = {s.meter.serial.stopbits for s in on_bus}
            if len(stop) > 1:
                raise _CrossError(f"buses.{name}", "mixes 8N1 meters (PZEM-004T/014/016) and 8N2 meters (PZEM-003/017)",
                                  "put AC and DC meters on separate RS485 adapters")
            if bus.stopbits is not None and stop and bus.stopbits not in stop:
                raise _CrossError(f"buses.{name}.stopbits", f"{bus.stopbits} does not match the meters on this bus ({stop.pop()})",
                                  "remove stopbits to use the meters' own framing")
        return self

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
        from dcmon.bus import BusSettings  # here, not at the top: pymodbus is heavy and most commands never need it

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


class _CrossError(ValueError):
    def __init__(self, key: str, problem: str, fix: str) -> None:
        self.key, self.problem, self.fix = key, problem, fix
        super().__init__(problem)


# --------------------------------------------------------------------------------------------- loader

def local_path_for(path: Path) -> Path:
    return path.with_name(path.stem + ".local" + path.suffix)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(str(path), "", "file not found", "copy config.toml from the project or pass --config PATH") from None
    except PermissionError:
        raise ConfigError(str(path), "", "permission denied", "make it readable by the user that runs dcmon") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), "", f"not valid TOML: {e}", "fix the syntax at that line") from None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _env_overrides(env: dict[str, str]) -> tuple[dict[str, Any], dict[tuple[str, str], str]]:
    data: dict[str, Any] = {}
    origin: dict[tuple[str, str], str] = {}
    sections = {"poller": PollerConfig, "spool": SpoolConfig, "influxdb": InfluxConfig, "grafana": GrafanaConfig}
    for section, cls in sections.items():
        for key in cls.model_fields:
            var = f"{ENV_PREFIX}{section.upper()}_{key.upper()}"
            if var in env:
                data.setdefault(section, {})[key] = env[var]
                origin[(section, key)] = var
    return data, origin


def _has_key(data: dict[str, Any], loc: tuple[Any, ...]) -> bool:
    cur: Any = data
    for part in loc:
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and isinstance(part, int) and part < len(cur):
            cur = cur[part]
        else:
            return False
    return True


def _loc_text(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class of the table that ``loc`` points into (following dict keys and list indexes)."""
    model: Any = Config
    for part in loc:
        fld = model.model_fields.get(part) if isinstance(part, str) else None
        if fld is None:
            continue  # a [buses.NAME] key or a [[sensors]] index: same model as its container's items
        ann = fld.annotation
        inner = [a for a in (ann, *get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            return None
        model = inner[-1]
    return model


def _suggest(loc: tuple[Any, ...]) -> str:
    """For an unknown key: the closest known key of that table."""
    model = _model_at(loc[:-1])
    names = [n for n in (model.model_fields if model else {}) if n not in ("source", "base_dir")]
    close = difflib.get_close_matches(str(loc[-1]), names, n=1)
    return f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(names)}"


def load(path: str | os.PathLike[str], *, local: str | os.PathLike[str] | None = None,
         env: dict[str, str] | None = None) -> Config:
    """Load, merge and validate. Raises ConfigError (one line) on any problem."""
    main = Path(path)
    data = _read_toml(main)
    local_p = Path(local) if local is not None else local_path_for(main)
    local_data: dict[str, Any] = {}
    if local_p.exists():
        local_data = _read_toml(local_p)
        data = _merge(data, local_data)
    env_data, env_origin = _env_overrides(dict(os.environ) if env is None else env)
    data = _merge(data, env_data)

    def source_of(loc: tuple[Any, ...]) -> str:
        if len(loc) >= 2 and (loc[0], loc[1]) in env_origin:
            return f"environment {env_origin[(loc[0], loc[1])]}"
        if local_data and _has_key(local_data, loc):
            return str(local_p)
        return str(main)

    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        # a misspelt key also makes its real key "missing": name the typo, it is the cause
        err = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
        loc = tuple(err["loc"])
        ctx = err.get("ctx") or {}
        cross = ctx.get("error")
        if isinstance(cross, _CrossError):
            key_loc = tuple(int(p) if p.isdigit() else p for p in cross.key.replace("[", ".").replace("]", "").split("."))
            raise ConfigError(source_of(key_loc), cross.key, cross.problem, cross.fix) from None
        key = _loc_text(loc)
        if err["type"] == "extra_forbidden":
            raise ConfigError(source_of(loc), key, "unknown key", _suggest(loc)) from None
        if err["type"] == "missing":
            raise ConfigError(source_of(loc[:-1]), key, "is required", "add it") from None
        msg = err["msg"].removeprefix("Value error, ")
        given = err.get("input")
        given_txt = f" (got {given!r})" if isinstance(given, (str, int, float, bool)) and "token" not in key and "password" not in key else ""
        raise ConfigError(source_of(loc), key, msg + given_txt, "see docs/configuration.md") from None

    cfg.source = str(main)
    cfg.base_dir = str(main.resolve().parent)
    _read_secret_files(cfg, main)
    return cfg


def _read_secret_files(cfg: Config, main: Path) -> None:
    ix = cfg.influxdb
    for secret, file_key in (("token", "token_file"), ("password", "password_file")):
        fname = getattr(ix, file_key)
        if getattr(ix, secret) or not fname:
            continue
        p = cfg.resolve(fname)
        try:
            value = p.read_text(encoding="utf-8").splitlines()[0].strip() if p.stat().st_size else ""
        except OSError as e:
            raise ConfigError(str(main), f"influxdb.{file_key}", f"cannot read {p}: {e.strerror}",
                              "create the file or fix its permissions") from None
        if not value:
            raise ConfigError(str(main), f"influxdb.{file_key}", f"{p} is empty", f"put the {secret} on its first line")
        setattr(ix, secret, value)
