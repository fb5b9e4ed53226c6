"""Register maps as data, and the one generic decoder every model uses.

A model is a table: one line per register, like Victron's dbus-modbus-client, with the word order spelled
in the type's name (``U32_LOW_WORD_FIRST``), so a reader can check each line against the manual.
Nothing here talks to a serial port; the bus module moves the words, this module gives them meaning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from enum import Enum
from typing import Literal

FieldValue = float | bool


class RegType(Enum):
    """How the 16-bit words of one value are laid out (Modbus words are big-endian on the wire)."""

    U16 = 1                 # one word, unsigned
    U32_LOW_WORD_FIRST = 2  # two words, the low 16 bits at the lower register address (all PZEM meters)
    ALARM_U16 = 3           # 0xFFFF = alarm, 0x0000 = no alarm (anything else is read as "alarm")

    @property
    def words(self) -> int:
        return 2 if self is RegType.U32_LOW_WORD_FIRST else 1


@dataclass(frozen=True, slots=True)
class Register:
    """One measured value: where it is, how it is laid out, what one count is worth, and its field name.

    Field names carry their unit (``voltage_v``) so that the InfluxDB schema explains itself."""

    address: int
    name: str
    type: RegType
    scale: float = 1.0
    description: str = ""


@dataclass(frozen=True, slots=True)
class Setting:
    """One holding register the bench tools may read or write."""

    address: int
    name: str
    scale: float = 1.0
    minimum: float = 0
    maximum: float = 0xFFFF
    description: str = ""


@dataclass(frozen=True, slots=True)
class SerialDefaults:
    baudrate: int = 9600
    bytesize: int = 8
    parity: Literal["N", "E", "O"] = "N"
    stopbits: int = 2


@dataclass(frozen=True, slots=True)
class Model:
    """A meter model: its serial framing, its input-register block and its settings."""

    name: str                       # config value, e.g. "pzem017"
    title: str                      # for people, e.g. "PZEM-017"
    kind: Literal["dc", "ac"]       # selects the InfluxDB measurement
    serial: SerialDefaults
    input_start: int                # first input register of the one block read per poll
    input_count: int                # how many registers that read asks for (the meter refuses more)
    inputs: tuple[Register, ...]
    settings: tuple[Setting, ...] = ()
    shunt_codes: dict[int, int] = field(default_factory=dict)  # rated amps -> value of the range register
    has_reset_energy: bool = True   # function 0x42
    max_current_a: float = 0.0      # for plausibility checks and the simulator
    max_voltage_v: float = 0.0

    def setting(self, name: str) -> Setting:
        for s in self.settings:
            if s.name == name:
                return s
        raise KeyError(f"{self.title} has no setting {name!r}")

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.inputs)

    def shunt_amps(self, code: int) -> int | None:
        for amps, c in self.shunt_codes.items():
            if c == code:
                return amps
        return None


def decode(model: Model, words: list[int] | tuple[int, ...]) -> dict[str, FieldValue]:
    """Turn the words of one input-register block read into named, scaled values.

    ``words[0]`` is register ``model.input_start``. Raises ValueError when the block is too short
    (the bus layer checks lengths first, so this means a table error, not a line error)."""
    if len(words) < model.input_count:
        raise ValueError(f"{model.title}: expected {model.input_count} registers, got {len(words)}")
    out: dict[str, FieldValue] = {}
    base = model.input_start
    for reg in model.inputs:
        i = reg.address - base
        t = reg.type
        if t is RegType.U16:
            out[reg.name] = words[i] * reg.scale
        elif t is RegType.U32_LOW_WORD_FIRST:
            out[reg.name] = (words[i] | (words[i + 1] << 16)) * reg.scale
        else:  # ALARM_U16
            out[reg.name] = words[i] != 0
    # Scaling by 0.01 gives 13.440000000000001; round to the register's resolution so that what we
    # store is exactly what the meter said.
    for reg in model.inputs:
        v = out[reg.name]
        if not isinstance(v, bool):
            out[reg.name] = round(v, decimals(reg.scale))
    return out


def encode(model: Model, values: dict[str, FieldValue]) -> list[int]:
    """The inverse of decode (used by the simulator and by tests that build frames by hand)."""
    words = [0] * model.input_count
    base = model.input_start
    for reg in model.inputs:
        i = reg.address - base
        v = values.get(reg.name, 0)
        if reg.type is RegType.ALARM_U16:
            words[i] = 0xFFFF if v else 0
            continue
        raw = int(round(float(v) / reg.scale))
        if reg.type is RegType.U16:
            words[i] = max(0, min(raw, 0xFFFF))
        else:
            raw = max(0, min(raw, 0xFFFFFFFF))
            words[i], words[i + 1] = raw & 0xFFFF, raw >> 16
    return words


@lru_cache(maxsize=None)
def decimals(scale: float) -> int:
    """Digits after the point that a register's resolution justifies: 0.01 → 2, 0.1 → 1, 1 → 0."""
    d = 0
    while d < 6 and abs(round(scale * 10**d) - scale * 10**d) > 1e-9:
        d += 1
    return d
