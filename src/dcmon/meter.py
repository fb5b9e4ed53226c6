"""Operations on one meter, shared by the poller and the bench tools: read its values, read and set its
shunt code (with read-back), read and write its settings. Knows models, not serial ports (that is Bus):
every register address comes from the model's table."""

from __future__ import annotations

from .bus import Bus
from .errors import DeviceError, UsageError
from .models import ADDRESS, FieldValue, Model, decode


def read_block(bus: Bus, model: Model, address: int, *, tries: int | None = None) -> list[int]:
    """The words of the model's block, from input registers (0x04) or holding registers (0x03)."""
    read = bus.read_holding_registers if model.function == "holding" else bus.read_input_registers
    return read(address, model.input_start, model.input_count, tries=tries)


def read_values(bus: Bus, model: Model, address: int, *, tries: int | None = None) -> dict[str, FieldValue]:
    """One read of the model's input-register block, decoded. ``tries``: see Bus.read_input_registers."""
    return decode(model, read_block(bus, model, address, tries=tries))


def read_setting(bus: Bus, model: Model, address: int, name: str) -> float:
    s = model.setting(name)
    raw = bus.read_holding_registers(address, s.address, 1)[0]
    return raw * s.scale


def write_setting(bus: Bus, model: Model, address: int, name: str, value: float, *, label: str = "") -> None:
    """Write a setting, then read it back: a meter that echoes but does not store is a DeviceError.
    (After writing the address, the read-back goes to the new address.) ``label`` names the value in
    that error, e.g. "shunt code 2 (200 A)". A value outside the setting's range is a UsageError, raised
    before anything is sent."""
    s = model.setting(name)
    if not s.minimum <= value <= s.maximum:
        raise UsageError(f"{model.title} {name} must be between {s.minimum:g} and {s.maximum:g}, not {value:g}")
    raw = int(round(value / s.scale))
    bus.write_register(address, s.address, raw)
    read_at = raw if name == ADDRESS else address
    got = bus.read_holding_registers(read_at, s.address, 1)[0]
    if got != raw:
        raise DeviceError(f"bus {bus.name!r} address {address}: wrote {label or f'{name} = {value:g}'} but the meter "
                          f"reads back {got * s.scale:g}; the meter did not accept it", bus=bus.name, address=address)


def read_shunt_code(bus: Bus, model: Model, address: int) -> int:
    """The raw value of the model's shunt register."""
    s = model.shunt_setting
    if s is None:
        raise DeviceError(f"{model.title} has no shunt setting")
    return bus.read_holding_registers(address, s.address, 1)[0]


def read_shunt(bus: Bus, model: Model, address: int) -> int | None:
    """The meter's current-range code as rated amps (None when the code is unknown)."""
    return model.shunt_amps(read_shunt_code(bus, model, address))


def set_shunt(bus: Bus, model: Model, address: int, amps: int) -> bool:
    """Make the meter's shunt code match ``amps``. Returns True if it had to be written (and read back
    correctly), False if it already matched. Raises DeviceError if the meter does not keep the new code."""
    s = model.shunt_setting
    if s is None:
        raise DeviceError(f"{model.title} has no shunt setting")
    if amps not in model.shunt_codes:
        raise UsageError(f"{model.title} shunt must be one of {sorted(model.shunt_codes)} A, not {amps}")
    if read_shunt(bus, model, address) == amps:
        return False
    code = model.shunt_codes[amps]
    write_setting(bus, model, address, s.name, code, label=f"shunt code {code} ({amps} A)")
    return True
