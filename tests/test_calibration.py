"""Calibration maths with known reference values, and writing the result into a commented config file."""

from __future__ import annotations

import math
import os

import pytest

from dcmon import config
from dcmon.calibration import (
    CalibrationError,
    Fit,
    apply_calibration,
    calibration_from,
    check_gain,
    defining_file,
    fit,
    point_error,
    save_calibration,
)
from dcmon.config import Calibration
from dcmon.errors import ConfigError

# ---------------------------------------------------------------------------------------- fitting


def test_one_point_gives_a_gain_and_no_offset():
    # the PZEM reads 13.20 V where the reference meter reads 13.464 V: it reads 2 % low
    f = fit([(13.20, 13.464)], quantity="voltage")
    assert f.gain == pytest.approx(1.02, abs=1e-12)
    assert f.offset == 0.0
    assert f.apply(13.20) == pytest.approx(13.464)


def test_two_points_give_the_exact_line_through_them():
    # true = 1.01 × raw − 0.05: at raw 2.00 → 1.97, at raw 50.00 → 50.45
    f = fit([(2.00, 1.97), (50.00, 50.45)], quantity="current")
    assert f.gain == pytest.approx(1.01, abs=1e-12)
    assert f.offset == pytest.approx(-0.05, abs=1e-12)


def test_a_zero_current_point_and_a_load_point_give_the_offset():
    # at no load the PZEM shows 0.03 A (the reference 0.00); at 40.00 A reference it shows 39.63 A
    f = fit([(0.03, 0.0), (39.63, 40.0)], quantity="current")
    assert f.apply(0.03) == pytest.approx(0.0, abs=1e-12)
    assert f.apply(39.63) == pytest.approx(40.0, abs=1e-12)
    assert f.gain == pytest.approx(40.0 / 39.6, rel=1e-12)


def test_three_points_least_squares():
    # points on value = 0.98 × raw + 0.1, the last one 0.03 above the line. By hand: mean raw 20, mean
    # reference 19.71; slope = (−10 × −9.81 + 10 × 9.82) / 200 = 0.9815; offset = 19.71 − 0.9815 × 20 = 0.08
    pts = [(10.0, 9.9), (20.0, 19.7), (30.0, 29.5 + 0.03)]
    f = fit(pts)
    assert f.gain == pytest.approx(0.9815, abs=1e-9)
    assert f.offset == pytest.approx(0.08, abs=1e-9)


def test_one_point_at_zero_cannot_give_a_gain():
    with pytest.raises(CalibrationError, match="at zero"):
        fit([(0.0, 0.0)], quantity="current")


def test_two_points_too_close_together_are_refused():
    with pytest.raises(CalibrationError, match="too close"):
        fit([(13.20, 13.46), (13.25, 13.51)], quantity="voltage")


def test_no_points():
    with pytest.raises(CalibrationError, match="no reference points"):
        fit([], quantity="voltage")


# ------------------------------------------------------------------------------------------ errors


def test_point_error_against_the_1_percent_spec():
    e = point_error(13.20, 13.464)
    assert e.abs_error == pytest.approx(-0.264)
    assert e.pct_error == pytest.approx(-1.9607843, rel=1e-6)
    assert not e.within_spec
    assert point_error(13.40, 13.464).within_spec       # −0.48 %
    # 1 % of 1.00 A is 0.01 A, plus one count of 0.01 A: 0.02 A off is still within, 0.03 A is not
    assert point_error(1.02, 1.00).within_spec
    assert not point_error(1.03, 1.00).within_spec


def test_point_error_at_zero_reference_has_no_percentage():
    e = point_error(0.01, 0.0)
    assert e.pct_error is None
    assert e.within_spec                                 # one count of resolution
    assert not point_error(0.05, 0.0).within_spec


# --------------------------------------------------------------------------------- sanity of gains


@pytest.mark.parametrize("gain", [2.0, 0.5, 0.667, 1.5, 3.0])
def test_current_gain_at_a_shunt_ratio_is_a_wrong_shunt_code(gain):
    # e.g. 2.0: a 200 A shunt on a meter set to 100 A; 0.667: a 200 A shunt on the 300 A code
    with pytest.raises(CalibrationError, match="shunt code"):
        check_gain("current", Fit(gain, 0.0))


def test_voltage_gain_out_of_range_is_refused_and_normal_ones_pass():
    with pytest.raises(CalibrationError, match="outside"):
        check_gain("voltage", Fit(1.6, 0.0))
    check_gain("voltage", Fit(1.02, 0.0))
    check_gain("current", Fit(0.97, 0.0))


def test_calibration_from_replaces_fitted_and_keeps_the_rest():
    old = Calibration(voltage_gain=1.01, current_gain=0.99, current_offset=0.02)
    new = calibration_from(old, Fit(1.0123456789, 0.0), None)
    assert new.voltage_gain == 1.012346 and new.voltage_offset == 0.0
    assert (new.current_gain, new.current_offset) == (0.99, 0.02)


# ---------------------------------------------------------------------------------- applying


def test_apply_calibration_corrects_voltage_current_and_power_not_energy():
    cal = Calibration(voltage_gain=1.02, current_gain=0.99, current_offset=0.01)
    raw = {"voltage_v": 13.2, "current_a": 8.0, "power_w": 105.6, "energy_wh": 1000.0,
           "high_voltage_alarm": False, "low_voltage_alarm": False}
    out = apply_calibration(raw, cal)
    assert out["voltage_v"] == pytest.approx(13.464)
    assert out["current_a"] == pytest.approx(7.93)
    assert out["power_w"] == pytest.approx(13.464 * 7.93, abs=0.001)   # rounded: no digits the meter never gave
    assert out["energy_wh"] == 1000.0 and out["high_voltage_alarm"] is False
    assert raw["voltage_v"] == 13.2                        # input unchanged


def test_apply_calibration_never_goes_below_zero_and_identity_is_a_copy():
    cal = Calibration(current_offset=-0.05)
    assert apply_calibration({"voltage_v": 13.0, "current_a": 0.0, "power_w": 0.0}, cal)["current_a"] == 0.0
    raw = {"voltage_v": 13.0, "current_a": 1.0, "power_w": 13.0}
    assert apply_calibration(raw, Calibration()) == raw


# ------------------------------------------------------------------------------ the config file

CONFIG = """\
# my bench setup
[buses.rs485]
port = "/dev/ttyUSB0"   # the adapter

[[sensors]]
name = "battery"        # the big one
bus = "rs485"
address = 1
shunt_a = 100
# [sensors.calibration]     # written by `dcmon calibrate`

[[sensors]]
name = "solar"
bus = "rs485"
address = 2
[sensors.calibration]   # from last year
voltage_gain = 1.005    # keep this comment
"""


def test_save_calibration_adds_a_table_and_keeps_comments(tmp_path):
    p = tmp_path / "config.toml"
    p.write_text(CONFIG)
    p.chmod(0o640)
    save_calibration(p, "battery", Calibration(voltage_gain=1.02, current_gain=0.985, current_offset=-0.02))
    text = p.read_text()
    for comment in ("# my bench setup", "# the adapter", "# the big one", "# from last year", "# keep this comment",
                    "# [sensors.calibration]     # written by `dcmon calibrate`"):
        assert comment in text
    assert oct(p.stat().st_mode & 0o777) == oct(0o640)
    cfg = config.load(p, env={})
    bat, sol = cfg.sensors
    assert (bat.calibration.voltage_gain, bat.calibration.current_gain, bat.calibration.current_offset) == (1.02, 0.985, -0.02)
    assert sol.calibration.voltage_gain == 1.005
    assert not list(tmp_path.glob(".config.toml.*"))  # no temporary file left behind


def test_save_calibration_updates_an_existing_table_in_place(tmp_path):
    p = tmp_path / "config.toml"
    p.write_text(CONFIG)
    save_calibration(p, "solar", Calibration(voltage_gain=0.995, voltage_offset=0.01))
    text = p.read_text()
    assert "voltage_gain = 0.995    # keep this comment" in text
    assert text.count("[sensors.calibration]") == 2     # the commented one and solar's: none added
    assert config.load(p, env={}).sensors[1].calibration.voltage_offset == 0.01


def test_save_calibration_unknown_sensor(tmp_path):
    p = tmp_path / "config.toml"
    p.write_text(CONFIG)
    with pytest.raises(ConfigError, match="no sensor named 'shed'"):
        save_calibration(p, "shed", Calibration())
    assert p.read_text() == CONFIG


def test_defining_file_is_the_local_file_when_it_has_the_sensor_list(tmp_path):
    main = tmp_path / "config.toml"
    main.write_text(CONFIG)
    assert defining_file(main) == main
    local = tmp_path / "config.local.toml"
    local.write_text('[influxdb]\ntoken = "x"\n')
    assert defining_file(main) == main                  # local without sensors: the main file's list is used
    local.write_text(CONFIG.split("[[sensors]]", 1)[0].replace("# my bench setup\n", "").replace(
        '[buses.rs485]\nport = "/dev/ttyUSB0"   # the adapter\n', "") + '[[sensors]]\nname = "battery"\nbus = "rs485"\naddress = 3\n')
    assert defining_file(main) == local
    assert config.load(main, env={}).sensors[0].address == 3  # and that is indeed the list in effect
    assert math.isclose(config.load(main, env={}).sensors[0].calibration.voltage_gain, 1.0)


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_save_calibration_keeps_the_owner_and_group(tmp_path):
    """/etc/dcmon/config.toml is root:dcmon 0640; `sudo dcmon calibrate` must not make it root:root."""
    p = tmp_path / "config.toml"
    p.write_text(CONFIG)
    os.chown(p, 4321, 4322)
    save_calibration(p, "battery", Calibration(voltage_gain=1.01))
    st = p.stat()
    assert (st.st_uid, st.st_gid) == (4321, 4322)
    assert "voltage_gain = 1.01" in p.read_text()
