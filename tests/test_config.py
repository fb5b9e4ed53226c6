"""The configuration model and loader: merging, precedence, the config lookup, and one-line errors naming file,
key and fix, through the library and through the real CLI (`dcmon check-config`, `dcmon run`)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Literal

import pytest

from dcmon import __version__, cli, config, schema
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


def dcmon(*args: str, env: dict[str, str] | None = None, user: str | None = None, cwd: Path | None = None,
          code: str | None = None) -> subprocess.CompletedProcess[str]:
    """The real CLI in a fresh interpreter (as another user with setpriv when ``user`` is given)."""
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("DCMON_")}
    run_env.update(env or {})
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "dcmon.cli", *args]
    if user:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]  # uid = gid here
        run_env["PYTHONPATH"] = str(ROOT / "src")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=run_env, cwd=cwd)


def one_line(r: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


# ------------------------------------------------------------------------------------ good files

def test_committed_config_is_valid_and_describes_one_meter_at_address_1():
    cfg = config.load(ROOT / "config.toml", env={})
    assert [(s.name, s.address, s.model, s.shunt_a) for s in cfg.sensors] == [("battery", 1, "pzem017", 100)]
    assert cfg.stopbits("rs485") == 2            # PZEM-017: 8N2
    assert cfg.poller.apply_shunt_codes is False
    assert cfg.influxdb.verify_tls is True


def test_every_default_is_valid():
    """The defaults pass their own rules (nothing validates them at load time)."""
    for cls in (config.PollerConfig, config.SpoolConfig, config.InfluxConfig, config.GrafanaConfig, config.Calibration):
        built = schema.parse(cls, {})
        assert built == cls()
    assert schema.parse(config.BusConfig, {"port": "/dev/x"}).gap_s == 0.02


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
    cfg = config.load(main, env={"DCMON_INFLUXDB_TOKEN": "from-env", "DCMON_POLLER_INTERVAL_S": "2.5",
                                 "DCMON_INFLUXDB_VERIFY_TLS": "false", "DCMON_SPOOL_BATCH_LINES": "10"})
    assert cfg.influxdb.token == "from-env"
    assert (cfg.poller.interval_s, cfg.influxdb.verify_tls, cfg.spool.batch_lines) == (2.5, False, 10)


def test_command_line_override_beats_everything_and_is_validated(tmp_path):
    main = write(tmp_path, BASE)
    cfg = config.load(main, env={"DCMON_POLLER_INTERVAL_S": "2"}, cli={"poller.interval_s": ("--interval", 7.0)})
    assert cfg.poller.interval_s == 7.0
    for bad, words in ((float("nan"), "finite"), (float("inf"), "finite"), (-1.0, "from 0 to 3600")):
        with pytest.raises(ConfigError) as e:
            config.load(main, env={}, cli={"poller.interval_s": ("--interval", bad)})
        assert str(e.value).startswith("command line --interval: poller.interval_s: must be"), e.value
        assert words in str(e.value)


def test_a_new_section_is_a_dataclass_and_gets_everything_else_for_free():
    """What docs/architecture.md promises a contributor adding [mqtt]: types, ranges, did-you-mean, env."""
    @dataclasses.dataclass(kw_only=True)
    class Mqtt:
        host: str = ""
        port: int = schema.key(1883, ge=1, le=65535)
        qos: Literal[0, 1, 2] = 1

    assert schema.parse(Mqtt, {"port": 8883}).port == 8883
    with pytest.raises(schema.Invalid) as e:
        schema.parse(Mqtt, {"prot": 1}, ("mqtt",))
    assert (e.value.loc, e.value.fix) == (("mqtt", "prot"), "did you mean 'port'?")
    with pytest.raises(schema.Invalid, match=r"must be from 1 to 65535 \(got 0\)"):
        schema.parse(Mqtt, {"port": 0})
    with pytest.raises(schema.Invalid, match="must be one of 0, 1, 2"):
        schema.parse(Mqtt, {"qos": schema.EnvText("3")})


def test_every_section_scalar_has_an_environment_variable():
    names = config.env_keys()
    assert names["DCMON_INFLUXDB_TOKEN"] == ("influxdb", "token")
    assert names["DCMON_SPOOL_PATH"] == ("spool", "path")
    assert names["DCMON_GRAFANA_PASSWORD"] == ("grafana", "password")
    assert not any(section in ("buses", "sensors") for section, _ in names.values())


# ------------------------------------------------------------------------------------ bad values

@pytest.mark.parametrize("text, key, words", [
    (BASE + "[poller]\ninterval = 3\n", "poller.interval", "did you mean 'interval_s'"),
    (BASE.replace("port =", "prot ="), "buses.a.prot", "did you mean 'port'"),
    # a typo is reported, not the "is required" it causes
    (BASE.replace("address = 1", "adress = 1"), "sensors[0].adress", "unknown key (did you mean 'address'?)"),
    (BASE.replace("[[sensors]]", "[[sensor]]"), "sensor", "did you mean 'sensors'"),
    (BASE.replace("address = 1", "address = 1\n[sensors.calibration]\nvoltage_gian = 1.01"),
     "sensors[0].calibration.voltage_gian", "did you mean 'voltage_gain'"),
    (BASE.replace("address = 1", ""), "sensors[0].address", "is required"),
    (BASE + "[poller]\ninterval_s = -1\n", "poller.interval_s", "must be from 0 to 3600 (got -1)"),
    (BASE.replace('bus = "a"', 'bus = "b"'), "sensors[0].bus", "no bus named 'b'"),
    (BASE.replace("address = 1", "address = 248"), "sensors[0].address", "must be from 1 to 247 (got 248)"),
    (BASE.replace("address = 1", "address = true"), "sensors[0].address", "must be a whole number (got true)"),
    (BASE.replace("address = 1", "address = 1.0"), "sensors[0].address", "must be a whole number"),
    (BASE + '[[sensors]]\nname = "x"\nbus = "a"\naddress = 1\n', "sensors[1].address", "used twice"),
    (BASE.replace('address = 1', 'address = 1\nshunt_a = 150'), "sensors[0].shunt_a", "must be one of 50, 100, 200, 300"),
    (BASE.replace('address = 1', 'address = 1\nmodel = "pzem999"'), "sensors[0].model", "unknown model"),
    (BASE + '[[sensors]]\nname = "ac"\nbus = "a"\naddress = 2\nmodel = "pzem004t"\n', "buses.a", "8N1"),
    (BASE.replace('port = "/dev/null"', 'port = "/dev/null"\nbaudrate = 99999999999'), "buses.a.baudrate",
     "must be one of 1200"),
    (BASE.replace('port = "/dev/null"', 'port = "/dev/null"\ngap_s = 0'), "buses.a.gap_s",
     "below the 3.5-character silence Modbus RTU needs at 9600 baud (at least 0.0041 s"),
    (BASE.replace('port = "/dev/null"', 'port = "/dev/null"\nbaudrate = 2400\ngap_s = 0.01'), "buses.a.gap_s",
     "at 2400 baud (at least 0.0161 s"),
    (BASE.replace('port = "/dev/null"', 'port = "/dev/null"\ntimeout_s = 0.01'), "buses.a.timeout_s",
     "shorter than a request and its 21-byte reply take on the wire at 9600 baud (at least 0.034 s"),
    (BASE.replace('port = "/dev/null"', 'port = "/dev/null"\nparity = "X"'), "buses.a.parity", 'one of "N", "E", "O"'),
    (BASE + "[spool]\nmax_age_days = inf\n", "spool.max_age_days", "must be a finite number (got inf)"),
    (BASE + "[spool]\nmax_age_days = nan\n", "spool.max_age_days", "must be a finite number"),
    (BASE + '[spool]\ndurability = "always"\n', "spool.durability", 'one of "process", "power"'),
    (BASE + '[poller]\nlog_level = "verbose"\n', "poller.log_level", "must be one of"),
    (BASE + '[poller]\nhost = \'pi\\\'\n', "poller.host", "backslash"),
    (BASE + '[influxdb]\napi = 2\n', "influxdb.bucket", "is required with api = 2"),
    (BASE + '[influxdb]\napi = 2\nbucket = "b"\n', "influxdb.org", "is required with api = 2"),
    (BASE + '[influxdb]\napi = 2\nbucket = "b"\norg = "o"\n', "influxdb.token", "DCMON_INFLUXDB_TOKEN"),
    (BASE + '[influxdb]\napi = 3\n', "influxdb.api", "must be one of 1, 2 (got 3)"),
    (BASE + '[influxdb]\ndatabase = ""\n', "influxdb.database", "must not be empty"),
    (BASE + '[influxdb]\nurl = "127.0.0.1:8086"\n', "influxdb.url", "http://"),
    (BASE + '[influxdb]\nurl = "http://127.0.0.1:99999"\n', "influxdb.url", "invalid port"),
    (BASE + '[influxdb]\nurl = "http://127.0.0.1:8086/my db"\n', "influxdb.url", "spaces"),
    (BASE + '[influxdb]\nurl = "http://:8086"\n', "influxdb.url", "no host name"),
    (BASE + '[influxdb]\nurl = "http://"\n', "influxdb.url", "no host name"),
    (BASE + '[influxdb]\nurl = "http://h:8086/?db=x"\n', "influxdb.url", "?query"),
    (BASE + '[influxdb]\nmeasurement = \'dc\\\'\n', "influxdb.measurement", "backslash"),
    (BASE + '[influxdb]\ntimeout_s = 60\n', "influxdb.timeout_s", "must be more than 0 and at most 30 (got 60)"),
    (BASE + '[grafana]\nurl = "ftp://x"\n', "grafana.url", "http://"),
    (BASE + '[influxdb]\nenabled = "yes"\n', "influxdb.enabled", 'must be true or false (got "yes")'),
    (BASE + '[influxdb]\n', "", ""),  # a valid file: the control row
    (BASE.replace('name = "battery"', "name = 'bat\\'"), "sensors[0].name", "must not end with a backslash"),
    (BASE.replace('name = "battery"', 'name = "bat\\ntery"'), "sensors[0].name", "control characters"),
    (BASE.replace('name = "battery"', 'name = ""'), "sensors[0].name", "must not be empty"),
    (BASE.replace('address = 1', "address = 1\ntags = { site = 'x\\' }"), "sensors[0].tags.site", "tag value must not end with a backslash"),
    (BASE.replace('address = 1', 'address = 1\ntags = { host = "x" }'), "sensors[0].tags.host", "set by dcmon itself"),
    (BASE.replace('address = 1', 'address = 1\ntags = { time = "x" }'), "sensors[0].tags.time", "reserved by InfluxDB"),
    (BASE.replace('address = 1', 'address = 1\ntags = { site = "" }'), "sensors[0].tags.site", "must not be empty"),
    (BASE.replace('address = 1', 'address = 1\ntags = { n = 3 }'), "sensors[0].tags.n", "must be a string"),
    (BASE.replace('address = 1', 'address = 1\ntags = "x"'), "sensors[0].tags", "must be a table"),
    (BASE.replace('address = 1', 'address = 1\n[sensors.calibration]\ncurrent_gain = 2.0'),
     "sensors[0].calibration.current_gain", "more than 0.5 and less than 1.5"),
    (BASE.replace("[[sensors]]", "[sensors]"), "sensors", "must be a list of tables ([[sensors]])"),
    (BASE + '[buses.b]\nport = ""\n', "buses.b.port", "must not be empty"),
])
def test_invalid_values_name_file_key_and_problem(tmp_path, text, key, words):
    path = write(tmp_path, text)
    if not key:
        config.load(path, env={})
        return
    with pytest.raises(ConfigError) as e:
        config.load(path, env={})
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: {key}: "), msg
    assert words in msg, msg


def test_error_in_local_file_names_the_local_file(tmp_path):
    main = write(tmp_path, BASE)
    write(tmp_path, "[poller]\nintervall_s = 2\n", "config.local.toml")
    with pytest.raises(ConfigError, match=r"config\.local\.toml: poller\.intervall_s: unknown key"):
        config.load(main, env={})


def test_cross_check_names_the_file_that_set_the_cause(tmp_path):
    main = write(tmp_path, BASE)
    write(tmp_path, "[influxdb]\napi = 2\n", "config.local.toml")
    with pytest.raises(ConfigError, match=r"^\S+config\.local\.toml: influxdb\.bucket: is required with api = 2"):
        config.load(main, env={})


@pytest.mark.parametrize("var, value, words", [
    ("DCMON_POLLER_INTERVAL_S", "soon", "poller.interval_s: must be a number"),
    ("DCMON_POLLER_INTERVAL_S", "nan", "poller.interval_s: must be a finite number"),
    ("DCMON_INFLUXDB_ENABLED", "maybe", "influxdb.enabled: must be true or false"),
    ("DCMON_INFLUXDB_API", "3", "influxdb.api: must be one of 1, 2"),
    ("DCMON_SPOOL_MAX_BYTES", "1e9", "spool.max_bytes: must be a whole number"),
])
def test_error_from_environment_names_the_variable(tmp_path, var, value, words):
    with pytest.raises(ConfigError, match=f"^environment {var}: {words}"):
        config.load(write(tmp_path, BASE), env={var: value})


@pytest.mark.parametrize("text", [
    BASE + '[influxdb]\ntoken = 12345678901\n',
    BASE + '[influxdb]\ntoken = "hunter2 x"\n',
    BASE + '[influxdb]\nurl = "http://admin:hunter2@127.0.0.1:8086"\n',
    BASE + '[influxdb]\nurl = "http://admin:hunter2@127.0.0.1:99999 x"\n',
    BASE + '[grafana]\nurl = "https://admin:hunter2@grafana.local"\n',
    BASE + '[grafana]\npassword = 12345678901\n',
])
def test_secrets_never_echoed_in_errors(tmp_path, text):
    with pytest.raises(ConfigError) as e:
        config.load(write(tmp_path, text), env={})
    assert "12345678901" not in str(e.value) and "hunter2" not in str(e.value), e.value


def test_user_info_in_a_url_points_at_username_and_password_file(tmp_path):
    with pytest.raises(ConfigError) as e:
        config.load(write(tmp_path, BASE + '[influxdb]\nurl = "http://admin:hunter2@127.0.0.1:8086"\n'), env={})
    assert "influxdb.url: must not contain a user name or password" in str(e.value)
    assert "influxdb.username" in str(e.value) and "influxdb.password_file" in str(e.value)


def test_secrets_stay_out_of_repr_and_describe(tmp_path):
    cfg = config.load(write(tmp_path, BASE + '[influxdb]\npassword = "pw-secret"\ntoken = "tok-secret"\n'), env={})
    text = repr(cfg) + "\n".join(cfg.describe())
    assert "pw-secret" not in text and "tok-secret" not in text


# ------------------------------------------------------------------------------------ files

def test_toml_syntax_error_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(write(tmp_path, "x = ["), env={})
    with pytest.raises(ConfigError, match="file not found"):
        config.load(tmp_path / "nope.toml", env={})


def test_latin1_byte_says_which_line(tmp_path):
    p = tmp_path / "config.toml"
    p.write_bytes(BASE.encode().replace(b'"battery"', b'"batt\xe9ry"'))
    with pytest.raises(ConfigError, match=r"config\.toml: line 6 is not UTF-8 text \(save the file as UTF-8\)$"):
        config.load(p, env={})


def test_config_naming_a_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"is a folder, not a file \(give the file, e\.g\. --config .*config\.toml\)"):
        config.load(tmp_path, env={})


@pytest.mark.parametrize("content, words", [
    (b"\xff\xfe s\xe9cret\n", "is not UTF-8 text"),
    (b"", "is empty"),
    (b"tok en\n", "printable ASCII"),
    (None, "does not exist"),
    ("folder", "is a folder"),
])
def test_token_file_problems(tmp_path, content, words):
    main = write(tmp_path, BASE + '[influxdb]\ntoken_file = "tok"\n')
    if content == "folder":
        (tmp_path / "tok").mkdir()
    elif content is not None:
        (tmp_path / "tok").write_bytes(content)
    with pytest.raises(ConfigError) as e:
        config.load(main, env={})
    assert str(e.value).startswith(f"{main}: influxdb.token_file: "), e.value
    assert words in str(e.value) and "cret" not in str(e.value) and "tok en" not in str(e.value)


def test_ca_file_must_exist_and_hold_a_certificate(tmp_path):
    import certifi

    with pytest.raises(ConfigError, match=r"influxdb\.ca_file: \S+/ca\.pem does not exist"):
        config.load(write(tmp_path, BASE + '[influxdb]\nca_file = "ca.pem"\n'), env={})
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="holds no PEM certificate"):
        config.load(write(tmp_path, BASE + '[influxdb]\nca_file = "ca.pem"\n'), env={})
    cfg = config.load(write(tmp_path, BASE + f'[influxdb]\nca_file = "{certifi.where()}"\n'), env={})
    assert cfg.influxdb.ca_file == certifi.where()


def test_spool_path_problems_are_config_errors(tmp_path):
    cfg = config.load(write(tmp_path, BASE + '[spool]\npath = "/dev/null/spool.sqlite"\n'), env={})
    with pytest.raises(ConfigError, match=r"spool\.path: /dev/null is a file, not a folder"):
        cfg.check_spool()
    cfg = config.load(write(tmp_path, BASE + f'[spool]\npath = "{tmp_path}"\n'), env={})
    with pytest.raises(ConfigError, match=r"spool\.path: \S+ is a folder \(name a file in it"):
        cfg.check_spool()
    cfg = config.load(write(tmp_path, BASE + '[spool]\npath = "new/deeper/spool.sqlite"\n'), env={})
    cfg.check_spool()          # folders that do not exist yet are created by the spool
    assert not (tmp_path / "new").exists()   # ... and the check itself writes nothing


def test_empty_file_loads_but_is_refused_for_run(tmp_path):
    cfg = config.load(write(tmp_path, ""), env={})
    with pytest.raises(ConfigError, match=r"config\.toml: sensors: no sensors: nothing to poll \(add a \[buses\.NAME\]"):
        cfg.require_sensors()
    cfg = config.load(write(tmp_path, BASE.replace("address = 1", "address = 1\nenabled = false")), env={})
    with pytest.raises(ConfigError, match="all 1 sensors are disabled"):
        cfg.require_sensors()


# ------------------------------------------------------------------------------------ which file

def test_config_lookup_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    installed = tmp_path / "etc" / "config.toml"
    monkeypatch.setattr(cli, "INSTALLED_CONFIG", str(installed))
    assert cli.default_config({}) == "config.toml"                       # a checkout
    installed.parent.mkdir()
    assert cli.default_config({}) == "config.toml"                       # an empty /etc/dcmon is not an install
    installed.write_text(BASE)
    write(tmp_path, BASE)
    assert cli.default_config({}) == str(installed)                      # installed beats ./config.toml
    assert cli.default_config({"DCMON_CONFIG": "/x.toml"}) == "/x.toml"  # the environment beats both


@pytest.fixture
def shared_dir():
    """A folder another user can read (pytest's tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="dcmon-cfg-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


needs_setpriv = pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/setpriv").exists(),
                                   reason="needs root and setpriv to run a command as another user")


@needs_setpriv
def test_installed_config_closed_to_this_user_says_what_to_do(shared_dir):
    """/etc/dcmon is root:dcmon 0750: an ordinary user's command gets one line and exit 2, not a traceback."""
    d = shared_dir
    etc = d / "etc-dcmon"
    etc.mkdir(mode=0o750)
    (etc / "config.toml").write_text(BASE)
    code = f"import sys; from dcmon import cli; cli.INSTALLED_CONFIG = {str(etc / 'config.toml')!r}; sys.exit(cli.main())"
    for args in (["check-config"], ["run", "--once"]):
        r = dcmon(*args, code=code, user="65534", cwd=d)
        assert r.returncode == 2, r.stderr
        line = one_line(r)
        assert f"{etc}/config.toml: permission denied for user nobody" in line, line
        assert "sudo" in line and "join the group" in line and "--config" in line


@needs_setpriv
def test_unwritable_spool_is_exit_2_before_polling(shared_dir):
    d = shared_dir
    cfg = d / "config.toml"
    cfg.write_text(BASE + f'[spool]\npath = "{d}/spool.sqlite"\n[influxdb]\nenabled = false\n')
    for args in (["check-config"], ["run", "--once", "--simulate"]):
        r = dcmon(*args, "--config", str(cfg), user="65534")
        assert r.returncode == 2, r.stderr
        line = one_line(r)
        assert f"spool.path: {d} is not writable by user nobody" in line, line
        assert "simulating" not in r.stderr
    assert not (d / "spool.sqlite").exists()


# ------------------------------------------------------------------------------------ through the CLI

def test_check_config_names_every_source_version_database_and_spool(tmp_path):
    main = write(tmp_path, BASE + '[influxdb]\nurl = "http://127.0.0.1:8086/"\ndatabase = "power"\n')
    write(tmp_path, '[influxdb]\nusername = "u"\n', "config.local.toml")
    spool = tmp_path / "s" / "spool.sqlite"
    r = dcmon("check-config", "--config", str(main), env={"DCMON_SPOOL_PATH": str(spool), "DCMON_INFLUXDB_PASSWORD": "pw-x"})
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert (f"configuration: {main} + {tmp_path / 'config.local.toml'} + DCMON_SPOOL_PATH + DCMON_INFLUXDB_PASSWORD "
            f"(dcmon {__version__})") in out
    assert "InfluxDB: http://127.0.0.1:8086 (api 1), database 'power'" in out
    assert f"spool: {spool}" in out
    assert "1 sensor(s) on 1 bus(es): a /dev/null (1)" in out
    assert out.rstrip().endswith(f"{main}: ok")
    assert "pw-x" not in out + r.stderr


def test_check_config_with_a_relative_path_names_it_absolute(tmp_path):
    write(tmp_path, BASE)
    r = dcmon("check-config", "--config", "config.toml", cwd=tmp_path)
    assert r.returncode == 0 and f"configuration: {tmp_path / 'config.toml'}" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("text, args, words", [
    (BASE + "[poller]\ninterval = 3\n", ["run", "--once"], "poller.interval: unknown key (did you mean 'interval_s'?)"),
    (BASE.replace('port = "/dev/null"', 'port = "/dev/null"\ngap_s = 0'), ["check-config"], "buses.a.gap_s:"),
    ("", ["check-config"], "sensors: no sensors"),
    ("", ["run", "--once"], "sensors: no sensors"),
    (BASE, ["run", "--once", "--interval", "nan"], "command line --interval: poller.interval_s: must be a finite number"),
    (BASE, ["run", "--interval", "inf"], "command line --interval: poller.interval_s: must be a finite number"),
    (BASE, ["run", "--interval", "-1"], "command line --interval: poller.interval_s: must be from 0 to 3600"),
    (BASE + '[influxdb]\nurl = "http://u:pw-secret@h:8086"\n', ["check-config"], "influxdb.url: must not contain a user"),
    (BASE + '[influxdb]\nca_file = "/nonexistent/ca.pem"\n', ["run", "--once"], "influxdb.ca_file: /nonexistent/ca.pem does not exist"),
])
def test_cli_bad_config_is_one_line_exit_2_no_traceback(tmp_path, text, args, words):
    bad = write(tmp_path, text)
    r = dcmon(*args, "--config", str(bad))
    assert r.returncode == 2, r.stderr
    line = one_line(r)
    assert line.startswith("dcmon: configuration error: ") and words in line, line
    assert "pw-secret" not in line


def test_cli_config_naming_a_folder_or_latin1_file(tmp_path):
    r = dcmon("check-config", "--config", str(tmp_path))
    assert r.returncode == 2 and "is a folder, not a file" in one_line(r)
    (tmp_path / "config.toml").write_bytes(b'[poller]\nhost = "caf\xe9"\n')
    r = dcmon("check-config", "--config", str(tmp_path / "config.toml"))
    assert r.returncode == 2 and "line 2 is not UTF-8 text" in one_line(r)


def test_poller_first_log_lines_name_what_it_loaded(tmp_path):
    main = write(tmp_path, BASE.replace('port = "/dev/null"', 'port = "/dev/null"\ntimeout_s = 0.2\nretries = 0')
                 + '[influxdb]\nenabled = false\n[poller]\nhost = "h"\n')
    r = dcmon("run", "--once", "--simulate", "--no-print", "--config", str(main))
    assert r.returncode == 0, r.stderr
    head = r.stderr.splitlines()[:4]
    assert f"configuration: {main} (dcmon {__version__})" in head[0]
    assert "InfluxDB: disabled" in head[1]
    assert f"spool: {tmp_path / 'var' / 'spool.sqlite'}" in head[2]
    assert "1 sensor(s) on 1 bus(es)" in head[3]


def test_help_states_the_config_lookup_order():
    r = dcmon("check-config", "--help")
    text = " ".join(r.stdout.split())
    assert "$DCMON_CONFIG, else /etc/dcmon/config.toml when installed, else ./config.toml" in text


def test_no_pydantic_anywhere_at_run_time(tmp_path):
    """The command tree and a config load import nothing compiled beyond the stdlib's (see tests/test_wheels.py)."""
    write(tmp_path, BASE)
    code = ("import sys; from dcmon import cli, config; cli.build_parser([]); config.load(sys.argv[1], env={}); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('pydantic', 'pydantic_core', 'attrs', 'cattrs')); "
            "print(bad)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "config.toml")], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


# ------------------------------------------------------------------------------------ [mqtt] and [http]

def test_output_tables_have_their_outputs_defaults():
    """[mqtt] and [http] are validated by their outputs' from_dict: the config tables' defaults are theirs."""
    from dcmon.outputs.http import HttpSettings
    from dcmon.outputs.mqtt import MqttSettings

    assert config.table_values(config.MqttConfig()) == MqttSettings.defaults()
    assert config.table_values(config.HttpConfig()) == HttpSettings.defaults()


def test_mqtt_and_http_from_file_and_environment(tmp_path):
    main = write(tmp_path, BASE + '[mqtt]\nenabled = true\nurl = "mqtt://10.0.0.2"\nstream = true\n'
                                  '[http]\nenabled = true\n')
    cfg = config.load(main, env={"DCMON_MQTT_QOS": "0", "DCMON_MQTT_PASSWORD": "s3cret", "DCMON_MQTT_USERNAME": "u",
                                 "DCMON_HTTP_LISTEN": "0.0.0.0:9000"})
    m, h = cfg.mqtt.settings, cfg.http.settings
    assert (m.url, m.qos, m.username, m.password, m.stream) == ("mqtt://10.0.0.2:1883", 0, "u", "s3cret", True)
    assert h.address == ("0.0.0.0", 9000)
    assert cfg.mqtt_spool_path() == cfg.resolve(cfg.spool.path).with_name("spool-mqtt.sqlite")
    described = "\n".join(cfg.describe())
    assert "outputs: InfluxDB, MQTT mqtt://10.0.0.2:1883 (stream of every reading" in described
    assert "HTTP http://0.0.0.0:9000/" in described and "s3cret" not in described


def test_outputs_each_on_their_own(tmp_path):
    cfg = config.load(write(tmp_path, BASE + '[influxdb]\nenabled = false\n[mqtt]\nenabled = true\n'), env={})
    assert cfg.outputs_enabled() == ["MQTT mqtt://localhost:1883"]
    cfg = config.load(write(tmp_path, BASE), env={})
    assert cfg.outputs_enabled() == ["InfluxDB"] and cfg.mqtt.settings is None and cfg.http.settings is None


@pytest.mark.parametrize("extra, env, words", [
    ('[mqtt]\nenabled = true\nurl = "http://broker"\n', {}, "mqtt.url: 'http://broker' must start with mqtt://"),
    ('[mqtt]\nenabled = true\nqos = 2\n', {}, "mqtt.qos: must be 0 or 1"),
    ('[mqtt]\nenabeld = true\n', {}, "mqtt.enabeld: unknown key (did you mean 'enabled'?)"),
    ('[mqtt]\nenabled = true\n', {"DCMON_MQTT_TIMEOUT_S": "0"}, "environment DCMON_MQTT_TIMEOUT_S: mqtt.timeout_s: must be between"),
    ('[http]\nenabled = true\nlisten = "nowhere"\n', {}, "http.listen:"),
    ('[http]\nusername = "a"\n', {}, "http.password_hash: is empty but http.username is set"),
    ('[http]\npassword = "x"\n', {}, "http.password: unknown key"),
])
def test_output_tables_bad_values_are_one_line(tmp_path, extra, env, words):
    with pytest.raises(ConfigError) as e:
        config.load(write(tmp_path, BASE + extra), env=env)
    assert words in str(e.value), str(e.value)
