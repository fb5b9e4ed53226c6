"""PZEM-017 (DC, external 75 mV shunt, RS485) and PZEM-003 (DC, internal 10 A shunt, RS485).

Source: the PZEM-003/017 user manual, checked against ESPHome ``pzemdc`` and Tasmota ``xnrg_06_pzem_dc``.

Reply to ``01 04 00 00 00 08 F1 CC`` (read 8 input registers from 0x0000), 21 bytes:

    01        address
    04        function: read input registers
    10        byte count = 16 (8 registers)
    05 40     0x0000 voltage                    0x0540 = 1344  × 0.01 V = 13.44 V
    00 0A     0x0001 current (unsigned)         0x000A = 10    × 0.01 A = 0.10 A
    00 0D     0x0002 power, low word            ┐ 0x0000_000D = 13 × 0.1 W = 1.3 W
    00 00     0x0003 power, high word           ┘
    00 02     0x0004 energy, low word           ┐ 0x0000_0002 = 2 Wh
    00 00     0x0005 energy, high word          ┘
    00 00     0x0006 high-voltage alarm         0xFFFF = alarm
    00 00     0x0007 low-voltage alarm          0xFFFF = alarm
    D6 29     CRC-16/MODBUS, low byte first

One manual table says 0.01 W / 0.01 Wh; its own worked example and every implementation use 0.1 W and
1 Wh, and so do we. Asking for more than 8 input registers gets exception 02.
"""

from __future__ import annotations

from .base import ADDRESS, SHUNT, Model, Register, RegType, SerialDefaults, Setting, SimBase

_DC_SERIAL = SerialDefaults(baudrate=9600, bytesize=8, parity="N", stopbits=2)  # 8N2

#            address  field name             type                          scale
_DC_INPUTS = (
    Register(0x0000, "voltage_v",          RegType.U16,                0.01, "bus voltage"),
    Register(0x0001, "current_a",          RegType.U16,                0.01, "current, unsigned (no direction)"),
    Register(0x0002, "power_w",            RegType.U32_LOW_WORD_FIRST, 0.1,  "power"),
    Register(0x0004, "energy_wh",          RegType.U32_LOW_WORD_FIRST, 1.0,  "energy counter"),
    Register(0x0006, "high_voltage_alarm", RegType.ALARM_U16,          1.0,  "voltage above the high threshold"),
    Register(0x0007, "low_voltage_alarm",  RegType.ALARM_U16,          1.0,  "voltage below the low threshold"),
)

#            address  name                       scale   min    max
_DC_SETTINGS = (
    Setting(0x0000, "high_voltage_alarm_v", 0.01, 5.0, 350.0, "high-voltage alarm threshold (default 300 V)",
            default=300.0, alarm="high_voltage_alarm", of="voltage_v", above=True),
    Setting(0x0001, "low_voltage_alarm_v",  0.01, 1.0, 350.0, "low-voltage alarm threshold (default 7 V)",
            default=7.0, alarm="low_voltage_alarm", of="voltage_v", above=False),
    Setting(0x0002, ADDRESS,                1,    1,   247,   "Modbus address", default=None),
)
_DC_FAMILY = "PZEM-003/017 (DC)"   # what scan says before the shunt register tells the two apart
_DC_SIM = SimBase(voltage_v=13.2, current_a=8.0, current_step_a=3.0)

# Current range register 0x0003 (PZEM-017 only), per the manual: 0 = 100 A (factory), 1 = 50 A,
# 2 = 200 A, 3 = 300 A. One popular firmware maps these the other way round; the manual and several
# libraries agree with this order.
SHUNT_CODES = {100: 0x0000, 50: 0x0001, 200: 0x0002, 300: 0x0003}

PZEM017 = Model(
    name="pzem017",
    title="PZEM-017",
    kind="dc",
    serial=_DC_SERIAL,
    input_start=0x0000,
    input_count=8,
    inputs=_DC_INPUTS,
    settings=_DC_SETTINGS + (Setting(0x0003, SHUNT, 1, 0, 3, "shunt code: 0=100A 1=50A 2=200A 3=300A",
                                     default=SHUNT_CODES[100]),),  # factory default: 100 A
    shunt_codes=SHUNT_CODES,
    max_current_a=300.0,
    max_voltage_v=300.0,
    family=_DC_FAMILY,
    sim=_DC_SIM,
)

PZEM003 = Model(
    name="pzem003",
    title="PZEM-003",
    kind="dc",
    serial=_DC_SERIAL,
    input_start=0x0000,
    input_count=8,
    inputs=_DC_INPUTS,
    settings=_DC_SETTINGS,  # internal 10 A shunt: no range register
    max_current_a=10.0,
    max_voltage_v=300.0,
    family=_DC_FAMILY,
    sim=_DC_SIM,
)
