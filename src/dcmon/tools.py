"""Bench tools: the commands a person runs while wiring and commissioning meters.

``scan``, ``set-address``, ``shunt get|set``, ``reset-energy``, ``read``, ``watch`` live here; ``calibrate``
and ``check-accuracy`` in ``tools_calibrate``. Each talks to one bus: a configured one (``--bus NAME``, or
the sensor's with ``--sensor NAME``, or the only one) or a port given directly (``--port PATH``, framing
from ``--model`` unless ``--baudrate``/``--stopbits`` say otherwise). They use the same Bus (exclusive
port: a running service is reported, not fought) and the same meter operations as the poller.

Output for people goes to stdout; progress, prompts and notes to stderr, so stdout stays clean for
scripts (``read --json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

from . import config as config_mod
from .bus import GENERAL_ADDRESS, Bus, BusSettings
from .calibration import apply_calibration
from .config import Config, SensorConfig
from .errors import BusError, ConfigError, DcmonError, DeviceError, MultipleMeters, NoResponse, UsageError
from .meter import read_block, read_shunt, read_shunt_code, read_values, set_shunt, write_setting
from .models import ADDRESS, MODELS, PZEM017, Family, FieldValue, Model, decimals, decode, families, shunt_amps
from .helptext import Formatter

SCAN_TIMEOUT_S = 0.1
GARBLED = "garbled reply: two meters at this address? connect one at a time"
EXIT_INTERRUPTED = 130


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


def _model(name: str) -> Model:
    key = name.lower().replace("-", "").replace("_", "")
    if key not in MODELS:
        raise argparse.ArgumentTypeError(f"unknown model {name!r}; use one of {', '.join(MODELS)}")
    return MODELS[key]


def _address(text: str) -> int:
    try:
        a = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an address: {text!r}") from None
    if not 1 <= a <= 247:
        raise argparse.ArgumentTypeError(f"address must be 1..247, not {a}")
    return a


def _range(text: str) -> range:
    try:
        lo_s, _, hi_s = text.partition("-")
        lo, hi = _address(lo_s), _address(hi_s or lo_s)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"range must look like 1-20: {e}") from None
    if lo > hi:
        raise argparse.ArgumentTypeError(f"range {text!r} is backwards; write {hi}-{lo}")
    return range(lo, hi + 1)


def _positive(text: str) -> float:
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


# ----------------------------------------------------------------------------------------- scan

@dataclass
class Found:
    """One address that answered, and what it seems to be."""

    address: int
    model: str
    shunt_a: int | None = None
    voltage_v: float | None = None
    current_a: float | None = None
    note: str = ""

    def line(self) -> str:
        shunt = f"{self.shunt_a} A" if self.shunt_a else "-"
        v = f"{self.voltage_v:.2f} V" if self.voltage_v is not None else "-"
        i = f"{self.current_a:.2f} A" if self.current_a is not None else "-"
        text = f"{self.address:>7}  {self.model:<24}{shunt:>7}{v:>12}{i:>11}"
        return f"{text}  {self.note}" if self.note else text


SCAN_HEADER = f"{'address':>7}  {'model':<24}{'shunt':>7}{'voltage':>12}{'current':>11}"


@dataclass
class ScanResult:
    found: list[Found] = field(default_factory=list)
    scanned: int = 0
    interrupted_at: int | None = None


def probe(bus: Bus, address: int, fams: list[Family] | None = None) -> Found | None:
    """Does a meter answer at ``address``, and which model is it?

    The guess rests on each model's probe signature (``models.families``): its input block. A meter refuses
    a longer read than its own block with exception 02, so the largest block is asked for first (PZEM AC:
    10 registers, DC: 8): an AC meter (PZEM-004T/014/016) answers 10, a DC one refuses and answers 8. In a
    family, a model with a shunt register (PZEM-017) is told from one without (PZEM-003) by reading it."""
    fams = families() if fams is None else fams
    for n, fam in enumerate(fams):
        first, last = n == 0, n == len(fams) - 1
        try:
            words = read_block(bus, fam.models[0], address)
        except NoResponse:
            if first:
                return None
            found = Found(address, fam.label, note="values unreadable (no answer)")
        except DeviceError as e:
            if e.code == 2 and not last:
                continue
            if first:
                return Found(address, "unknown", note=f"answered with exception {e.code}")
            found = Found(address, fam.label, note=f"values refused (exception {e.code})")
        except BusError:
            if first:
                return Found(address, "?", note=GARBLED)
            found = Found(address, fam.label, note=GARBLED)
        else:
            vals = decode(fam.models[0], words)
            found = Found(address, fam.label, voltage_v=_float(vals.get("voltage_v")),
                          current_a=_float(vals.get("current_a")))
        _identify(bus, address, fam, found)
        return found
    return None


def _float(v: FieldValue | None) -> float | None:
    return None if v is None else float(v)


def _identify(bus: Bus, address: int, fam: Family, found: Found) -> None:
    """Within a family: a model with a shunt register answers a read of it, one without refuses (02)."""
    shunted = [m for m in fam.models if m.shunt_setting is not None]
    plain = [m for m in fam.models if m.shunt_setting is None]
    if len(fam.models) == 1 and not shunted:
        found.model = fam.models[0].title
        return
    if not shunted:
        return
    try:
        found.shunt_a = read_shunt(bus, shunted[0], address)
        found.model = shunted[0].title
        if found.shunt_a is None:
            found.note = "unknown shunt code"
    except DeviceError as e:
        if e.code == 2 and len(plain) == 1:
            found.model = plain[0].title  # no current-range register (PZEM-003: internal 10 A shunt)
    except BusError:
        pass


def scan(bus: Bus, addresses: Iterable[int], *, progress: Progress | None = None,
         on_found: Callable[[Found], None] | None = None) -> ScanResult:
    """Probe each address in turn. Ctrl-C stops it cleanly: the result says where, and keeps what was found."""
    res = ScanResult()
    addrs = list(addresses)
    try:
        for n, a in enumerate(addrs, 1):
            if progress:
                progress.update(n - 1, a, len(res.found))
            f = probe(bus, a)
            res.scanned = n
            if f is not None:
                res.found.append(f)
                if progress:
                    progress.clear()
                if on_found:
                    on_found(f)
        if progress:
            progress.update(len(addrs), addrs[-1] if addrs else 0, len(res.found))
    except KeyboardInterrupt:
        res.interrupted_at = addrs[res.scanned] if res.scanned < len(addrs) else addrs[-1]
    finally:
        if progress:
            progress.clear()
    return res


def _scan_range(args: argparse.Namespace) -> range:
    return args.range or range(1, 248)


def cmd_scan(args: argparse.Namespace) -> int:
    t = resolve(args, need_address=False, timeout_s=args.timeout or SCAN_TIMEOUT_S, retries=0)
    addrs = _scan_range(args)
    s = t.settings
    where = f"bus {s.name!r} ({s.port}, {s.framing})" if s.name != s.port else f"{s.port} ({s.framing})"
    note(f"scanning {where} addresses {addrs.start}-{addrs.stop - 1}, {s.timeout_s:g} s each; Ctrl-C stops")
    printed: list[bool] = []

    def show(f: Found) -> None:
        if not printed:
            say(SCAN_HEADER)
            printed.append(True)
        say(f.line())

    with Bus(s) as bus:
        res = scan(bus, addrs, progress=Progress(len(addrs), "scan"), on_found=show)
    n = len(res.found)
    summary = f"found {n} meter{'s' if n != 1 else ''} on bus {s.name!r}"
    if res.interrupted_at is not None:
        note(f"scan interrupted at address {res.interrupted_at}: {summary} at addresses "
             f"{addrs.start}-{res.interrupted_at - 1 if res.interrupted_at > addrs.start else addrs.start}")
        return EXIT_INTERRUPTED
    if not n:
        note(f"no meter answered at addresses {addrs.start}-{addrs.stop - 1} on {s.port}: check A/B wiring, the "
             f"meter's 5 V RS485 supply, the framing ({s.framing}; AC meters need --stopbits 1), or try --timeout 0.3")
        return 1
    say(summary)
    same = [f for f in res.found if f.note == GARBLED]
    if same:
        note("some addresses gave garbled replies: several meters probably share them (new meters all start at "
             "address 1); give each its own address one at a time: dcmon set-address --to N")
    return 0


# ---------------------------------------------------------------------------------- set-address

def only_meter_address(bus: Bus, model: Model, rounds: int = 3) -> int:
    """The address of the one meter on the bus, asked at the general address 0xF8 (which every meter
    answers). Two meters answering at once collide: the reply is garbled (different values OR-ed together
    on the wire, so the CRC fails), and that is refused. Asked several times, with the address register and
    the changing measured values, so that two meters whose replies happen to match once are still caught."""
    seen: set[int] = set()
    many = MultipleMeters(
        f"bus {bus.name!r}: more than one meter answers the general address 0xF8 (their replies collide); "
        f"setting an address that way needs exactly ONE meter on the bus: connect one meter at a time, or "
        f"give the meter's current address with --from M", bus=bus.name)
    for _ in range(rounds):
        try:
            seen.add(bus.read_holding_registers(GENERAL_ADDRESS, _address_register(model), 1)[0])
        except NoResponse:
            raise NoResponse(f"bus {bus.name!r}: no meter answers the general address 0xF8 (check A/B wiring, the "
                             f"meter's 5 V RS485 supply and the framing {bus.settings.framing})", bus=bus.name) from None
        except DeviceError:
            raise
        except BusError:
            raise many from None
        try:
            bus.read_input_registers(GENERAL_ADDRESS, model.input_start, model.input_count)
        except DeviceError:
            pass  # a clean refusal (e.g. a DC meter asked for the AC block) is one meter talking
        except NoResponse:
            pass  # it answered the address read; one missed reply does not make two meters
        except BusError:
            raise many from None
    if len(seen) > 1:
        raise many
    return seen.pop()


def _address_register(model: Model) -> int:
    s = model.address_setting
    if s is None:
        raise UsageError(f"{model.title} has no address register: set its address on the meter itself")
    return s.address


def _answers(bus: Bus, model: Model, address: int) -> bool:
    try:
        bus.read_holding_registers(address, _address_register(model), 1)
        return True
    except NoResponse:
        return False
    except DcmonError:
        return True  # garbled or refused: something is there


def write_address(bus: Bus, model: Model, via: int, old: int, new: int) -> None:
    """Write the address register (at ``via``: the old address or 0xF8) and confirm at the new address.
    A meter that echoes the write but keeps its old address stays silent at the new one: say that, not
    just "no answer"."""
    try:
        write_setting(bus, model, via, ADDRESS, new)
    except NoResponse:
        if _answers(bus, model, old):
            raise DeviceError(f"bus {bus.name!r}: wrote address {new} to the meter at address {old}, but it still "
                              f"answers at {old} and not at {new}; the meter did not accept it (write-protected "
                              f"or faulty? power-cycle it and try again)", bus=bus.name, address=old) from None
        raise


def cmd_set_address(args: argparse.Namespace) -> int:
    t = resolve(args, need_address=False)
    new = args.to
    old: int = args.from_address
    if args.from_address is None:
        with Bus(t.settings) as bus:
            old = only_meter_address(bus, t.model)
        if not args.no_scan:
            st = replace(t.settings, timeout_s=args.scan_timeout, retries=0)
            addrs = _scan_range(args)
            note(f"the general address found one meter (at address {old}); scanning addresses "
                 f"{addrs.start}-{addrs.stop - 1} to make sure no other meter is connected (--no-scan skips this)")
            with Bus(st) as bus:
                res = scan(bus, addrs, progress=Progress(len(addrs), "checking"))
            if res.interrupted_at is not None:
                note("interrupted: no address was written")
                return EXIT_INTERRUPTED
            others = [f.address for f in res.found if f.address != old]
            if others or any(f.note == GARBLED for f in res.found):
                where = ", ".join(str(a) for a in sorted({f.address for f in res.found}))
                raise MultipleMeters(f"bus {st.name!r}: meters answer at addresses {where}: setting an address "
                                     f"through the general address needs exactly ONE meter on the bus: connect one "
                                     f"meter at a time, or give the meter's current address with --from M", bus=st.name)
        via = GENERAL_ADDRESS
    else:
        via = old
    with Bus(t.settings) as bus:
        if args.from_address is not None:
            try:
                bus.read_holding_registers(old, _address_register(t.model), 1)
            except NoResponse:
                raise NoResponse(f"bus {bus.name!r}: no meter answers at address {old} (dcmon scan lists the "
                                 f"addresses that answer)", bus=bus.name, address=old) from None
            if new != old and _answers(bus, t.model, new):
                raise DeviceError(f"bus {bus.name!r}: address {new} is already taken by another meter; pick a free "
                                  f"one (dcmon scan lists them)", bus=bus.name, address=new)
        if new == old:
            say(f"bus {bus.name!r}: the meter is already at address {new}; nothing written")
            return 0
        write_address(bus, t.model, via, old, new)
    say(f"bus {t.settings.name!r}: meter moved from address {old} to {new} (read back at {new}: OK). Label it, "
        f"add it to the config as address = {new}, then connect the next meter.")
    return 0


# ---------------------------------------------------------------------------------------- shunt

def _config_shunt_note(t: Target, amps: int | None) -> None:
    if t.sensor and t.sensor.shunt_a is not None and t.sensor.shunt_a != amps:
        note(f"note: the config says shunt_a = {t.sensor.shunt_a} for sensor {t.sensor.name!r}; make them agree "
             f"(with poller.apply_shunt_codes = true the poller writes the config's value to the meter)")


def cmd_shunt_get(args: argparse.Namespace) -> int:
    t = resolve(args, need_address=True)
    assert t.address is not None
    with Bus(t.settings) as bus:
        amps = read_shunt(bus, t.model, t.address)
        if amps is None:
            code = read_shunt_code(bus, t.model, t.address)
            known = sorted(t.model.shunt_codes.values())
            say(f"{t.where()}: unknown shunt code {code} (expected {known[0]}-{known[-1]}); set it with "
                f"dcmon shunt set --amps A")
            return 1
    say(f"{t.where()}: shunt code {amps} A (75 mV shunt rated {amps} A)")
    _config_shunt_note(t, amps)
    return 0


def cmd_shunt_set(args: argparse.Namespace) -> int:
    t = resolve(args, need_address=True)
    assert t.address is not None
    with Bus(t.settings) as bus:
        before = read_shunt(bus, t.model, t.address)
        changed = set_shunt(bus, t.model, t.address, args.amps)
    if changed:
        was = f"{before} A" if before is not None else "an unknown code"
        say(f"{t.where()}: shunt code set to {args.amps} A (was {was}); read back: OK")
    else:
        say(f"{t.where()}: shunt code is already {args.amps} A; nothing written")
    _config_shunt_note(t, args.amps)
    return 0


# --------------------------------------------------------------------------------- reset-energy

def confirm(question: str) -> bool:
    """Ask on the terminal; anything but y/yes is no."""
    sys.stderr.write(question)
    sys.stderr.flush()
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


def cmd_reset_energy(args: argparse.Namespace) -> int:
    t = resolve(args, need_address=True)
    assert t.address is not None
    if not args.yes and not sys.stdin.isatty():
        raise UsageError("refusing to reset the energy counter without confirmation: not run from a terminal; "
                         "add --yes to confirm")
    with Bus(t.settings) as bus:
        before = float(read_values(bus, t.model, t.address)["energy_wh"])
        if not args.yes and not confirm(f"Reset the energy counter of {t.where()} (now {before:.0f} Wh)? "
                                        f"This cannot be undone. [y/N] "):
            note("cancelled: the energy counter was not reset")
            return 1
        bus.reset_energy(t.address)
        after = float(read_values(bus, t.model, t.address)["energy_wh"])
    if before > 0 and after >= before:
        raise DeviceError(f"{t.where()}: the meter acknowledged the reset but still reads {after:.0f} Wh",
                          bus=t.settings.name, address=t.address)
    say(f"{t.where()}: energy counter reset (was {before:.0f} Wh, now {after:.0f} Wh)")
    return 0


# ----------------------------------------------------------------------------------- read, watch

def _calibrated(t: Target, values: dict[str, FieldValue]) -> dict[str, FieldValue] | None:
    if t.sensor is None or t.sensor.calibration.is_identity:
        return None
    return apply_calibration(values, t.sensor.calibration, t.model)


def _title(t: Target) -> str:
    return f"{t.model.title}, {t.where()}"


def cmd_read(args: argparse.Namespace) -> int:
    t = resolve(args, need_address=True)
    assert t.address is not None
    with Bus(t.settings) as bus:
        values = read_values(bus, t.model, t.address)
    cal = _calibrated(t, values)
    if args.json:
        out: dict[str, Any] = {"bus": t.settings.name, "address": t.address, "model": t.model.name,
                               "sensor": t.sensor.name if t.sensor else None, "values": values}
        if cal is not None:
            out["calibrated"] = cal
        say(json.dumps(out))
        return 0
    say(_title(t))
    for line in format_block(t.model, values, cal):
        say(line)
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    """Live values, redrawn in place on a terminal (a line per reading elsewhere), until Ctrl-C (exit 0)."""
    t = resolve(args, need_address=True)
    assert t.address is not None
    tty = sys.stdout.isatty()
    drawn = 0
    n = 0
    try:
        with Bus(t.settings) as bus:
            next_at = time.monotonic()
            while args.count is None or n < args.count:
                stamp = time.strftime("%H:%M:%S")
                try:
                    values = read_values(bus, t.model, t.address)
                    cal = _calibrated(t, values)
                    shown = cal or values
                    if tty:
                        lines = [f"{_title(t)}   {stamp}   (Ctrl-C to stop)", *format_block(t.model, values, cal)]
                    else:
                        lines = [stamp + "  " + "  ".join(format_value(t.model, r.name, shown[r.name])
                                                          for r in t.model.inputs if not isinstance(shown[r.name], bool))]
                except DcmonError as e:  # a meter may drop out for a moment while someone works on the wiring
                    lines = [f"{stamp}  {e}"]
                if tty and drawn:
                    sys.stdout.write(f"\x1b[{drawn}F\x1b[J")
                for line in lines:
                    sys.stdout.write(line + "\n")
                sys.stdout.flush()
                drawn = len(lines)
                n += 1
                if args.count is not None and n >= args.count:
                    break
                next_at += args.interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                else:
                    next_at = time.monotonic()
    except KeyboardInterrupt:
        sys.stdout.write("\n" if tty else "")
    return 0


# ----------------------------------------------------------------------------------- the parser

WRONG_MODEL_HINT = ("the meter has no such register, so it is most likely another model than the one asked for "
                    "(--model, or the sensor's model in the config; `dcmon scan` tells DC and AC meters and the "
                    "PZEM-003 and -017 apart)")


def _handler(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
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
    g.add_argument("--model", type=_model, metavar="MODEL",
                   help=f"meter model, for framing and registers: {', '.join(MODELS)} (default: the config's, or pzem017)")
    g.add_argument("--baudrate", type=int, help="override the framing's baud rate (PZEM: 9600)")
    g.add_argument("--stopbits", type=int, choices=(1, 2), help="override the stop bits (PZEM DC: 2, AC: 1)")
    g.add_argument("--timeout", type=_positive, metavar="S", help="seconds to wait for each reply")
    return p


def meter_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("which meter")
    g.add_argument("--sensor", metavar="NAME", help="a sensor from the config (gives its bus, address and model)")
    g.add_argument("--address", type=_address, metavar="N", help="the meter's Modbus address (1..247)")
    return p


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join("  " + line for line in lines)


def add_commands(subparsers: Any, common: argparse.ArgumentParser) -> None:
    from . import tools_calibrate

    target, meter = target_parser(), meter_parser()
    fmt = Formatter
    stop_first = ("It opens the serial port for itself: stop the service first (sudo systemctl stop dcmon).")

    p = subparsers.add_parser("scan", parents=[common, target], formatter_class=fmt,
                              help="list the meters that answer on a bus",
                              description="Ask every address (1..247, or --range) and list the meters that answer: "
                                          "address, model guess, shunt code, voltage and current. Ctrl-C stops and "
                                          "keeps what was found (exit 130). " + stop_first,
                              epilog=_examples("dcmon scan --bus rs485", "dcmon scan --port /dev/ttyUSB0 --range 1-10"))
    p.add_argument("--range", type=_range, metavar="A-B", help="addresses to try (default 1-247)")
    p.set_defaults(func=_handler(cmd_scan))

    p = subparsers.add_parser("set-address", parents=[common, target], formatter_class=fmt,
                              help="give a meter its own address",
                              description="Give a meter a new Modbus address and read it back. Without --from it "
                                          "goes through the general address 0xF8, which only works with ONE meter "
                                          "on the bus (more than one is detected and refused); with --from M it "
                                          "talks to the meter at address M. " + stop_first,
                              epilog=_examples("dcmon set-address --port /dev/ttyUSB0 --to 2",
                                               "dcmon set-address --bus rs485 --from 1 --to 3"))
    p.add_argument("--to", type=_address, required=True, metavar="N", help="the new address (1..247)")
    p.add_argument("--from", dest="from_address", type=_address, metavar="M", help="the meter's current address")
    p.add_argument("--no-scan", action="store_true",
                   help="without --from: skip the scan for other meters (the general-address collision check stays)")
    p.add_argument("--range", type=_range, metavar="A-B", help="addresses the safety scan tries (default 1-247)")
    p.add_argument("--scan-timeout", type=_positive, default=SCAN_TIMEOUT_S, metavar="S",
                   help=f"seconds per address in the safety scan (default {SCAN_TIMEOUT_S})")
    p.set_defaults(func=_handler(cmd_set_address))

    p = subparsers.add_parser("shunt", formatter_class=fmt, help="read or set a PZEM-017's shunt code (current range)",
                              description="A PZEM-017 scales the shunt's 75 mV by its shunt code (50, 100, 200 or "
                                          "300 A). When the code does not match the shunt wired to it, current, "
                                          "power and energy are off by the ratio of the two.",
                              epilog=_examples("dcmon shunt get --sensor battery",
                                               "dcmon shunt set --sensor battery --amps 200"))
    ss = p.add_subparsers(dest="shunt_command", metavar="get|set")
    ss.required = True
    q = ss.add_parser("get", parents=[common, target, meter], formatter_class=fmt,
                      help="show the meter's shunt code in rated amps",
                      description="Read the meter's shunt code (current range) and say whether it matches the "
                                  "config's shunt_a. " + stop_first,
                      epilog=_examples("dcmon shunt get --sensor battery", "dcmon shunt get --port /dev/ttyUSB0 --address 1"))
    q.set_defaults(func=_handler(cmd_shunt_get))
    q = ss.add_parser("set", parents=[common, target, meter], formatter_class=fmt,
                      help="set the shunt code, then read it back",
                      description="Write the shunt code for the shunt wired to the meter and read it back to "
                                  "confirm. " + stop_first,
                      epilog=_examples("dcmon shunt set --sensor battery --amps 200",
                                       "dcmon shunt set --port /dev/ttyUSB0 --address 1 --amps 100"))
    q.add_argument("--amps", type=int, required=True, choices=shunt_amps(),
                   help="the rating of the 75 mV shunt wired to the meter")
    q.set_defaults(func=_handler(cmd_shunt_set))

    p = subparsers.add_parser("reset-energy", parents=[common, target, meter], formatter_class=fmt,
                              help="reset a meter's energy counter (function 0x42)",
                              description="Set the meter's energy counter back to 0 Wh, after asking (--yes skips "
                                          "the question). The poller flags the next reading energy_reset = true, "
                                          "also when the reset happened while it was stopped. " + stop_first,
                              epilog=_examples("dcmon reset-energy --sensor battery", "dcmon reset-energy --address 2 --yes"))
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=_handler(cmd_reset_energy))

    p = subparsers.add_parser("read", parents=[common, target, meter], formatter_class=fmt,
                              help="read one meter's values once",
                              description="Read one meter's values once and print them (with the calibrated "
                                          "values beside them for a calibrated sensor). With one sensor in the "
                                          "config, that is the one. " + stop_first,
                              epilog=_examples("dcmon read", "dcmon read --sensor battery --json",
                                               "dcmon read --port /dev/ttyUSB0 --address 1 --model pzem016"))
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.set_defaults(func=_handler(cmd_read))

    p = subparsers.add_parser("watch", parents=[common, target, meter], formatter_class=fmt,
                              help="show one meter's values live",
                              description="Read one meter again and again and show its values, redrawn in place "
                                          "on a terminal (one line per reading otherwise), until Ctrl-C. "
                                          + stop_first,
                              epilog=_examples("dcmon watch --sensor battery", "dcmon watch --address 1 --interval 0.5 --count 20"))
    p.add_argument("--interval", type=_positive, default=1.0, metavar="S", help="seconds between readings (default 1)")
    p.add_argument("--count", type=int, metavar="N", help="stop after N readings (default: until Ctrl-C)")
    p.set_defaults(func=_handler(cmd_watch))

    tools_calibrate.add_commands(subparsers, common, target, meter, _handler)
