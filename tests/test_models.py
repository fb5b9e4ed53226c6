"""A meter model is one file: a throwaway model written to a temporary folder and registered with one line
is accepted by the config, served by the simulator, read by the meter operations and found by ``dcmon scan``,
with no other change. And the register types decode and encode themselves, checked against hand-made words."""

from __future__ import annotations

import importlib.util
import math

import pytest

from dcmon import config, models
from dcmon.bus import Bus, BusSettings
from dcmon.cli import main
from dcmon.errors import ConfigError
from dcmon.meter import read_shunt, read_values, set_shunt
from dcmon.models import PZEM017, RegType
from dcmon.simulator import SimMeter, Simulator, meters_for

ACME = '''\
"""ACME-6 (made up for a test): 6 input registers, 32-bit values high word first, a signed current."""
from dcmon.models.base import ADDRESS, SHUNT, Model, Register, RegType, SerialDefaults, Setting, SimBase

ACME6 = Model(
    name="acme6", title="ACME-6", kind="dc", serial=SerialDefaults(stopbits=2),
    input_start=0x0000, input_count=6,
    inputs=(
        Register(0x0000, "voltage_v", RegType.U16, 0.1),
        Register(0x0001, "current_a", RegType.S16, 0.01),
        Register(0x0002, "power_w", RegType.U32_HIGH_WORD_FIRST, 0.1),
        Register(0x0004, "energy_wh", RegType.U32_HIGH_WORD_FIRST, 1.0),
    ),
    settings=(
        Setting(0x0010, ADDRESS, 1, 1, 247, "Modbus address", default=None),
        Setting(0x0011, SHUNT, 1, 0, 1, "shunt code: 0=20A 1=40A", default=0),
    ),
    shunt_codes={20: 0, 40: 1},
    max_current_a=40.0, max_voltage_v=60.0,
    sim=SimBase(voltage_v=48.0, current_a=5.0, current_step_a=1.0),
)
'''


@pytest.fixture
def acme(tmp_path, monkeypatch):
    """The model's one file, imported from a temporary folder, plus the one registry line."""
    path = tmp_path / "acme6.py"
    path.write_text(ACME)
    spec = importlib.util.spec_from_file_location("acme6_model", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setitem(models.MODELS, "acme6", mod.ACME6)   # the registry line: MODELS gets the model
    return mod.ACME6


def cfg_text(port: str, model: str, shunt: str = "") -> str:
    return f"""
[influxdb]
enabled = false
[buses.bench]
port = "{port}"
timeout_s = 0.1
retries = 0
gap_s = 0.005
[[sensors]]
name = "solar"
bus = "bench"
address = 3
model = "{model}"
{shunt}
"""


def test_the_config_accepts_a_registered_model_and_its_own_shunt_set(acme, tmp_path):
    p = tmp_path / "config.toml"
    p.write_text(cfg_text("/dev/null", "acme6", "shunt_a = 40"))
    cfg = config.load(p)
    assert cfg.sensors[0].meter is acme and cfg.sensors[0].shunt_a == 40
    assert models.shunt_amps() == (20, 40, 50, 100, 200, 300)
    p.write_text(cfg_text("/dev/null", "pzem017", "shunt_a = 40"))   # 40 A is the ACME's, not the PZEM-017's
    with pytest.raises(ConfigError, match=r"sensors\[0\]\.shunt_a: the PZEM-017 has shunt codes for 50, 100, 200, 300 A only"):
        config.load(p)
    p.write_text(cfg_text("/dev/null", "acme6", "shunt_a = 50"))
    with pytest.raises(ConfigError, match="ACME-6 has shunt codes for 20, 40 A only"):
        config.load(p)


def test_without_the_registry_line_the_model_is_unknown(tmp_path):
    p = tmp_path / "config.toml"
    p.write_text(cfg_text("/dev/null", "acme6"))
    with pytest.raises(ConfigError, match="unknown model"):
        config.load(p)


def test_simulator_and_meter_reads_use_the_table(acme):
    (m,) = meters_for([("acme6", 3)], steady=True)
    assert m.holding == {0x0010: 3, 0x0011: 0}          # power-up values from the table
    with Simulator([m]) as sim:
        bus = Bus(BusSettings(name="bench", port=sim.path, stopbits=2, timeout_s=0.2, retries=0, gap_s=0.005))
        with bus:
            v = read_values(bus, acme, 3)
            assert read_shunt(bus, acme, 3) == 20
            assert set_shunt(bus, acme, 3, 40) is True    # written to 0x0011 and read back
            assert m.holding[0x0011] == 1
    assert v["voltage_v"] == 48.0
    assert v["current_a"] == pytest.approx(5.0 * 20 / 100)   # the shunt code scales the current
    assert set(v) == {"voltage_v", "current_a", "power_w", "energy_wh"}


def test_scan_finds_the_model_by_its_probe_signature(acme, capsys):
    meters = [SimMeter(acme, 2, base_voltage_v=48.0, base_current_a=5.0, steady=True),
              SimMeter(PZEM017, 5, steady=True)]
    with Simulator(meters) as sim:
        rc = main(["scan", "--port", sim.path, "--range", "1-6", "--timeout", "0.05"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert out[1].split()[:4] == ["2", "ACME-6", "20", "A"]
    assert out[2].split()[:4] == ["5", "PZEM-017", "100", "A"]


@pytest.mark.parametrize("name, words, value", [
    ("U16", [0x1234], 0x1234),
    ("S16", [0xFFFE], -2),
    ("U32_LOW_WORD_FIRST", [0x0002, 0x0001], 0x0001_0002),
    ("U32_HIGH_WORD_FIRST", [0x0001, 0x0002], 0x0001_0002),
    ("S32_LOW_WORD_FIRST", [0xFFFF, 0xFFFF], -1),
    ("S32_HIGH_WORD_FIRST", [0xFFFF, 0xFFFE], -2),
    ("F32_HIGH_WORD_FIRST", [0x4366, 0xB333], 230.7),     # IEEE 754 0x4366B333 = 230.7 (SDM120 voltage)
    ("F32_LOW_WORD_FIRST", [0xB333, 0x4366], 230.7),
    ("ALARM_U16", [0xFFFF], True),
])
def test_each_register_type_decodes_and_encodes_itself(name, words, value):
    t = RegType.all()[name]
    got = t.decode(words, 1.0)
    assert got == pytest.approx(value, rel=1e-6) if isinstance(value, float) else got == value
    assert t.encode(value, 1.0) == words
    assert len(words) == t.words


def test_a_float_that_is_not_a_number_decodes_as_nan():
    assert math.isnan(RegType.F32_HIGH_WORD_FIRST.decode([0x7FC0, 0x0000], 1.0))
