"""Meter models: one register table per model, one generic decoder (``decode``).

The registry is ``MODELS``; adding a model is a file with its table and one line here. Everything else
(config, meter operations, scan, the simulator, the shunt choices) reads what it needs from the table.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import (
    ADDRESS, SHUNT, FieldValue, Model, Register, RegType, SerialDefaults, Setting, SimBase, WordType, decimals,
    decode, encode,
)
from .pzem004t import PZEM004T, PZEM014, PZEM016
from .pzem017 import PZEM003, PZEM017

MODELS: dict[str, Model] = {m.name: m for m in (PZEM017, PZEM003, PZEM004T, PZEM014, PZEM016)}


def register(model: Model) -> Model:
    """Add a model to the registry (what the line above does for the built-in ones; a custom table too)."""
    MODELS[model.name] = model
    return model


def shunt_amps() -> tuple[int, ...]:
    """Every shunt rating some model has a code for (PZEM-017: 50, 100, 200, 300 A)."""
    return tuple(sorted({a for m in MODELS.values() for a in m.shunt_codes}))


@dataclass(frozen=True, slots=True)
class Family:
    """Models that answer the same input-block read: what ``dcmon scan`` can tell from the block's size."""

    start: int
    count: int
    function: str
    models: tuple[Model, ...]

    @property
    def label(self) -> str:
        return self.models[0].family_label


def families(models: list[Model] | None = None) -> list[Family]:
    """The probe signatures, the largest block first: a meter refuses a longer read than its own block
    (exception 02), so asking for the largest first and then shorter ones tells the families apart."""
    groups: dict[tuple[int, int, str], list[Model]] = {}
    for m in MODELS.values() if models is None else models:
        groups.setdefault((m.input_start, m.input_count, m.function), []).append(m)
    fams = [Family(s, c, f, tuple(ms)) for (s, c, f), ms in groups.items()]
    return sorted(fams, key=lambda f: (-f.count, f.start))


__all__ = [
    "ADDRESS", "SHUNT", "Family", "FieldValue", "Model", "Register", "RegType", "SerialDefaults", "Setting",
    "SimBase", "WordType", "decimals", "decode", "encode", "families", "register", "shunt_amps",
    "MODELS", "PZEM003", "PZEM017", "PZEM004T", "PZEM014", "PZEM016",
]
