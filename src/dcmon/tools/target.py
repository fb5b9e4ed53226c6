"""The bench tools' shared layer: which bus, framing, model and address a command talks to (``Target``,
``resolve``), the options that say so (``target_parser``, ``meter_parser``), output for people (``say`` on
stdout, ``note`` on stderr, ``format_value``/``format_block``, ``Progress``) and ``handler``, which turns a
usage problem into exit status 2. Each command group is a module beside this one (scan, meter, calibrate,
spool, grafana) with its own ``add_commands``; they import this module, never each other.

Each command talks to one bus: a configured one (``--bus NAME``, or the sensor's with ``--sensor NAME``, or
the only one) or a port given directly (``--port PATH``, framing from ``--model`` unless
``--baudrate``/``--stopbits`` say otherwise). They use the same Bus (exclusive port: a running service is
reported, not fought) and the same meter operations as the poller. Output for people goes to stdout;
progress, prompts and notes to stderr, so stdout stays clean for scripts (``read --json``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TextIO

from .. import config as config_mod
from ..bus import BusSettings
from ..config import Config, SensorConfig
from ..errors import ConfigError, DeviceError, UsageError
from ..models import MODELS, PZEM017, FieldValue, Model, decimals

EXIT_INTERRUPTED = 130
STOP_FIRST = "It opens the serial port for itself: stop the service first (sudo systemctl stop dcmon)."

# ------------------------------------------------------------------------------------ the target

@dataclass
class Target:
    """Which port, framing, meter model and address a command talks to, and the sensor it is, if any."""

    settings: BusSettings
    model: Model
    address: int | None = None
    sensor: SensorConfig | None = None
    cfg: Config | None = None

    def where(self, address: int | None = None) -> str:
        a = self.address if address is None else address
        text = f"bus {self.settings.name!r} address {a}"
        return f"sensor {self.sensor.name!r} ({text})" if self.sensor and a == self.sensor.address else text


def parse_model(name: str) -> Model:
    key = name.lower().replace("-", "").replace("_", "")
    if key not in MODELS:
        raise argparse.ArgumentTypeError(f"unknown model {name!r}; use one of {', '.join(MODELS)}")
    return MODELS[key]


def parse_address(text: str) -> int:
    try:
        a = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an address: {text!r}") from None
    if not 1 <= a <= 247:
        raise argparse.ArgumentTypeError(f"address must be 1..247, not {a}")
    return a


def parse_range(text: str) -> range:
    try:
        lo_s, _, hi_s = text.partition("-")
        lo, hi = parse_address(lo_s), parse_address(hi_s or lo_s)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"range must look like 1-20: {e}") from None
    if lo > hi:
        raise argparse.ArgumentTypeError(f"range {text!r} is backwards; write {hi}-{lo}")
    return range(lo, hi + 1)


def positive(text: str) -> float:
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return v


def resolve(args: argparse.Namespace, *, need_address: bool, timeout_s: float | None = None,
            retries: int | None = None) -> Target:
    """Work out the target from the command line and (when it is needed) the config file.

    The config is read when a sensor is named or no ``--port`` is given. Framing: explicit options, then the
    configured bus, then the model's own (PZEM DC 8N2, AC 8N1)."""
    sensor_name = getattr(args, "sensor", None)
    port = getattr(args, "port", None)
    cfg = config_mod.load(args.config) if sensor_name or not port else None
    sensor = None
    if need_address and cfg is not None and not sensor_name and getattr(args, "address", None) is None:
        candidates = [s for s in cfg.enabled_sensors() if args.bus in (None, s.bus)]
        if len(candidates) == 1:  # nothing to choose between: do not ask
            sensor_name = candidates[0].name
            note(f"sensor {sensor_name!r}, the only one configured{' on bus ' + repr(args.bus) if args.bus else ''} "
                 f"in {cfg.source}")
    if sensor_name:
        assert cfg is not None
        sensor = next((s for s in cfg.sensors if s.name == sensor_name), None)
        if sensor is None:
            known = ", ".join(s.name for s in cfg.sensors) or "none defined"
            raise ConfigError(cfg.source, "sensors", f"no sensor named {sensor_name!r} (sensors: {known})",
                              "use one of those, or --address N")
        if getattr(args, "address", None) not in (None, sensor.address):
            raise UsageError(f"sensor {sensor.name!r} is at address {sensor.address}; give --sensor or --address, not both")

    bus_cfg = None
    if cfg is not None and not port:
        bus_name = sensor.bus if sensor else args.bus
        if sensor and args.bus and args.bus != sensor.bus:
            raise UsageError(f"sensor {sensor.name!r} is on bus {sensor.bus!r}, not {args.bus!r}")
        if bus_name is None:
            if len(cfg.buses) != 1:
                known = ", ".join(cfg.buses) or "none"
                raise UsageError(f"{len(cfg.buses)} buses are configured in {cfg.source} ({known}): choose one with "
                                 f"--bus NAME, or give --port PATH")
            bus_name = next(iter(cfg.buses))
        if bus_name not in cfg.buses:
            raise ConfigError(cfg.source, "buses", f"no bus named {bus_name!r} (buses: {', '.join(cfg.buses) or 'none'})",
                              "add a [buses.NAME] table or fix the name")
        bus_cfg = cfg.buses[bus_name]

    address = sensor.address if sensor else getattr(args, "address", None)
    if need_address and address is None:
        raise UsageError("which meter? give --sensor NAME (from the config) or --address N")

    if args.model is not None:
        model = args.model
    elif sensor is not None:
        model = sensor.meter
    else:
        on_bus = [s for s in (cfg.sensors if cfg and bus_cfg else []) if s.bus == bus_cfg.name]  # type: ignore[union-attr]
        same = [s for s in on_bus if s.address == address]
        model = (same or on_bus)[0].meter if (same or on_bus) else PZEM017

    if bus_cfg is not None:
        assert cfg is not None
        stopbits = args.stopbits or bus_cfg.stopbits or (model.serial.stopbits if args.model else cfg.stopbits(bus_cfg.name))
        settings = replace(cfg.bus_settings(bus_cfg.name), baudrate=args.baudrate or bus_cfg.baudrate,
                           stopbits=stopbits, timeout_s=timeout_s or args.timeout or bus_cfg.timeout_s,
                           retries=bus_cfg.retries if retries is None else retries)
    else:
        assert port  # no config was read, so a port was given
        settings = BusSettings(
            name=port, port=port, baudrate=args.baudrate or model.serial.baudrate,
            bytesize=model.serial.bytesize, parity=model.serial.parity,
            stopbits=args.stopbits or model.serial.stopbits,
            timeout_s=timeout_s or args.timeout or 0.5, retries=1 if retries is None else retries)
    return Target(settings=settings, model=model, address=address, sensor=sensor, cfg=cfg)


# ------------------------------------------------------------------------------------ formatting

_UNITS = (("_wh", "Wh"), ("_hz", "Hz"), ("_v", "V"), ("_a", "A"), ("_w", "W"))


def label_and_unit(name: str) -> tuple[str, str]:
    for suffix, unit in _UNITS:
        if name.endswith(suffix):
            return name[: -len(suffix)].replace("_", " "), unit
    return name.replace("_", " ").replace("high voltage", "high-voltage").replace("low voltage", "low-voltage"), ""


def format_value(model: Model, name: str, value: FieldValue) -> str:
    if isinstance(value, bool):
        return "ALARM" if value else "ok"
    reg = next((r for r in model.inputs if r.name == name), None)
    d = decimals(reg.scale) if reg else 2
    _, unit = label_and_unit(name)
    return f"{value:.{d}f} {unit}".rstrip()


def format_block(model: Model, values: dict[str, FieldValue], calibrated: dict[str, FieldValue] | None = None) -> list[str]:
    """One line per value, aligned; with a second column when a calibration applies."""
    lines = []
    for reg in model.inputs:
        label, _ = label_and_unit(reg.name)
        text = format_value(model, reg.name, values[reg.name])
        line = f"  {label:<20}{text:>13}"
        if calibrated is not None and calibrated.get(reg.name) != values[reg.name]:
            line += f"   calibrated {format_value(model, reg.name, calibrated[reg.name]):>12}"
        lines.append(line)
    return lines


def say(text: str, stream: TextIO | None = None) -> None:
    print(text, file=stream or sys.stdout, flush=True)


def next_tick(next_at: float, interval_s: float) -> float:
    """Sleep until the next tick of a schedule on the monotonic clock (``watch``'s refreshes); a tick that is
    already late starts the schedule again from now, rather than a burst of catch-up ticks. Returns the
    tick just reached."""
    next_at += interval_s
    delay = next_at - time.monotonic()
    if delay > 0:
        time.sleep(delay)
        return next_at
    return time.monotonic()


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Progress:
    """A dependency-free progress bar on stderr: redrawn in place on a terminal; on a pipe or log file, a
    plain line every 10 % instead (carriage returns make a mess of logs)."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None, width: int = 30) -> None:
        self.total, self.label, self.width = max(total, 1), label, width
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._last_decile = -1
        self._shown = False

    def update(self, done: int, current: int, found: int) -> None:
        frac = done / self.total
        if self.tty:
            n = int(frac * self.width)
            bar = "#" * n + "-" * (self.width - n)
            self.stream.write(f"\r{self.label} [{bar}] {done}/{self.total} address {current}, found {found}\x1b[K")
            self.stream.flush()
            self._shown = True
        else:
            decile = int(frac * 10)
            if decile != self._last_decile and done:
                self._last_decile = decile
                self.stream.write(f"{self.label}: {done}/{self.total} addresses, found {found}\n")
                self.stream.flush()

    def clear(self) -> None:
        """Wipe the bar so that a line printed next starts clean (stdout and stderr share the terminal)."""
        if self.tty and self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False



# ----------------------------------------------------------------------------------- the parser

WRONG_MODEL_HINT = ("the meter has no such register, so it is most likely another model than the one asked for "
                    "(--model, or the sensor's model in the config; `dcmon scan` tells DC and AC meters and the "
                    "PZEM-003 and -017 apart)")


def handler(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Usage problems found after parsing (which meter? which bus?) exit 2 like argparse's own. A meter that
    answers exception 02 (illegal data address) to a read is, on a bench, nearly always the wrong model."""
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except UsageError as e:
            note(f"dcmon {args.command}: {e}")
            return 2
        except DeviceError as e:
            if e.code == 2 and "model" not in str(e):
                raise DeviceError(f"{e}: {WRONG_MODEL_HINT}", code=e.code, bus=e.bus, address=e.address) from None
            raise
    run.__doc__ = fn.__doc__
    return run


def target_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("which bus (default: the config's only bus)")
    g.add_argument("--bus", metavar="NAME", help="a bus from the config ([buses.NAME])")
    g.add_argument("--port", metavar="PATH", help="a serial port instead of a configured bus, e.g. /dev/ttyUSB0")
    g.add_argument("--model", type=parse_model, metavar="MODEL",
                   help=f"meter model, for framing and registers: {', '.join(MODELS)} (default: the config's, or pzem017)")
    g.add_argument("--baudrate", type=int, help="override the framing's baud rate (PZEM: 9600)")
    g.add_argument("--stopbits", type=int, choices=(1, 2), help="override the stop bits (PZEM DC: 2, AC: 1)")
    g.add_argument("--timeout", type=positive, metavar="S", help="seconds to wait for each reply")
    return p


def meter_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("which meter")
    g.add_argument("--sensor", metavar="NAME", help="a sensor from the config (gives its bus, address and model)")
    g.add_argument("--address", type=parse_address, metavar="N", help="the meter's Modbus address (1..247)")
    return p


def examples(*lines: str) -> str:
    return "examples:\n" + "\n".join("  " + line for line in lines)
