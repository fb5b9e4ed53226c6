"""``dcmon scan`` and ``dcmon set-address``: which meters answer on a bus, and giving each its own address.
scan recognises a model by its probe signature (``dcmon.models.families``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from ..bus import GENERAL_ADDRESS, Bus
from ..errors import BusError, DcmonError, DeviceError, MultipleMeters, NoResponse, UsageError
from ..helptext import Formatter
from ..meter import read_block, read_shunt, write_setting
from ..models import ADDRESS, Family, FieldValue, Model, decode, families
from .target import (
    EXIT_INTERRUPTED, STOP_FIRST, Progress, examples, handler, note, parse_address, parse_range, positive, resolve,
    say, target_parser,
)

SCAN_TIMEOUT_S = 0.1
GARBLED = "garbled reply: two meters at this address? connect one at a time"


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


def add_commands(subparsers: Any, common: argparse.ArgumentParser) -> None:
    target = target_parser()
    fmt = Formatter
    stop_first = STOP_FIRST

    p = subparsers.add_parser("scan", parents=[common, target], formatter_class=fmt,
                              help="list the meters that answer on a bus",
                              description="Ask every address (1..247, or --range) and list the meters that answer: "
                                          "address, model guess, shunt code, voltage and current. Ctrl-C stops and "
                                          "keeps what was found (exit 130). " + stop_first,
                              epilog=examples("dcmon scan --bus rs485", "dcmon scan --port /dev/ttyUSB0 --range 1-10"))
    p.add_argument("--range", type=parse_range, metavar="A-B", help="addresses to try (default 1-247)")
    p.set_defaults(func=handler(cmd_scan))

    p = subparsers.add_parser("set-address", parents=[common, target], formatter_class=fmt,
                              help="give a meter its own address",
                              description="Give a meter a new Modbus address and read it back. Without --from it "
                                          "goes through the general address 0xF8, which only works with ONE meter "
                                          "on the bus (more than one is detected and refused); with --from M it "
                                          "talks to the meter at address M. " + stop_first,
                              epilog=examples("dcmon set-address --port /dev/ttyUSB0 --to 2",
                                               "dcmon set-address --bus rs485 --from 1 --to 3"))
    p.add_argument("--to", type=parse_address, required=True, metavar="N", help="the new address (1..247)")
    p.add_argument("--from", dest="from_address", type=parse_address, metavar="M", help="the meter's current address")
    p.add_argument("--no-scan", action="store_true",
                   help="without --from: skip the scan for other meters (the general-address collision check stays)")
    p.add_argument("--range", type=parse_range, metavar="A-B", help="addresses the safety scan tries (default 1-247)")
    p.add_argument("--scan-timeout", type=positive, default=SCAN_TIMEOUT_S, metavar="S",
                   help=f"seconds per address in the safety scan (default {SCAN_TIMEOUT_S})")
    p.set_defaults(func=handler(cmd_set_address))
