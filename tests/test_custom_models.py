"""A user-defined register table in the config (``[models.NAME]``): validated before any I/O like the rest,
decoded like a built-in table (the PZEM-017 rewritten as a table decodes the published frames of
tests/test_frames.py identically), and polled by the poller, which skips the checks a table lacks the fields
for (no power, no energy counter)."""

from __future__ import annotations

import pytest

from dcmon import config
from dcmon.bus import Bus, BusSettings
from dcmon.errors import ConfigError
from dcmon.meter import read_values
from dcmon.models import MODELS, PZEM017, decode
from dcmon.poller import Poller, is_plausible
from dcmon.simulator import SimMeter, Simulator
from test_frames import REPLIES, payload_words

PZEM017_TABLE = """
[models.pzem017t]
title = "PZEM-017 written as a table"
measurement = "dc_power"
stopbits = 2
max_voltage_v = 300.0
max_current_a = 300.0
fields = [
  { name = "voltage_v",          register = 0x0000, type = "u16", scale = 0.01, unit = "V" },
  { name = "current_a",          register = 0x0001, type = "u16", scale = 0.01, unit = "A" },
  { name = "power_w",            register = 0x0002, type = "u32", word_order = "low_first", scale = 0.1, unit = "W" },
  { name = "energy_wh",          register = 0x0004, type = "u32", word_order = "low_first", scale = 1.0, unit = "Wh" },
  { name = "high_voltage_alarm", register = 0x0006, type = "alarm" },
  { name = "low_voltage_alarm",  register = 0x0007, type = "alarm" },
]
"""

SDM120 = """
[models.sdm120]
title = "Eastron SDM120"
measurement = "ac_power"
function = "input"
baudrate = 9600
stopbits = 1
max_voltage_v = 276.0
max_current_a = 45.0

[[models.sdm120.fields]]
name = "voltage_v"
register = 0x0000
type = "f32"
word_order = "high_first"
unit = "V"
resolution = 0.1

[[models.sdm120.fields]]
name = "current_a"
register = 0x0006
type = "f32"
unit = "A"
resolution = 0.01

[[models.sdm120.fields]]
name = "frequency_hz"
register = 0x0046
type = "f32"
unit = "Hz"
"""


def cfg(tmp_path, models: str, model: str = "sdm120", extra: str = ""):
    p = tmp_path / "config.toml"
    p.write_text(f"""
[influxdb]
enabled = false
[poller]
host = "lab"
[buses.a]
port = "/dev/null"
timeout_s = 0.5
retries = 0
gap_s = 0.005
[[sensors]]
name = "mains"
bus = "a"
address = 1
model = "{model}"
{extra}
{models}""")
    return config.load(p, env={})


def test_the_pzem017_as_a_table_decodes_the_published_frames_like_the_built_in_one(tmp_path):
    table = cfg(tmp_path, PZEM017_TABLE, "pzem017t").sensors[0].meter
    assert (table.input_start, table.input_count) == (0, 8)
    frames = [r for r in REPLIES if "pzem017" in r.models]
    assert len(frames) >= 3
    for r in frames:
        words = payload_words(r.raw)
        assert decode(table, words) == decode(PZEM017, words), r.source


def test_the_table_reads_a_meter_like_the_built_in_one(tmp_path):
    table = cfg(tmp_path, PZEM017_TABLE, "pzem017t").sensors[0].meter
    with Simulator([SimMeter(PZEM017, 1, base_voltage_v=26.4, base_current_a=12.3, steady=True,
                             energy_wh=70_000.0)]) as sim:
        with Bus(BusSettings(name="a", port=sim.path, stopbits=2, timeout_s=0.2, retries=0, gap_s=0.005)) as bus:
            assert read_values(bus, table, 1) == read_values(bus, PZEM017, 1)


def test_a_custom_meter_is_polled_without_power_or_energy(tmp_path):
    c = cfg(tmp_path, SDM120)
    meter = c.sensors[0].meter
    assert "sdm120" not in MODELS                      # the config's, not a global registry entry
    assert meter.title == "Eastron SDM120" and meter.serial.stopbits == 1 and meter.input_count == 0x48
    assert is_plausible(meter, {"voltage_v": 230.1, "current_a": 2.0, "frequency_hz": 50.0}) == ""
    assert "outside" in is_plausible(meter, {"voltage_v": 400.0, "current_a": 2.0})
    c.buses["a"].port = ""
    with Simulator([SimMeter(meter, 1, base_voltage_v=230.1, base_current_a=2.0, steady=True)]) as sim:
        c.buses["a"].port = sim.path
        lines: list[str] = []
        p = Poller(c, put=lines.extend)
        try:
            (r,) = p.poll_bus_once("a")
            (r2,) = p.poll_bus_once("a")
        finally:
            p.close()
    assert r.measurement == "ac_power" and r.tags["model"] == "sdm120"
    assert r.fields["voltage_v"] == 230.1 and r.fields["current_a"] == 2.0 and r.fields["frequency_hz"] == 50.0
    assert "energy_wh" not in r.fields and r.fields["energy_reset"] is False and r2.fields["energy_reset"] is False
    assert lines[0].startswith("ac_power,address=1,bus=a,host=lab,model=sdm120,sensor=mains ")


@pytest.mark.parametrize("models, where, problem", [
    (SDM120.replace('unit = "Hz"', 'unit = "Hz"\nscael = 0.1'), "models.sdm120.fields[2].scael",
     "did you mean 'scale'"),
    (SDM120.replace('type = "f32"\nunit = "Hz"', 'type = "f64"\nunit = "Hz"'), "models.sdm120.fields[2].type",
     "must be one of"),
    (SDM120.replace('register = 0x0006', 'register = 0x0001'), "models.sdm120.fields[1].register",
     "register 0x0001 is already field 'voltage_v'"),
    (SDM120.replace('register = 0x0046', 'register = 0x0100'), "models.sdm120.fields",
     "at most 125"),
    (SDM120.replace('measurement = "ac_power"\n', ''), "models.sdm120.measurement", "required"),
    (SDM120.replace('word_order = "high_first"', 'word_order = "big"'), "models.sdm120.fields[0].word_order",
     "must be one of"),
    (SDM120.replace('max_current_a = 45.0', 'max_curent_a = 45.0'), "models.sdm120.max_curent_a",
     "did you mean 'max_current_a'"),
    (PZEM017_TABLE.replace("pzem017t", "pzem017"), "models.pzem017", "is a built-in model"),
    ('[models.empty]\nmeasurement = "x"\n', "models.empty.fields", "has no fields"),
])
def test_a_bad_table_is_one_line_naming_file_key_and_fix_before_any_io(tmp_path, models, where, problem):
    with pytest.raises(ConfigError) as e:
        cfg(tmp_path, models, "pzem017")
    text = str(e.value)
    assert "config.toml" in text and where in text and problem in text, text
    assert "\n" not in text


def test_a_sensor_naming_an_undefined_table_is_told_about_the_models_section(tmp_path):
    with pytest.raises(ConfigError) as e:
        cfg(tmp_path, SDM120, "sdm12")
    assert "sensors[0].model: unknown model" in str(e.value) and "sdm120" in str(e.value)
    assert "[models.sdm12]" in str(e.value)


def test_a_custom_table_has_no_shunt(tmp_path):
    with pytest.raises(ConfigError, match="Eastron SDM120 has no shunt setting"):
        cfg(tmp_path, SDM120, extra="shunt_a = 100")
