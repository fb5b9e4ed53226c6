"""``dcmon calibrate`` and ``dcmon check-accuracy``: compare a sensor with a trusted meter.

At each point the user reads a reference voltage (at the PZEM's voltage terminals) and a reference current
(through the shunt: clamp meter or a multimeter in series) and the tool reads the PZEM at that moment
(the mean of ``--samples`` reads). Interactively, it prompts and waits while the user changes the load
between points; non-interactively, ``--point V,I`` reads the PZEM when the command runs, and
``--point V,I=PV,PI`` takes the PZEM's readings noted at the same moment as the reference (so that two
points at two loads can be given in one command).

calibrate fits gain (one point) or gain + offset (two or more) for voltage and current, shows the error
before and after, and writes ``[sensors.calibration]`` into the file that defines the sensor. check-accuracy
only reports, against the 1 % the PZEM is specified at, and exits 1 when a point is outside it.
The maths is in ``dcmon.calibration``. The factory calibration function 0x41 is never sent.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from typing import Any

from .. import config as config_mod
from ..bus import Bus
from ..calibration import (
    SPEC_PERCENT,
    Fit,
    calibration_from,
    defining_file,
    fit,
    fit_of,
    point_error,
    save_calibration,
)
from ..config import Calibration
from ..errors import CalibrationError, ConfigError, UsageError
from ..helptext import Formatter
from ..meter import read_values
from .target import Target, handler, meter_parser, note, resolve, say, target_parser

MAX_POINTS = 5
QUANTITIES = (("voltage", "voltage_v", "V"), ("current", "current_a", "A"))


@dataclass
class Sample:
    """One calibration point: the reference meter's readings (None: not measured) and the PZEM's."""

    ref: dict[str, float | None]
    raw: dict[str, float]
    read_now: bool = True  # the PZEM was read by this command (not given on the command line)


def parse_point(text: str) -> tuple[dict[str, float | None], dict[str, float] | None]:
    """``V,I`` or ``V,I=PV,PI``; an empty or ``-`` part means "not measured" (e.g. ``13.2,`` for voltage only)."""
    ref_text, _, pzem_text = text.partition("=")

    def pair(s: str, what: str) -> tuple[float | None, float | None]:
        parts = s.split(",")
        if len(parts) != 2:
            raise argparse.ArgumentTypeError(f"{what} must be two numbers V,I (got {s!r})")
        out: list[float | None] = []
        for p in parts:
            p = p.strip()
            if p in ("", "-"):
                out.append(None)
                continue
            try:
                v = float(p)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{what}: not a number: {p!r}") from None
            if v < 0:
                raise argparse.ArgumentTypeError(f"{what}: {v:g} is negative (the PZEM measures magnitudes)")
            out.append(v)
        return out[0], out[1]

    rv, ri = pair(ref_text, "--point reference")
    if rv is None and ri is None:
        raise argparse.ArgumentTypeError("--point needs a reference voltage, current or both, e.g. 13.52,8.1")
    if not pzem_text:
        return {"voltage": rv, "current": ri}, None
    pv, pi = pair(pzem_text, "--point PZEM reading")
    if (rv is not None and pv is None) or (ri is not None and pi is None):
        raise argparse.ArgumentTypeError("--point V,I=PV,PI: give the PZEM's reading for each reference value")
    return {"voltage": rv, "current": ri}, {"voltage": pv or 0.0, "current": pi or 0.0}


def read_meter(bus: Bus, t: Target, samples: int) -> dict[str, float]:
    """The mean of several reads: the reference meter averages too, and one read can land on a step."""
    assert t.address is not None
    reads = [read_values(bus, t.model, t.address) for _ in range(samples)]
    return {q: statistics.fmean(float(r[f]) for r in reads) for q, f, _ in QUANTITIES}


def _ask_float(prompt: str) -> float | None:
    while True:
        sys.stderr.write(prompt)
        sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            raise KeyboardInterrupt  # end of input: stop as if interrupted
        text = line.strip()
        if text in ("", "-"):
            return None
        try:
            v = float(text)
        except ValueError:
            note(f"  not a number: {text!r}")
            continue
        if v >= 0:
            return v
        note("  the PZEM measures magnitudes: enter the value without a sign")


def collect(args: argparse.Namespace, t: Target, bus: Bus) -> list[Sample]:
    if args.point:
        out = []
        for ref, given in args.point:
            out.append(Sample(ref, given, read_now=False) if given else Sample(ref, read_meter(bus, t, args.samples)))
        now = [s for s in out if s.read_now]
        if len(now) > 1:
            raise UsageError("several --point V,I were all read at the same moment, so they are one point; for a "
                             "second point at another load give the PZEM's reading too (--point V,I=PV,PI) or run "
                             "the command in a terminal to be prompted")
        return out
    if not sys.stdin.isatty():
        raise UsageError("give the reference readings with --point V,I (not run from a terminal, so no prompts)")
    note(f"{t.model.title}, {t.where()}. Measure with a trusted meter: the voltage at the PZEM's voltage "
         f"terminals and the current through the shunt. Keep the load steady while you type; leave a value "
         f"blank to skip it. One point gives a gain; a second point at a different load also gives an offset.")
    out = []
    while len(out) < MAX_POINTS:
        live = read_meter(bus, t, 1)
        note(f"point {len(out) + 1}: the PZEM reads {live['voltage']:.2f} V, {live['current']:.2f} A now")
        rv = _ask_float("  reference voltage (V): ")
        ri = _ask_float("  reference current (A): ")
        if rv is None and ri is None:
            note("  nothing entered")
        else:
            raw = read_meter(bus, t, args.samples)
            note(f"  PZEM at that moment: {raw['voltage']:.2f} V, {raw['current']:.2f} A")
            out.append(Sample({"voltage": rv, "current": ri}, raw))
        if out:
            sys.stderr.write("Another point (change the load first)? [y/N] ")
            sys.stderr.flush()
            if sys.stdin.readline().strip().lower() not in ("y", "yes"):
                break
    return out


def _resolution(t: Target, field: str) -> float:
    return next(r.scale for r in t.model.inputs if r.name == field)


def _err_text(measured: float, reference: float, resolution: float) -> str:
    e = point_error(measured, reference, resolution=resolution)
    rel = f"{e.pct_error:+.2f} %" if e.pct_error is not None else f"{e.abs_error:+.3f}"
    return f"{measured:9.3f} {rel:>9}{'' if e.within_spec else ' !'}"


def report(t: Target, samples: list[Sample], existing: Calibration, new: Calibration | None) -> bool:
    """Print a table of the points; True if what dcmon records (with the calibration in the config) is within
    the spec at every point."""
    show_before = not existing.is_identity
    head = f"{'point':>5}  {'':<8}{'reference':>11}   {'PZEM raw':>9} {'error':>9}"
    if show_before:
        head += f"   {'dcmon now':>9} {'error':>9}"
    if new is not None:
        head += f"   {'calibrated':>10} {'error':>9}"
    say(head)
    ok = True
    for n, s in enumerate(samples, 1):
        for q, f, unit in QUANTITIES:
            ref = s.ref[q]
            if ref is None:
                continue
            res = _resolution(t, f)
            raw = s.raw[q]
            line = f"{n:>5}  {q:<8}{ref:9.3f} {unit}   {_err_text(raw, ref, res)}"
            recorded = fit_of(existing, q).apply(raw)
            ok &= point_error(recorded, ref, resolution=res).within_spec
            if show_before:
                line += f"   {_err_text(recorded, ref, res)}"
            if new is not None:
                line += f"    {_err_text(fit_of(new, q).apply(raw), ref, res)}"
            say(line)
    say(f"spec: ±{SPEC_PERCENT:g} % of the reading plus one count of resolution; '!' marks a value outside it")
    return ok


def _fits(t: Target, samples: list[Sample]) -> dict[str, Fit | None]:
    out: dict[str, Fit | None] = {}
    for q, f, _ in QUANTITIES:
        pairs = [(s.raw[q], ref) for s in samples if (ref := s.ref[q]) is not None]
        out[q] = fit(pairs, quantity=q, resolution=_resolution(t, f)) if pairs else None
    return out


def cmd_calibrate(args: argparse.Namespace) -> int:
    if getattr(args, "port", None) and not args.sensor:
        raise UsageError("calibrate writes the result for a configured sensor: give --sensor NAME")
    t = resolve(args, need_address=True)
    if t.sensor is None or t.cfg is None:
        raise UsageError("calibrate writes the result for a configured sensor: give --sensor NAME")
    with Bus(t.settings) as bus:
        samples = collect(args, t, bus)
    if not samples:
        note("no points entered: nothing calibrated")
        return 1
    existing = t.sensor.calibration
    fits = _fits(t, samples)
    new = calibration_from(existing, fits["voltage"], fits["current"])
    report(t, samples, existing, new)
    for q, _, unit in QUANTITIES:
        f = fits[q]
        if f is None:
            continue
        how = "one point: gain only" if sum(s.ref[q] is not None for s in samples) == 1 else "gain and offset"
        say(f"{q}: gain {getattr(new, q + '_gain'):.6f}, offset {getattr(new, q + '_offset'):+.4f} {unit} ({how})")
    if any(f is not None and sum(s.ref[q] is not None for s in samples) == 1 for q, f in fits.items()):
        say("(at a single point the calibrated error is 0 by construction: check another load with dcmon check-accuracy)")
    if args.dry_run:
        say("--dry-run: the config was not changed")
        return 0
    path = defining_file(t.cfg.source)
    before = path.read_bytes()
    save_calibration(path, t.sensor.name, new)
    try:
        config_mod.load(t.cfg.source)  # the poller must be able to start with what we wrote
    except ConfigError:
        path.write_bytes(before)
        raise
    say(f"wrote [sensors.calibration] for sensor {t.sensor.name!r} to {path}; restart the poller to use it "
        f"(sudo systemctl restart dcmon)")
    return 0


def cmd_check_accuracy(args: argparse.Namespace) -> int:
    t = resolve(args, need_address=True)
    with Bus(t.settings) as bus:
        samples = collect(args, t, bus)
    if not samples:
        note("no points entered: nothing checked")
        return 1
    existing = t.sensor.calibration if t.sensor else Calibration()
    ok = report(t, samples, existing, None)
    what = "dcmon's calibrated values are" if not existing.is_identity else "the meter is"
    if ok:
        say(f"{t.where()}: {what} within the specified ±{SPEC_PERCENT:g} % at every point")
        return 0
    say(f"{t.where()}: {what} OUTSIDE the specified ±{SPEC_PERCENT:g} % at a point marked '!': check the shunt "
        f"code (dcmon shunt get) and the wiring, then calibrate (dcmon calibrate --sensor NAME)")
    return 1


def add_commands(subparsers: Any, common: argparse.ArgumentParser) -> None:
    target, meter = target_parser(), meter_parser()

    def points(p: argparse.ArgumentParser) -> None:
        p.add_argument("--point", action="append", type=parse_point, metavar="V,I[=PV,PI]",
                       help="a reference reading (volts,amps; leave one empty to skip it); the PZEM is read now, "
                            "or give its reading after '='. Repeat for more points. Without --point: prompts")
        p.add_argument("--samples", type=int, default=3, metavar="N",
                       help="PZEM reads averaged per point (default 3)")

    fmt = Formatter
    p = subparsers.add_parser("calibrate", parents=[common, target, meter], formatter_class=fmt,
                              help="fit a sensor to a trusted meter and write [sensors.calibration]",
                              description="Compare a sensor with a trusted meter at one or more loads, fit a gain "
                                          "(one point) or a gain and an offset (two or more) for voltage and "
                                          "current, show the error before and after, and write the result into "
                                          "the sensor's [sensors.calibration] in the config file that defines it. "
                                          "In a terminal it prompts for the reference readings; --point gives "
                                          "them on the command line. Restart the poller afterwards.",
                              epilog="examples:\n"
                                     "  dcmon calibrate --sensor battery                       # prompts\n"
                                     "  dcmon calibrate --sensor battery --point 13.52,8.10 --dry-run\n"
                                     "  dcmon calibrate --sensor battery --point 13.30,8.10 --point 26.70,40.50=26.40,40.00")
    points(p)
    p.add_argument("--dry-run", action="store_true", help="show the result, do not write the config")
    p.set_defaults(func=handler(cmd_calibrate))

    p = subparsers.add_parser("check-accuracy", parents=[common, target, meter], formatter_class=fmt,
                              help="compare a sensor with a trusted meter against the 1 %% spec",
                              description="Compare a sensor with a trusted meter and report the error of each "
                                          "value against the PZEM's specified 1 % (plus one count). Changes "
                                          "nothing. Exit status 1 when a value is outside the spec.",
                              epilog="examples:\n"
                                     "  dcmon check-accuracy --sensor battery --point 13.52,8.10\n"
                                     "  dcmon check-accuracy --port /tmp/pzem --address 1 --point 13.31,8.10")
    points(p)
    p.set_defaults(func=handler(cmd_check_accuracy))


__all__ = ["CalibrationError", "cmd_calibrate", "cmd_check_accuracy", "parse_point"]
