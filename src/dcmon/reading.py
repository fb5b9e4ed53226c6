"""The Reading value that flows from the poller to the spool, and its InfluxDB line-protocol encoding.

Line protocol reference: measurement,tag=v,... field=v,... timestamp
- measurement: escape comma and space;  tag keys/values and field keys: escape comma, equals, space;
- string field values: double quotes, escape backslash and double quote;
- floats are written with repr() (shortest round-trip), integers with the ``i`` suffix, booleans as t/f.
Each field name always has the same type (a float stays a float even when it is 2.0), because InfluxDB
refuses a point whose field type differs from the one already stored in that shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    flags: frozenset[str] = field(default_factory=frozenset)  # e.g. {"energy_reset", "calibrated"}

    def to_line(self) -> str:
        return encode_line(self.measurement, self.tags, self.fields, self.time_ns)


def escape_measurement(s: str) -> str:
    return s.translate(_MEAS_ESC)


def escape_key(s: str) -> str:
    return s.translate(_KEY_ESC)


def format_field(v: FieldScalar) -> str:
    # bool before int: bool is a subclass of int
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return f"{v}i"
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError("NaN and infinity cannot be written to InfluxDB")
        return repr(v)
    return '"' + str(v).translate(_STR_ESC) + '"'


def encode_line(measurement: str, tags: dict[str, str], fields: dict[str, FieldScalar], time_ns: int) -> str:
    """One line of line protocol, tags sorted by key (InfluxDB's preferred order). Empty tag values are
    left out (InfluxDB refuses them); a point needs at least one field."""
    if not fields:
        raise ValueError("a point needs at least one field")
    parts = [escape_measurement(measurement)]
    for k in sorted(tags):
        v = tags[k]
        if v != "":
            parts.append(f"{escape_key(k)}={escape_key(str(v))}")
    head = ",".join(parts)
    body = ",".join(f"{escape_key(k)}={format_field(v)}" for k, v in fields.items())
    return f"{head} {body} {int(time_ns)}"
