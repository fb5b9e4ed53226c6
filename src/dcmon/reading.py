"""The Reading value that flows from the poller to the spool, and its InfluxDB line-protocol encoding.

Line protocol reference: measurement,tag=v,... field=v,... timestamp
- measurement: escape comma and space;  tag keys/values and field keys: escape comma, equals, space;
- string field values: double quotes, escape backslash and double quote;
- floats are written with repr() (shortest round-trip), integers with the ``i`` suffix, booleans as t/f.
Each field name always has the same type (a float stays a float even when it is 2.0), because InfluxDB
refuses a point whose field type differs from the one already stored in that shard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FieldScalar = float | int | bool | str

_MEAS_ESC = str.maketrans({",": r"\,", " ": r"\ ", "\n": r"\n"})
_KEY_ESC = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\n": r"\n"})
_STR_ESC = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n"})


@dataclass(frozen=True, slots=True)
class Reading:
    """One poll of one meter: when (wall clock, ns since the epoch, taken when the reply arrived),
    who (tags), and what (fields, named with their units)."""

    measurement: str
    time_ns: int
    tags: dict[str, str]
    fields: dict[str, FieldScalar]
    sensor: str = ""                     # the configured name (also in tags), for logs and health
    head: str = ""                       # encode_head(measurement, tags), when the poller made it once already

    def to_line(self) -> str:
        head = self.head or encode_head(self.measurement, self.tags)
        return f"{head} {encode_fields(self.fields)} {int(self.time_ns)}"


def escape_measurement(s: str) -> str:
    return s.translate(_MEAS_ESC)


def escape_key(s: str) -> str:
    return s.translate(_KEY_ESC)


def _needs_escape(s: str) -> bool:
    return "," in s or "=" in s or " " in s or "\n" in s


def format_field(v: FieldScalar) -> str:
    t = type(v)  # exact types first: floats are most of what the poller writes
    if t is float:
        if math.isfinite(v):  # type: ignore[arg-type]
            return repr(v)
        raise ValueError("NaN and infinity cannot be written to InfluxDB")
    if t is bool:
        return "true" if v else "false"
    if t is int:
        return f"{v}i"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return f"{int(v)}i"
    if isinstance(v, float):
        return format_field(float(v))
    return '"' + str(v).translate(_STR_ESC) + '"'


def encode_head(measurement: str, tags: dict[str, str]) -> str:
    """``measurement,tag=value,...``: tags sorted by key (InfluxDB's preferred order), empty values left out
    (InfluxDB refuses them). The same for every reading of a sensor, so the poller makes it once."""
    parts = [escape_measurement(measurement)]
    for k in sorted(tags):
        v = str(tags[k])
        if v != "":
            parts.append(f"{escape_key(k)}={escape_key(v)}")
    return ",".join(parts)


def encode_fields(fields: dict[str, FieldScalar]) -> str:
    if not fields:
        raise ValueError("a point needs at least one field")
    if _needs_escape("".join(fields)):
        return ",".join([f"{escape_key(k)}={format_field(v)}" for k, v in fields.items()])
    return ",".join([f"{k}={format_field(v)}" for k, v in fields.items()])


def encode_line(measurement: str, tags: dict[str, str], fields: dict[str, FieldScalar], time_ns: int) -> str:
    """One line of line protocol. A point needs at least one field."""
    return f"{encode_head(measurement, tags)} {encode_fields(fields)} {int(time_ns)}"
