"""``dcmon read``, ``watch``, ``shunt get|set`` and ``reset-energy``: one meter's values and settings."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from .. import config as config_mod
from ..bus import Bus
from ..calibration import apply_calibration
from ..config import Config
from ..errors import DcmonError, DeviceError, UsageError
from ..helptext import Formatter
from ..meter import read_shunt, read_shunt_code, read_values, set_shunt
from ..models import FieldValue, shunt_amps
from .target import (
    STOP_FIRST, Target, examples, format_block, format_value, handler, meter_parser, next_tick, note, positive, resolve, say,
    target_parser,
)


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


def _battery_by_default(args: argparse.Namespace) -> Config | None:
    """`dcmon watch` with no meter named: the only enabled sensor as before; else, when the config has exactly
    one battery, that battery (its config returned). With several batteries and several sensors: which?"""
    if any(getattr(args, k, None) is not None for k in ("sensor", "address", "port", "bus")):
        return None
    cfg = config_mod.load(args.config)
    if len(cfg.enabled_sensors()) == 1 or not cfg.batteries:
        return None
    if len(cfg.batteries) > 1:
        raise UsageError(f"which meter or battery? give --sensor NAME, --address N or --battery NAME (batteries in "
                         f"{cfg.source}: {', '.join(b.name for b in cfg.batteries)})")
    note(f"battery {cfg.batteries[0].name!r}, the only one configured in {cfg.source} (--sensor NAME watches one meter)")
    args.battery = cfg.batteries[0].name
    return cfg


def cmd_watch(args: argparse.Namespace) -> int:
    """Live values, redrawn in place on a terminal (a line per reading elsewhere), until Ctrl-C (exit 0);
    with --battery (or a config whose only choice is one battery) a battery's state, by dcmon.tools.battery_watch."""
    cfg = None if args.battery is not None else _battery_by_default(args)
    if args.battery is not None:
        from .battery_watch import watch_battery

        return watch_battery(args, cfg)
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
                next_at = next_tick(next_at, args.interval)
    except KeyboardInterrupt:
        sys.stdout.write("\n" if tty else "")
    return 0


def add_commands(subparsers: Any, common: argparse.ArgumentParser) -> None:
    target, meter = target_parser(), meter_parser()
    fmt = Formatter
    stop_first = STOP_FIRST

    p = subparsers.add_parser("shunt", formatter_class=fmt, help="read or set a PZEM-017's shunt code (current range)",
                              description="A PZEM-017 scales the shunt's 75 mV by its shunt code (50, 100, 200 or "
                                          "300 A). When the code does not match the shunt wired to it, current, "
                                          "power and energy are off by the ratio of the two.",
                              epilog=examples("dcmon shunt get --sensor battery",
                                               "dcmon shunt set --sensor battery --amps 200"))
    ss = p.add_subparsers(dest="shunt_command", metavar="get|set")
    ss.required = True
    q = ss.add_parser("get", parents=[common, target, meter], formatter_class=fmt,
                      help="show the meter's shunt code in rated amps",
                      description="Read the meter's shunt code (current range) and say whether it matches the "
                                  "config's shunt_a. " + stop_first,
                      epilog=examples("dcmon shunt get --sensor battery", "dcmon shunt get --port /dev/ttyUSB0 --address 1"))
    q.set_defaults(func=handler(cmd_shunt_get))
    q = ss.add_parser("set", parents=[common, target, meter], formatter_class=fmt,
                      help="set the shunt code, then read it back",
                      description="Write the shunt code for the shunt wired to the meter and read it back to "
                                  "confirm. " + stop_first,
                      epilog=examples("dcmon shunt set --sensor battery --amps 200",
                                       "dcmon shunt set --port /dev/ttyUSB0 --address 1 --amps 100"))
    q.add_argument("--amps", type=int, required=True, choices=shunt_amps(),
                   help="the rating of the 75 mV shunt wired to the meter")
    q.set_defaults(func=handler(cmd_shunt_set))

    p = subparsers.add_parser("reset-energy", parents=[common, target, meter], formatter_class=fmt,
                              help="reset a meter's energy counter (function 0x42)",
                              description="Set the meter's energy counter back to 0 Wh, after asking (--yes skips "
                                          "the question). The poller flags the next reading energy_reset = true, "
                                          "also when the reset happened while it was stopped. " + stop_first,
                              epilog=examples("dcmon reset-energy --sensor battery", "dcmon reset-energy --address 2 --yes"))
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=handler(cmd_reset_energy))

    p = subparsers.add_parser("read", parents=[common, target, meter], formatter_class=fmt,
                              help="read one meter's values once",
                              description="Read one meter's values once and print them (with the calibrated "
                                          "values beside them for a calibrated sensor). With one sensor in the "
                                          "config, that is the one. " + stop_first,
                              epilog=examples("dcmon read", "dcmon read --sensor battery --json",
                                               "dcmon read --port /dev/ttyUSB0 --address 1 --model pzem016"))
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.set_defaults(func=handler(cmd_read))

    p = subparsers.add_parser("watch", parents=[common, target, meter], formatter_class=fmt,
                              help="show one meter's values, or a battery's state of charge, live",
                              description="Read one meter again and again and show its values, redrawn in place "
                                          "on a terminal (one line per reading otherwise), until Ctrl-C. "
                                          + stop_first + " "
                                          "With --battery NAME (a [[batteries]] table; also when the config has "
                                          "one battery and more than one sensor, and no meter is named) it shows "
                                          "the battery instead, one line per refresh: state of charge, status, "
                                          "net current, voltage, time to go, Ah consumed. While the service runs, "
                                          "that line follows the service's status (every 5 s) and no port is "
                                          "opened; otherwise watch reads the battery's meters itself, starting "
                                          "from the service's saved state, which it never writes.",
                              epilog=examples("dcmon watch --sensor battery", "dcmon watch --address 1 --interval 0.5 --count 20",
                                               "dcmon watch --battery house",
                                               "dcmon watch --battery house --interval 5 --count 12"))
    p.add_argument("--battery", metavar="NAME", help="a battery from the config ([[batteries]] name): show its state "
                                                     "of charge instead of one meter's values")
    p.add_argument("--interval", type=positive, default=1.0, metavar="S", help="seconds between readings (default 1)")
    p.add_argument("--count", type=int, metavar="N", help="stop after N readings or lines (default: until Ctrl-C)")
    p.set_defaults(func=handler(cmd_watch))
