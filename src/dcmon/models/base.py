"""Register maps as data, and the one generic decoder every model uses.

A model is a table: one line per register, like Victron's dbus-modbus-client, with the word order spelled
in the type's name (``U32_LOW_WORD_FIRST``), so a reader can check each line against the manual. Each
register type decodes and encodes itself (``RegType.U16.decode(words, scale)``); the model also names its
holding registers (address, shunt code, alarm thresholds), how ``dcmon scan`` recognises it, and what the
simulator needs. Nothing here talks to a serial port; the bus module moves the words, this module gives
them meaning. Adding a model: a file with its table, and one line in ``models/__init__.py``.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import ClassVar, Literal

FieldValue = float | bool

ADDRESS = "address"          # the name of the holding register that holds the Modbus address
SHUNT = "current_range"      # the name of the holding register that holds the shunt code


@dataclass(frozen=True, slots=True)
class WordType:
    """How the 16-bit words of one value are laid out (Modbus words are big-endian on the wire).
    Subclasses turn ``words`` words into a value and back."""

    name: str
    words: int = 1

    def decode(self, words: list[int] | tuple[int, ...], scale: float) -> FieldValue:
        """The value in ``words`` (exactly ``self.words`` of them), scaled."""
        return self.decode_at(words, 0, scale)

    def decode_at(self, words: list[int] | tuple[int, ...], i: int, scale: float) -> FieldValue:
        """The value whose first word is ``words[i]`` (the decoder's fast path: no slicing)."""
        return self.decode(words[i:i + self.words], scale)

    def encode(self, value: FieldValue, scale: float) -> list[int]:
        raise NotImplementedError

    @property
    def is_flag(self) -> bool:
        return False

    @property
    def max_raw(self) -> int:
        """The largest count the register can hold (all ones: what a glitch reads as)."""
        return (1 << (16 * self.words)) - 1

    def __str__(self) -> str:
        return self.name


def _join(words: list[int] | tuple[int, ...], low_word_first: bool) -> int:
    ws = reversed(words) if low_word_first else words
    raw = 0
    for w in ws:
        raw = (raw << 16) | w
    return raw


def _split(raw: int, n: int, low_word_first: bool) -> list[int]:
    out = [(raw >> (16 * k)) & 0xFFFF for k in range(n)]  # low word first
    return out if low_word_first else out[::-1]


@dataclass(frozen=True, slots=True)
class Unsigned(WordType):
    low_word_first: bool = False

    def decode(self, words: list[int] | tuple[int, ...], scale: float) -> FieldValue:
        return _join(words, self.low_word_first) * scale

    def decode_at(self, words: list[int] | tuple[int, ...], i: int, scale: float) -> FieldValue:
        if self.words == 1:
            return words[i] * scale
        if self.words == 2:
            lo, hi = (words[i], words[i + 1]) if self.low_word_first else (words[i + 1], words[i])
            return (lo | (hi << 16)) * scale
        return _join(words[i:i + self.words], self.low_word_first) * scale

    def encode(self, value: FieldValue, scale: float) -> list[int]:
        raw = max(0, min(int(round(float(value) / scale)), self.max_raw))
        return _split(raw, self.words, self.low_word_first)


@dataclass(frozen=True, slots=True)
class Signed(Unsigned):
    def decode(self, words: list[int] | tuple[int, ...], scale: float) -> FieldValue:
        raw = _join(words, self.low_word_first)
        bits = 16 * self.words
        if raw >> (bits - 1):
            raw -= 1 << bits
        return raw * scale

    def encode(self, value: FieldValue, scale: float) -> list[int]:
        bits = 16 * self.words
        raw = max(-(1 << (bits - 1)), min(int(round(float(value) / scale)), (1 << (bits - 1)) - 1))
        return _split(raw & ((1 << bits) - 1), self.words, self.low_word_first)

    def decode_at(self, words: list[int] | tuple[int, ...], i: int, scale: float) -> FieldValue:
        return self.decode(words[i:i + self.words], scale)

    @property
    def max_raw(self) -> int:
        return (1 << (16 * self.words - 1)) - 1


@dataclass(frozen=True, slots=True)
class Float32(WordType):
    """IEEE 754 single precision in two words (Eastron SDM meters: high word first)."""

    words: int = 2
    low_word_first: bool = False

    def decode(self, words: list[int] | tuple[int, ...], scale: float) -> FieldValue:
        v: float = struct.unpack(">f", _join(words, self.low_word_first).to_bytes(4, "big"))[0]
        return v * scale if math.isfinite(v) else math.nan

    def encode(self, value: FieldValue, scale: float) -> list[int]:
        raw = int.from_bytes(struct.pack(">f", float(value) / scale), "big")
        return _split(raw, 2, self.low_word_first)

    @property
    def max_raw(self) -> int:
        return int(3.4e38)


@dataclass(frozen=True, slots=True)
class Alarm(WordType):
    """0xFFFF = alarm, 0x0000 = no alarm (anything else is read as "alarm")."""

    def decode(self, words: list[int] | tuple[int, ...], scale: float) -> FieldValue:
        return words[0] != 0

    def decode_at(self, words: list[int] | tuple[int, ...], i: int, scale: float) -> FieldValue:
        return words[i] != 0

    @property
    def is_flag(self) -> bool:
        return True

    def encode(self, value: FieldValue, scale: float) -> list[int]:
        return [0xFFFF if value else 0]


class RegType:
    """The register types by name. The name says the layout: ``U32_LOW_WORD_FIRST`` is two words, the low
    16 bits at the lower register address (all PZEM meters); ``..._HIGH_WORD_FIRST`` the other way round."""

    U16: ClassVar[WordType] = Unsigned("U16", 1)
    S16: ClassVar[WordType] = Signed("S16", 1)
    U32_LOW_WORD_FIRST: ClassVar[WordType] = Unsigned("U32_LOW_WORD_FIRST", 2, low_word_first=True)
    U32_HIGH_WORD_FIRST: ClassVar[WordType] = Unsigned("U32_HIGH_WORD_FIRST", 2)
    S32_LOW_WORD_FIRST: ClassVar[WordType] = Signed("S32_LOW_WORD_FIRST", 2, low_word_first=True)
    S32_HIGH_WORD_FIRST: ClassVar[WordType] = Signed("S32_HIGH_WORD_FIRST", 2)
    F32_HIGH_WORD_FIRST: ClassVar[WordType] = Float32("F32_HIGH_WORD_FIRST")
    F32_LOW_WORD_FIRST: ClassVar[WordType] = Float32("F32_LOW_WORD_FIRST", low_word_first=True)
    ALARM_U16: ClassVar[WordType] = Alarm("ALARM_U16", 1)

    @classmethod
    def all(cls) -> dict[str, WordType]:
        return {k: v for k, v in vars(cls).items() if isinstance(v, WordType)}


@dataclass(frozen=True, slots=True)
class Register:
    """One measured value: where it is, how it is laid out, what one count is worth, and its field name.

    Field names carry their unit (``voltage_v``) so that the InfluxDB schema explains itself.
    ``resolution``: the step the meter measures in, for rounding and for the calibration's spec (default:
    the scale)."""

    address: int
    name: str
    type: WordType
    scale: float = 1.0
    description: str = ""
    unit: str = ""
    resolution: float = 0.0

    @property
    def step(self) -> float:
        return self.resolution or self.scale


@dataclass(frozen=True, slots=True)
class Setting:
    """One holding register the bench tools may read or write (and the simulator serves).

    ``default``: its value at power-up, in units (None: the meter's own address, for ``address``).
    An alarm threshold names the input field it drives (``alarm``), the quantity it compares (``of``) and
    whether it trips ``above`` it or below: the simulator computes the alarm from that."""

    address: int
    name: str
    scale: float = 1.0
    minimum: float = 0
    maximum: float = 0xFFFF
    description: str = ""
    default: float | None = 0
    alarm: str = ""
    of: str = ""
    above: bool = True


@dataclass(frozen=True, slots=True)
class SerialDefaults:
    baudrate: int = 9600
    bytesize: int = 8
    parity: Literal["N", "E", "O"] = "N"
    stopbits: int = 2


@dataclass(frozen=True, slots=True)
class SimBase:
    """What the simulator makes a meter of this model read by default (``meters_for``)."""

    voltage_v: float = 13.2
    current_a: float = 8.0
    current_step_a: float = 3.0   # the n-th meter reads current_a + n × this


@dataclass(frozen=True, slots=True)
class Model:
    """A meter model: its serial framing, its input-register block, its holding registers, how ``dcmon scan``
    recognises it (``family``: the label shown when only the input block's size is known; models with the
    same block are one family, told apart by their shunt register) and what the simulator needs."""

    name: str                       # config value, e.g. "pzem017"
    title: str                      # for people, e.g. "PZEM-017"
    kind: Literal["dc", "ac"]       # selects the InfluxDB measurement (influxdb.measurement / measurement_ac)
    serial: SerialDefaults
    input_start: int                # first input register of the one block read per poll
    input_count: int                # how many registers that read asks for (the meter refuses more)
    inputs: tuple[Register, ...]
    settings: tuple[Setting, ...] = ()
    shunt_codes: dict[int, int] = field(default_factory=dict)  # rated amps -> value of the range register
    has_reset_energy: bool = True   # function 0x42
    max_current_a: float = 0.0      # for plausibility checks and the simulator
    max_voltage_v: float = 0.0
    family: str = ""                # scan's label for the family (default: the title)
    sim: SimBase = SimBase()
    function: Literal["input", "holding"] = "input"  # which registers the block is read from (0x04 / 0x03)
    measurement: str = ""           # an explicit InfluxDB measurement (custom models); "" = by kind
    plan: tuple[tuple[str, Callable[[Sequence[int], int, float], FieldValue], int, float, int | None], ...] = field(
        init=False, repr=False, compare=False)   # decode's per-register steps, made once

    def __post_init__(self) -> None:
        object.__setattr__(self, "plan", tuple(
            (r.name, r.type.decode_at, r.address - self.input_start, r.scale,
             None if r.type.is_flag else decimals(r.step)) for r in self.inputs))

    def setting(self, name: str) -> Setting:
        for s in self.settings:
            if s.name == name:
                return s
        raise KeyError(f"{self.title} has no setting {name!r}")

    def find_setting(self, name: str) -> Setting | None:
        return next((s for s in self.settings if s.name == name), None)

    @property
    def address_setting(self) -> Setting | None:
        return self.find_setting(ADDRESS)

    @property
    def shunt_setting(self) -> Setting | None:
        return self.find_setting(SHUNT) if self.shunt_codes else None

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.inputs)

    def register(self, name: str) -> Register | None:
        return next((r for r in self.inputs if r.name == name), None)

    @property
    def family_label(self) -> str:
        return self.family or self.title

    @property
    def shunt_amps_set(self) -> tuple[int, ...]:
        return tuple(sorted(self.shunt_codes))

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
    for name, dec, i, scale, digits in model.plan:
        v = dec(words, i, scale)
        # Scaling by 0.01 gives 13.440000000000001; round to the register's resolution so that what we
        # store is exactly what the meter said.
        out[name] = v if digits is None else round(v, digits)
    return out


def encode(model: Model, values: dict[str, FieldValue]) -> list[int]:
    """The inverse of decode (used by the simulator and by tests that build frames by hand)."""
    words = [0] * model.input_count
    base = model.input_start
    for reg in model.inputs:
        i = reg.address - base
        words[i:i + reg.type.words] = reg.type.encode(values.get(reg.name, 0), reg.scale)
    return words


@lru_cache(maxsize=None)
def decimals(scale: float) -> int:
    """Digits after the point that a register's resolution justifies: 0.01 → 2, 0.1 → 1, 1 → 0."""
    d = 0
    while d < 6 and abs(round(scale * 10**d) - scale * 10**d) > 1e-9:
        d += 1
    return d
