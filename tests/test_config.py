"""The configuration model and loader: merging, precedence, and one-line errors naming file, key and fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dcmon import config
from dcmon.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent

BASE = """
[buses.a]
port = "/dev/null"

[[sensors]]
name = "battery"
bus = "a"
address = 1
"""


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_committed_config_is_valid_and_describes_one_meter_at_address_1():
    cfg = config.load(ROOT / "config.toml", env={})
    assert [(s.name, s.address, s.model, s.shunt_a) for s in cfg.sensors] == [("battery", 1, "pzem017", 100)]
    assert cfg.stopbits("rs485") == 2            # PZEM-017: 8N2
    assert cfg.poller.apply_shunt_codes is False
    assert cfg.influxdb.verify_tls is True


def test_local_file_is_merged_key_by_key(tmp_path):
    main = write(tmp_path, BASE + '\n[influxdb]\nurl = "http://127.0.0.1:9"\ndatabase = "x"\n')
    write(tmp_path, '[influxdb]\ndatabase = "local"\n', "config.local.toml")
    cfg = config.load(main, env={})
    assert cfg.influxdb.database == "local"
    assert cfg.influxdb.url == "http://127.0.0.1:9"   # untouched keys stay


def test_environment_beats_files_and_token_file_fills_an_empty_token(tmp_path):
    main = write(tmp_path, BASE + '\n[influxdb]\napi = 2\norg = "o"\nbucket = "b"\ntoken_file = "tok"\n')
    (tmp_path / "tok").write_text("from-file\n")
    assert config.load(main, env={}).influxdb.token == "from-file"
    cfg = config.load(main, env={"DCMON_INFLUXDB_TOKEN": "from-env", "DCMON_POLLER_INTERVAL_S": "2.5"})
    assert cfg.influxdb.token == "from-env"
    assert cfg.poller.interval_s == 2.5


@pytest.mark.parametrize("text, where, key, words", [
    (BASE + "[poller]\ninterval = 3\n", "config.toml", "poller.interval", "did you mean 'interval_s'"),
    (BASE.replace("port =", "prot ="), "config.toml", "buses.a.prot", "did you mean 'port'"),
    (BASE.replace("address = 1", "address = 1\n[sensors.calibration]\nvoltage_gian = 1.01"), "config.toml",
     "sensors[0].calibration.voltage_gian", "did you mean 'voltage_gain'"),
    (BASE + "[poller]\ninterval_s = -1\n", "config.toml", "poller.interval_s", "greater than or equal to 0"),
    (BASE.replace('bus = "a"', 'bus = "b"'), "config.toml", "sensors[0].bus", "no bus named 'b'"),
    (BASE.replace("address = 1", "address = 248"), "config.toml", "sensors[0].address", "less than or equal to 247"),
    (BASE + '[[sensors]]\nname = "x"\nbus = "a"\naddress = 1\n', "config.toml", "sensors[1].address", "used twice"),
    (BASE.replace('address = 1', 'address = 1\nshunt_a = 150'), "config.toml", "sensors[0].shunt_a", "50"),
    (BASE.replace('address = 1', 'address = 1\nmodel = "pzem999"'), "config.toml", "sensors[0].model", "unknown model"),
    (BASE + '[[sensors]]\nname = "ac"\nbus = "a"\naddress = 2\nmodel = "pzem004t"\n', "config.toml", "buses.a", "8N1"),
    (BASE + '[influxdb]\napi = 2\n', "config.toml", "influxdb", "bucket"),
    (BASE + '[influxdb]\nurl = "127.0.0.1:8086"\n', "config.toml", "influxdb.url", "http://"),
])
def test_invalid_values_name_file_key_and_problem(tmp_path, text, where, key, words):
    with pytest.raises(ConfigError) as e:
        config.load(write(tmp_path, text), env={})
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(str(tmp_path / where)), msg
    assert f": {key}" in msg, msg
    assert words in msg, msg


def test_error_in_local_file_names_the_local_file(tmp_path):
    main = write(tmp_path, BASE)
    write(tmp_path, "[poller]\nintervall_s = 2\n", "config.local.toml")
    with pytest.raises(ConfigError, match=r"config\.local\.toml: poller\.intervall_s: unknown key"):
        config.load(main, env={})


def test_error_from_environment_names_the_variable(tmp_path):
    with pytest.raises(ConfigError, match="environment DCMON_POLLER_INTERVAL_S: poller.interval_s"):
        config.load(write(tmp_path, BASE), env={"DCMON_POLLER_INTERVAL_S": "soon"})


def test_secrets_never_echoed_in_errors(tmp_path):
    with pytest.raises(ConfigError) as e:
        config.load(write(tmp_path, BASE + '[influxdb]\ntoken = 12345678901\n'), env={})
    assert "12345678901" not in str(e.value)


def test_toml_syntax_error_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(write(tmp_path, "x = ["), env={})
    with pytest.raises(ConfigError, match="file not found"):
        config.load(tmp_path / "nope.toml", env={})


def test_cli_bad_config_is_one_line_exit_2_no_traceback(tmp_path):
    bad = write(tmp_path, BASE + "[poller]\ninterval = 3\n")
    r = subprocess.run([sys.executable, "-m", "dcmon.cli", "run", "--once", "--config", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "poller.interval: unknown key" in lines[0], r.stderr
