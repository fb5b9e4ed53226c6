"""Meter models: one register table per model, one generic decoder (``decode``)."""

from __future__ import annotations

from .base import FieldValue, Model, Register, RegType, SerialDefaults, Setting, decimals, decode, encode
from .pzem004t import PZEM004T, PZEM014, PZEM016
from .pzem017 import PZEM003, PZEM017

MODELS: dict[str, Model] = {m.name: m for m in (PZEM017, PZEM003, PZEM004T, PZEM014, PZEM016)}

__all__ = [
    "FieldValue", "Model", "Register", "RegType", "SerialDefaults", "Setting", "decimals", "decode", "encode",
    "MODELS", "PZEM003", "PZEM017", "PZEM004T", "PZEM014", "PZEM016",
]
