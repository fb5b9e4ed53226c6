"""PZEM-004T v3 (TTL), PZEM-014 and PZEM-016 (RS485): AC meters, 9600 8N1 (8N2 breaks them).

Source: the PZEM-004T v3 manual, checked against ESPHome ``pzemac`` and the Arduino ``PZEM-004T-v30``.
Reply to ``01 04 00 00 00 0A 70 0D`` (read 10 input registers from 0x0000), 25 bytes, as published in ESPHome
``pzemac.cpp`` and Tasmota ``xnrg_05_pzem_ac.ino``:

    01 04 14  address, function, byte count = 20
    08 D1     0x0000 voltage                       2257 × 0.1 V   = 225.7 V
    00 6C     0x0001 current, low word             ┐ 108 × 0.001 A = 0.108 A
    00 00     0x0002 current, high word            ┘
    00 F4     0x0003 power, low word               ┐ 244 × 0.1 W   = 24.4 W
    00 00     0x0004 power, high word              ┘
    00 26     0x0005 energy, low word              ┐ 0x26 = 38 Wh
    00 00     0x0006 energy, high word             ┘
    01 F4     0x0007 frequency                     500 × 0.1 Hz  = 50.0 Hz
    00 64     0x0008 power factor                  100 × 0.01    = 1.00
    00 00     0x0009 power alarm                   0xFFFF = alarm
    51 34     CRC-16/MODBUS, low byte first

The metering chip is powered from the AC side: with no mains the meter does not answer at all.
"""

from __future__ import annotations

from .base import ADDRESS, Model, Register, RegType, SerialDefaults, Setting, SimBase

_AC_SERIAL = SerialDefaults(baudrate=9600, bytesize=8, parity="N", stopbits=1)  # 8N1

#            address  field name        type                          scale
_AC_INPUTS = (
    Register(0x0000, "voltage_v",     RegType.U16,                0.1,   "voltage"),
    Register(0x0001, "current_a",     RegType.U32_LOW_WORD_FIRST, 0.001, "current"),
    Register(0x0003, "power_w",       RegType.U32_LOW_WORD_FIRST, 0.1,   "active power"),
    Register(0x0005, "energy_wh",     RegType.U32_LOW_WORD_FIRST, 1.0,   "energy counter"),
    Register(0x0007, "frequency_hz",  RegType.U16,                0.1,   "frequency"),
    Register(0x0008, "power_factor",  RegType.U16,                0.01,  "power factor"),
    Register(0x0009, "power_alarm",   RegType.ALARM_U16,          1.0,   "power above the alarm threshold"),
)

_AC_SETTINGS = (
    Setting(0x0001, "power_alarm_w", 1, 0, 23000, "power alarm threshold (W)",
            default=23000, alarm="power_alarm", of="power_w", above=True),
    Setting(0x0002, ADDRESS,         1, 1, 247,   "Modbus address", default=None),
)


def _ac(name: str, title: str, max_current_a: float) -> Model:
    return Model(
        name=name,
        title=title,
        kind="ac",
        serial=_AC_SERIAL,
        input_start=0x0000,
        input_count=10,
        inputs=_AC_INPUTS,
        settings=_AC_SETTINGS,
        max_current_a=max_current_a,
        max_voltage_v=260.0,
        family="PZEM-004T/014/016 (AC)",   # one family: scan cannot tell them apart
        sim=SimBase(voltage_v=230.0, current_a=1.5, current_step_a=1.0),
    )


PZEM004T = _ac("pzem004t", "PZEM-004T v3", 100.0)
PZEM014 = _ac("pzem014", "PZEM-014", 10.0)
PZEM016 = _ac("pzem016", "PZEM-016", 100.0)
