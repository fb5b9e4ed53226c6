"""Operations on one meter, shared by the poller and the bench tools: read its values, read and set its
shunt code (with read-back), read and write its settings. Knows models, not serial ports (that is Bus)."""

from __future__ import annotations

from .bus import Bus
from .errors import DeviceError
from .models import FieldValue, Model, decode

SHUNT_REGISTER = 0x0003


def read_values(bus: Bus, model: Model, address: int, *, tries: int | None = None) -> dict[str, FieldValue]:
    """One read of the model's input-register block, decoded. ``tries``: see Bus.read_input_registers."""
    return decode(model, bus.read_input_registers(address, model.input_start, model.input_count, tries=tries))


def read_setting(bus: Bus, model: Model, address: int, name: str) -> float:
    s = model.setting(name)
    raw = bus.read_holding_registers(address, s.address, 1)[0]
    return raw * s.scale


def write_setting(bus: Bus, model: Model, address: int, name: str, value: float, *, label: str = "") -> None:
    """Write a setting, then read it back: a meter that echoes but does not store is a DeviceError.
    (After writing the address, the read-back goes to the new address.) ``label`` names the value in
    that error, e.g. "shunt code 2 (200 A)"."""
    s = model.setting(name)
    if not s.minimum <= value <= s.maximum:
        raise DeviceError(f"{model.title} {name} must be between {s.minimum:g} and {s.maximum:g}, not {value:g}")
    raw = int(round(value / s.scale))
    bus.write_register(address, s.address, raw)
    read_at = raw if name == "address" else address
    got = bus.read_holding_registers(read_at, s.address, 1)[0]
    if got != raw:
        raise DeviceError(f"bus {bus.name!r} address {address}: wrote {label or f'{name} = {value:g}'} but the meter "
                          f"reads back {got * s.scale:g}; the meter did not accept it", bus=bus.name, address=address)


def read_shunt(bus: Bus, model: Model, address: int) -> int | None:
    """The meter's current-range code as rated amps (None when the code is unknown)."""
    if not model.shunt_codes:
        raise DeviceError(f"{model.title} has no shunt setting")
    code = bus.read_holding_registers(address, SHUNT_REGISTER, 1)[0]
    return model.shunt_amps(code)


def set_shunt(bus: Bus, model: Model, address: int, amps: int) -> bool:
    """Make the meter's shunt code match ``amps``. Returns True if it had to be written (and read back
    correctly), False if it already matched. Raises DeviceError if the meter does not keep the new code."""
    if amps not in model.shunt_codes:
        raise DeviceError(f"{model.title} shunt must be one of {sorted(model.shunt_codes)} A, not {amps}")
    if read_shunt(bus, model, address) == amps:
        return False
    code = model.shunt_codes[amps]
    write_setting(bus, model, address, "current_range", code, label=f"shunt code {code} ({amps} A)")
    return True
