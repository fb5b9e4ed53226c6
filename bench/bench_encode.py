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
- ``Reading.to_line()`` on readings from ``Poller.make_reading``: what the poller does for every reading,
  the ``measurement,tags`` head made once per sensor (``Poller._series``) and reused;
- ``make_reading(...).to_line()``: the poller's whole path from a meter's values to a line (the fields
  dict, the Reading, the line);
- ``encode_line``: the same line without a ready head (escaping and sorting the tags every time), for
  what making the head once saves;
- ``Point`` built from the reading's tags and fields, then serialised: what code using influxdb_client does
  with the same data (the target's reference);
- ``Point.to_line_protocol()`` alone, on Points built beforehand.

Prints ``RATIO …`` lines with PASS/MISS; exits 0 (a benchmark reports, it does not fail CI).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from dcmon import config
from dcmon.poller import Poller
from dcmon.config import SensorConfig
from dcmon.reading import Reading, encode_line

TARGET = 5.0

CONFIG = """
[poller]
host = "pi-garage"
[influxdb]
enabled = false
[buses.rs485]
port = "/dev/null"
"""


Inputs = list[tuple[SensorConfig, dict[str, float | bool], int, bool]]


def make_inputs(n: int, *, awkward: bool = False) -> tuple[Poller, Inputs]:
    """A Poller (no buses) and ``n`` sets of what a poll of one of 8 sensors yields: (sensor, values,
    time, energy reset), for the poller's own ``make_reading`` (so the schema cannot drift). ``awkward``:
    names and tag values with a space, comma and equals sign, for the equivalence check."""
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
    out: Inputs = []
    for i in range(n):
        v = 12.0 + (i % 97) * 0.013
        amps = 3.0 + (i % 89) * 0.071
        values = {"voltage_v": round(v, 2), "current_a": round(amps, 2), "power_w": round(v * amps, 1),
                  "energy_wh": float(1000 + i), "high_voltage_alarm": False, "low_voltage_alarm": i % 50 == 0}
        out.append((sensors[i % len(sensors)], values, t0 + i * 1_000_000_000, i % 400 == 0))
    return poller, out


def make_readings(poller: Poller, inputs: Inputs) -> list[Reading]:
    return [poller.make_reading(s, values, t, energy_reset=reset) for s, values, t, reset in inputs]


# --------------------------------------------------------------------------------- the contenders

def shipped(readings: list[Reading]) -> list[str]:
    """What the poller does for each reading (the head was made once, by the first make_reading)."""
    return [r.to_line() for r in readings]


def whole_path(poller: Poller, inputs: Inputs) -> list[str]:
    """From a meter's values to a line, as Poller._poll_sensor and poll_bus_once do."""
    return [poller.make_reading(s, values, t, energy_reset=reset).to_line() for s, values, t, reset in inputs]


def without_head(readings: list[Reading]) -> list[str]:
    return [encode_line(r.measurement, r.tags, r.fields, r.time_ns) for r in readings]


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


SHIPPED = "dcmon Reading.to_line() (shipped, head made once)"
WHOLE = "dcmon make_reading(...).to_line() (values → line)"
POINT = "influxdb_client Point: build + serialise"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--readings", type=int, default=1000, help="readings a batch (default 1000)")
    ap.add_argument("--seconds", type=float, default=3.0, help="timing budget a row (default 3)")
    ap.add_argument("--quick", action="store_true", help="200 readings, 0.2 s a row (smoke test)")
    args = ap.parse_args(argv)
    n, budget = (200, 0.2) if args.quick else (args.readings, args.seconds)

    poller, inputs = make_inputs(n)
    readings = make_readings(poller, inputs)
    awkward_poller, awkward_inputs = make_inputs(16, awkward=True)
    awkward = make_readings(awkward_poller, awkward_inputs)
    print(f"line-protocol encoding: {n} readings a batch ({len(readings[0].tags)} tags, "
          f"{len(readings[0].fields)} fields), best batch, round-robin over {budget:g} s a row")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start")
    print(f"example: {readings[0].to_line()}")
    same = sum(differences(shipped(rs), other) for rs, other in
               ((readings, without_head(readings)), (awkward, without_head(awkward)),
                (readings, whole_path(poller, inputs)), (awkward, whole_path(awkward_poller, awkward_inputs))))
    contenders: dict[str, Callable[[], object]] = {
        SHIPPED: lambda: shipped(readings),
        WHOLE: lambda: whole_path(poller, inputs),
        "dcmon encode_line (no ready head)": lambda: without_head(readings),
    }
    point = point_functions()
    if point is not None:
        build, serialise = point
        points = build(readings)
        same += differences(shipped(readings), serialise(points))
        same += differences(shipped(awkward), serialise(build(awkward)))
        contenders[POINT] = lambda: serialise(build(readings))
        contenders["influxdb_client Point.to_line_protocol() only"] = lambda: serialise(points)
    print(f"same points from every encoder (incl. names to escape): {'yes' if not same else f'NO, {same} lines differ'}")
    measured = rates(contenders, n, budget)
    for name, r in measured.items():
        print(f"{name:<50} {r:>10,.0f} readings/s  {1e6 / r:6.2f} µs each")
    if point is None:
        print("influxdb_client is not installed: for the comparison, .venv/bin/pip install influxdb-client")
        print(f"RATIO line protocol vs influxdb_client Point: not measured (target ≥ {TARGET:g}×) SKIP")
        return 0
    reference = measured[POINT]
    print(f"(not the target, for scale: the poller's whole path from values, {WHOLE.split(' (')[0]}, is "
          f"{measured[WHOLE] / reference:.1f}× {POINT}, which starts from a ready Reading)")
    ratio = measured[SHIPPED] / reference
    print(f"RATIO line protocol, {SHIPPED} vs {POINT}: {ratio:.1f}× (target ≥ {TARGET:g}×) "
          f"{'PASS' if ratio >= TARGET and not same else 'MISS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
