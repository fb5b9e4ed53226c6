#!/usr/bin/env python3
"""Line-protocol encoding: dcmon's encoder beside influxdb_client's ``Point`` on the same readings (issue 8).

Run:  .venv/bin/python bench/bench_encode.py [--readings 1000] [--seconds 3] [--quick]

Needs ``influxdb-client`` for the comparison, in the venv only (it is not a dcmon dependency):
    .venv/bin/pip install influxdb-client

The readings are what the poller makes (``Poller.make_reading``: the dc_power schema, 7 tags, 8 fields) for 8
sensors with names and tags like the shipped config.toml's (nothing to escape: the common case). Before
anything is timed, every encoder's lines are checked to carry the same points as dcmon's, on these readings
and on readings whose names need escaping (Point sorts fields and writes 13.0 as 13: same values).
Rows, timed round-robin (best batch of each), so that a busy machine slows them all alike:
- dcmon ``encode_line`` as shipped (what ``Reading.to_line()`` calls for every reading);
- prototype A, a drop-in ``encode_line`` for dcmon.reading: the same output, with one scan for characters
  that need escaping instead of a ``str.translate`` per name, and exact-type dispatch for field values;
- prototype B: A, plus the ``measurement,tags`` head made once per sensor (it never changes) and reused;
- ``Point`` built from the reading's tags and fields, then serialised: what code using influxdb_client does
  with the same data (the target's reference);
- ``Point.to_line_protocol()`` alone, on Points built beforehand.

Prints ``RATIO …`` lines with PASS/MISS; exits 0 (a benchmark reports, it does not fail CI).
"""

from __future__ import annotations

import argparse
import os
import math
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from dcmon import config
from dcmon.poller import Poller
from dcmon.reading import FieldScalar, Reading, encode_line, escape_key, escape_measurement, format_field

TARGET = 5.0

CONFIG = """
[poller]
host = "pi-garage"
[influxdb]
enabled = false
[buses.rs485]
port = "/dev/null"
"""


def make_readings(n: int, *, awkward: bool = False) -> list[Reading]:
    """``n`` readings of 8 sensors, made by the poller's own make_reading (so the schema cannot drift).
    ``awkward``: names and tag values with a space, comma and equals sign, for the equivalence check."""
    text = CONFIG
    for a in range(1, 9):
        name, site = (f"bank {a},left", f"shed={a % 3} b") if awkward else (f"sensor_{a}", "garage")
        text += (f'\n[[sensors]]\nname = "{name}"\nbus = "rs485"\naddress = {a}\nshunt_a = 100\n'
                 f'tags = {{ site = "{site}", circuit = "dc{a}" }}\n')
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "config.toml"
        p.write_text(text)
        cfg = config.load(p, env={})
    poller = Poller(cfg, put=lambda lines: None, buses={})
    sensors = cfg.enabled_sensors()
    t0 = time.time_ns()
    out = []
    for i in range(n):
        s = sensors[i % len(sensors)]
        v = 12.0 + (i % 97) * 0.013
        amps = 3.0 + (i % 89) * 0.071
        values = {"voltage_v": round(v, 2), "current_a": round(amps, 2), "power_w": round(v * amps, 1),
                  "energy_wh": float(1000 + i), "high_voltage_alarm": False, "low_voltage_alarm": i % 50 == 0}
        out.append(poller.make_reading(s, values, t0 + i * 1_000_000_000, energy_reset=i % 400 == 0))
    return out


# ------------------------------------------------------------------------ the prototype for reading.py

def proto_format_field(v: FieldScalar) -> str:
    """format_field with the exact types checked first (a float is what the poller writes 6 times a line)."""
    t = type(v)
    if t is float:
        if math.isfinite(v):  # type: ignore[arg-type]
            return repr(v)
        raise ValueError("NaN and infinity cannot be written to InfluxDB")
    if t is bool:
        return "true" if v else "false"
    if t is int:
        return f"{v}i"
    return format_field(v)     # subclasses and strings: the shipped rules


def proto_encode_line(measurement: str, tags: dict[str, str], fields: dict[str, FieldScalar], time_ns: int) -> str:
    """Same output as dcmon.reading.encode_line. One scan of all names and tag values for a character that
    needs escaping (``str.translate`` with a dict table costs ~1 µs a call, 21 calls a line); when there is
    none (the common case) the parts are joined as they are, otherwise the shipped encoder does the line."""
    if not fields:
        raise ValueError("a point needs at least one field")
    items = sorted(tags.items())
    raw = measurement + "".join([k + str(v) for k, v in items]) + "".join(fields)
    if "," in raw or "=" in raw or " " in raw or "\n" in raw:
        return encode_line(measurement, tags, fields, time_ns)
    head = measurement + "".join([f",{k}={v}" for k, v in items if v != ""])
    body = ",".join([f"{k}={proto_format_field(v)}" for k, v in fields.items()])
    return f"{head} {body} {int(time_ns)}"


def proto_encode_head(measurement: str, tags: dict[str, str]) -> str:
    """``measurement,tag=value,...`` (escaped, sorted): the same for every reading of a sensor, so the poller
    could make it once per sensor and keep it (e.g. in SensorState) instead of once per reading."""
    parts = [escape_measurement(measurement)]
    parts += [f"{escape_key(k)}={escape_key(str(v))}" for k, v in sorted(tags.items()) if v != ""]
    return ",".join(parts)


def proto_encode_with_head(head: str, fields: dict[str, FieldScalar], time_ns: int) -> str:
    """A line from a ready head: only the field names are scanned for characters to escape."""
    if not fields:
        raise ValueError("a point needs at least one field")
    keys = "".join(fields)
    if "," in keys or "=" in keys or " " in keys or "\n" in keys:
        body = ",".join([f"{escape_key(k)}={proto_format_field(v)}" for k, v in fields.items()])
    else:
        body = ",".join([f"{k}={proto_format_field(v)}" for k, v in fields.items()])
    return f"{head} {body} {int(time_ns)}"


# --------------------------------------------------------------------------------- the contenders

def shipped(readings: list[Reading]) -> list[str]:
    return [encode_line(r.measurement, r.tags, r.fields, r.time_ns) for r in readings]


def prototype(readings: list[Reading]) -> list[str]:
    return [proto_encode_line(r.measurement, r.tags, r.fields, r.time_ns) for r in readings]


def with_heads(readings: list[Reading]) -> Callable[[], list[str]]:
    """Encode with a head made once per sensor (made here, before timing, as a poller would at start-up)."""
    heads = {r.sensor: proto_encode_head(r.measurement, r.tags) for r in readings}
    return lambda: [proto_encode_with_head(heads[r.sensor], r.fields, r.time_ns) for r in readings]


def point_functions() -> tuple[Callable[[list[Reading]], list[Any]], Callable[[list[Any]], list[str]]] | None:
    try:
        from influxdb_client import Point, WritePrecision
    except ImportError:
        return None

    def build(readings: list[Reading]) -> list[Any]:
        points = []
        for r in readings:
            p = Point(r.measurement)
            for k, v in r.tags.items():
                p.tag(k, v)
            for k, fv in r.fields.items():
                p.field(k, fv)
            points.append(p.time(r.time_ns, WritePrecision.NS))
        return points

    def serialise(points: list[Any]) -> list[str]:
        return [p.to_line_protocol() for p in points]

    return build, serialise


# ------------------------------------------------------------------------------------ same points?

_UNESCAPED_SPACE = re.compile(r"(?<!\\) ")
_UNESCAPED_COMMA = re.compile(r"(?<!\\),")


def parse(line: str) -> tuple[str, dict[str, object], int]:
    """(measurement+tags, fields with typed values, timestamp): enough to compare two encoders' lines."""
    head, fields, ts = _UNESCAPED_SPACE.split(line)
    parsed: dict[str, object] = {}
    for item in _UNESCAPED_COMMA.split(fields):
        k, v = re.split(r"(?<!\\)=", item, maxsplit=1)
        parsed[k] = (v == "true" if v in ("true", "false") else int(v[:-1]) if v.endswith("i")
                     else v if v.startswith('"') else float(v))
    return head, parsed, int(ts)


def differences(reference: list[str], other: list[str]) -> int:
    return sum(parse(a) != parse(b) for a, b in zip(reference, other, strict=True))


# --------------------------------------------------------------------------------------- timing

def rates(contenders: dict[str, Callable[[], object]], n: int, budget_s: float) -> dict[str, float]:
    """Readings a second for each contender: best batch, batches taken round-robin until ``budget_s`` per
    contender has passed (at least 3 each), so background load hits all of them alike."""
    best = dict.fromkeys(contenders, float("inf"))
    deadline = time.perf_counter() + budget_s * len(contenders)
    rounds = 0
    while rounds < 3 or time.perf_counter() < deadline:
        for name, fn in contenders.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
        rounds += 1
    return {name: n / b for name, b in best.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--readings", type=int, default=1000, help="readings a batch (default 1000)")
    ap.add_argument("--seconds", type=float, default=3.0, help="timing budget a row (default 3)")
    ap.add_argument("--quick", action="store_true", help="200 readings, 0.2 s a row (smoke test)")
    args = ap.parse_args(argv)
    n, budget = (200, 0.2) if args.quick else (args.readings, args.seconds)

    readings = make_readings(n)
    awkward = make_readings(16, awkward=True)
    print(f"line-protocol encoding: {n} readings a batch ({len(readings[0].tags)} tags, "
          f"{len(readings[0].fields)} fields), best batch, round-robin over {budget:g} s a row")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start")
    print(f"example: {readings[0].to_line()}")
    same = sum(differences(shipped(rs), fn(rs)) for rs in (readings, awkward)
               for fn in (prototype, lambda x: with_heads(x)()))
    contenders: dict[str, Callable[[], object]] = {
        "dcmon encode_line (shipped)": lambda: shipped(readings),
        "prototype A: one escape scan a line": lambda: prototype(readings),
        "prototype B: A + a head made once a sensor": with_heads(readings),
    }
    ours = list(contenders)
    point = point_functions()
    if point is not None:
        build, serialise = point
        points = build(readings)
        same += differences(shipped(readings), serialise(points))
        same += differences(shipped(awkward), serialise(build(awkward)))
        contenders["influxdb_client Point: build + serialise"] = lambda: serialise(build(readings))
        contenders["influxdb_client Point.to_line_protocol() only"] = lambda: serialise(points)
    print(f"same points from every encoder (incl. names to escape): {'yes' if not same else f'NO, {same} lines differ'}")
    measured = rates(contenders, n, budget)
    for name, r in measured.items():
        print(f"{name:<46} {r:>10,.0f} readings/s  {1e6 / r:6.2f} µs each")
    if point is None:
        print("influxdb_client is not installed: for the comparison, .venv/bin/pip install influxdb-client")
        print(f"RATIO line protocol vs influxdb_client Point: not measured (target ≥ {TARGET:g}×) SKIP")
        return 0
    reference = measured["influxdb_client Point: build + serialise"]
    for name in ours:
        ratio = measured[name] / reference
        print(f"RATIO line protocol, {name} vs influxdb_client Point: {ratio:.1f}× (target ≥ {TARGET:g}×) "
              f"{'PASS' if ratio >= TARGET and not same else 'MISS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
