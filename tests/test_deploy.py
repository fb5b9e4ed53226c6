"""Deployment: install.sh, the systemd unit, the udev rule, and the docs that describe them.

What runs here, for real:
- ``shellcheck`` on install.sh;
- install.sh ``--prefix`` into a temporary root seeded with a minimal /etc (passwd, group, shadow, gshadow,
  os-release): the real useradd/usermod/userdel (``--prefix``), the real ``systemctl --root`` enable/disable,
  a real venv with the package pip-installed from a snapshot of this checkout (PyPI or the pip cache), then
  the result is checked: user, groups, owners and modes, the unit and its enablement link, the udev rule.
  A second run must change nothing (every path, mode, owner, size and mtime compared); an upgrade must keep
  config, secrets and spool; uninstall keeps them, ``--purge`` removes them;
- ``systemd-analyze verify`` (stderr must be empty) on the unit with ExecStart pointed at the installed
  entry point of that prefix, and ``systemd-analyze security --offline`` for its exposure score;
- the udev rule parsed by the real ``udevadm test`` (bookworm's systemd 252 has no ``udevadm verify``:
  it came in 253) in a private mount namespace, so nothing is written to this machine's /run or /dev.

Opt-in (``DCMON_TEST_CHROOT=DIR``, about 3 minutes with downloads): install.sh without ``--prefix`` in a
debootstrap'ed Debian bookworm: apt-get, useradd, systemctl enable offline, twice, then uninstall --purge.

Not run here: install.sh against this machine's own root, and ``systemctl start``: there is no systemd
running as PID 1 in this container, and a test must not change the machine. So the service's sandbox
(seccomp filter, DevicePolicy) is verified statically only, not exercised on a booted system. The udev
rule's matching needs a real FTDI adapter.

A missing tool fails its test with the Debian package to install (scripts/test.sh installs them all).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "dcmon.service"
RULES = DEPLOY / "99-dcmon-serial.rules"
WAITSYNC_UNIT = Path("/lib/systemd/system/systemd-time-wait-sync.service")  # from the systemd package


def need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if not path:
        pytest.fail(f"{tool} not found: apt-get install {package} (scripts/test.sh does)")
    return path


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("this test needs root (chown, useradd --prefix, mount namespaces): run the suite as root, as CI does")


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=kw.pop("timeout", 300), **kw)


# --------------------------------------------------------------------------------------------- shellcheck

def test_install_sh_is_shellcheck_clean():
    need("shellcheck", "shellcheck")
    r = run(["shellcheck", "--severity=style", str(DEPLOY / "install.sh")])
    assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr


def test_install_sh_refuses_bad_options(tmp_path):
    r = run(["bash", str(DEPLOY / "install.sh"), "--frobnicate"])
    assert r.returncode == 2 and "unknown option --frobnicate" in r.stderr
    r = run(["bash", str(DEPLOY / "install.sh"), "--purge"])
    assert r.returncode == 1 and "--purge only goes with --uninstall" in r.stderr
    r = run(["bash", str(DEPLOY / "install.sh"), "--prefix", "relative/dir"])
    assert r.returncode == 1 and "absolute" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------- install into a prefix

def seed_root(root: Path) -> None:
    """The least of a Debian /etc that useradd --prefix and the script need (dialout is gid 20 on Debian)."""
    etc = root / "etc"
    etc.mkdir(parents=True)
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (etc / "group").write_text("root:x:0:\ndialout:x:20:\n")
    (etc / "shadow").write_text("root:*:19000:0:99999:7:::\n")
    (etc / "gshadow").write_text("root:*::\ndialout:*::\n")
    (etc / "shadow").chmod(0o640)
    (etc / "gshadow").chmod(0o640)
    (etc / "os-release").write_text('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n')
    # systemd's own systemd-time-wait-sync.service, as a Debian root has it (install.sh enables it)
    units = root / "lib/systemd/system"
    units.mkdir(parents=True)
    shutil.copy2(WAITSYNC_UNIT, units / WAITSYNC_UNIT.name)


def snapshot_source(dest: Path) -> Path:
    """A frozen copy of the checkout, so that edits elsewhere in the tree during the run do not count."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in ("pyproject.toml", "README.md", "config.toml"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "src", dest / "src", ignore=ignore)
    shutil.copytree(DEPLOY, dest / "deploy", ignore=ignore)
    return dest


def tree_state(root: Path) -> dict[str, tuple]:
    """Everything a change would touch: type, mode, owner, size, mtime, link target, per path."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            link = os.readlink(p) if p.is_symlink() else ""
            out[str(p.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, link)
    return out


class Install:
    def __init__(self, root: Path, src: Path) -> None:
        self.root, self.src = root, src

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        # umask 077: an admin's strict umask must not leave the program unreadable for the dcmon user
        r = run(["bash", "-c", 'umask 077 && exec bash "$@"', "sh", str(self.src / "deploy" / "install.sh"),
                 "--prefix", str(self.root), *args])
        assert r.returncode == 0, f"install.sh {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
        return r

    def entry(self, db: str, name: str) -> list[str] | None:
        for line in (self.root / "etc" / db).read_text().splitlines():
            if line.split(":")[0] == name:
                return line.split(":")
        return None


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """One prefix install for the module (pip takes a while); the tests below run in file order on it."""
    need_root()
    need("systemctl", "systemd")
    need("useradd", "passwd")
    base = tmp_path_factory.mktemp("deploy")
    root, src = base / "root", base / "src"
    src.mkdir()
    seed_root(root)
    inst = Install(root, snapshot_source(src))
    inst.first = inst()
    return inst


def mode_owner(p: Path) -> tuple[int, int, int]:
    st = p.stat()
    return st.st_mode & 0o7777, st.st_uid, st.st_gid


def test_prefix_install_layout(installed):
    root = installed.root
    user = installed.entry("passwd", "dcmon")
    assert user is not None, "no dcmon user in etc/passwd"
    uid, gid = int(user[2]), int(user[3])
    assert 0 < uid < 1000, "a system user"
    assert user[5] == "/var/lib/dcmon" and user[6] == "/usr/sbin/nologin"
    assert installed.entry("group", "dcmon")[2] == str(gid)
    assert "dcmon" in installed.entry("group", "dialout")[3].split(",")

    etc = root / "etc/dcmon"
    assert mode_owner(etc) == (0o750, 0, gid)
    assert mode_owner(etc / "config.toml") == (0o640, 0, gid)
    assert mode_owner(etc / "config.local.toml") == (0o640, 0, gid), "secrets must not be world-readable"
    assert mode_owner(root / "var/lib/dcmon") == (0o750, uid, gid)
    cfg = tomllib.loads((etc / "config.toml").read_text())
    assert cfg["spool"]["path"] == "/var/lib/dcmon/spool.sqlite"
    assert cfg["sensors"] == tomllib.loads((ROOT / "config.toml").read_text())["sensors"]
    tomllib.loads((etc / "config.local.toml").read_text())  # valid TOML (comments only)

    unit = root / "etc/systemd/system/dcmon.service"
    assert unit.read_bytes() == UNIT.read_bytes()
    wants = root / "etc/systemd/system/multi-user.target.wants/dcmon.service"
    assert wants.is_symlink() and os.readlink(wants) == "/etc/systemd/system/dcmon.service"
    assert (root / "etc/udev/rules.d/99-dcmon-serial.rules").read_bytes() == RULES.read_bytes()
    # the boot waits for a synchronised clock, for at most 2 minutes
    waitsync = root / "etc/systemd/system/sysinit.target.wants/systemd-time-wait-sync.service"
    assert waitsync.is_symlink(), "install.sh must enable systemd-time-wait-sync.service where it exists"
    dropin = root / "etc/systemd/system/systemd-time-wait-sync.service.d/dcmon-bounded.conf"
    assert unit_settings(dropin.read_text())["TimeoutStartSec"] == ["2min"]
    assert os.readlink(root / "usr/local/bin/dcmon") == "/opt/dcmon/venv/bin/dcmon"

    py = root / "opt/dcmon/venv/bin/python"
    r = run([str(py), "-c", "import dcmon, dcmon.systemd; print(dcmon.__file__)"])
    assert r.returncode == 0 and "/opt/dcmon/venv/lib/" in r.stdout, r.stderr
    r = run([str(root / "opt/dcmon/venv/bin/dcmon"), "--version"])
    assert r.returncode == 0 and r.stdout.startswith("dcmon "), r.stderr
    # the venv must be readable by the dcmon user whatever umask the admin had
    for p in (root / "opt/dcmon/venv").rglob("*"):
        if not p.is_symlink():
            assert p.stat().st_mode & 0o004, f"{p} is not readable by the dcmon user"
    assert (root / "opt/dcmon/venv/bin/dcmon").stat().st_mode & 0o001
    assert "done," in installed.first.stdout
    # the next steps a first install names: the meters, then retention and downsampling in InfluxDB
    assert "edit /etc/dcmon/config.toml for your meters" in installed.first.stdout
    assert "sudo dcmon influx-setup" in installed.first.stdout


def test_second_run_changes_nothing(installed):
    before = tree_state(installed.root)
    r = installed()
    assert "0 changes" in r.stdout, r.stdout
    after = tree_state(installed.root)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert changed == [], f"a second run changed: {changed[:10]}"


def test_upgrade_keeps_config_secrets_and_spool(installed):
    root = installed.root
    etc = root / "etc/dcmon"
    (etc / "config.toml").write_text((etc / "config.toml").read_text() + "# edited by the owner\n")
    (etc / "config.local.toml").write_text('[influxdb]\ntoken = "s3cret"\n')
    spool = root / "var/lib/dcmon/spool.sqlite"
    spool.write_bytes(b"readings not yet sent")
    kept = {p: p.read_bytes() for p in (etc / "config.toml", etc / "config.local.toml", spool)}
    init = installed.src / "src/dcmon/__init__.py"
    init.write_text(init.read_text() + "# upgraded\n")  # a new version of the package

    r = installed()
    assert "installed dcmon" in r.stdout and "0 changes" not in r.stdout, r.stdout
    for p, data in kept.items():
        assert p.read_bytes() == data, f"upgrade changed {p}"
    assert mode_owner(etc / "config.local.toml")[0] == 0o640
    site = next((root / "opt/dcmon/venv/lib").glob("python3*/site-packages/dcmon/__init__.py"))
    assert site.read_text().endswith("# upgraded\n")


def test_install_repairs_loosened_permissions(installed):
    local = installed.root / "etc/dcmon/config.local.toml"
    local.chmod(0o644)
    r = installed()
    assert mode_owner(local)[0] == 0o640 and "set " in r.stdout


def test_uninstall_keeps_data_then_purge_removes_it(installed):
    root = installed.root
    r = installed("--uninstall")
    assert "kept /etc/dcmon" in r.stdout
    assert not (root / "opt/dcmon").exists()
    assert not (root / "etc/systemd/system/dcmon.service").exists()
    assert not (root / "etc/systemd/system/multi-user.target.wants/dcmon.service").is_symlink()
    assert not (root / "usr/local/bin/dcmon").is_symlink()
    assert not (root / "etc/udev/rules.d/99-dcmon-serial.rules").exists()
    assert not (root / "etc/systemd/system/systemd-time-wait-sync.service.d").exists()
    assert not (root / "etc/systemd/system/sysinit.target.wants/systemd-time-wait-sync.service").is_symlink()
    assert (root / "etc/dcmon/config.local.toml").read_text() == '[influxdb]\ntoken = "s3cret"\n'
    assert (root / "var/lib/dcmon/spool.sqlite").exists()
    assert installed.entry("passwd", "dcmon") is not None

    r = installed("--uninstall")
    assert "uninstalled, 0 changes" in r.stdout

    installed("--uninstall", "--purge")
    assert not (root / "etc/dcmon").exists() and not (root / "var/lib/dcmon").exists()
    assert installed.entry("passwd", "dcmon") is None and installed.entry("group", "dcmon") is None
    assert "dcmon" not in installed.entry("group", "dialout")[3].split(",")


# ------------------------------------------------------------- install.sh for real, in a debootstrap chroot

@pytest.mark.skipif(not os.environ.get("DCMON_TEST_CHROOT"),
                    reason="opt-in, about 3 min and network: DCMON_TEST_CHROOT=/var/tmp/dcmon-chroot runs install.sh "
                           "without --prefix in a debootstrap'ed Debian bookworm (kept there for the next run)")
def test_install_in_debootstrap_chroot():
    """The real code path (apt-get, useradd, getent, systemctl enable offline) on a fresh Debian root, twice
    (idempotent), then uninstall and purge. Mounts happen in a private mount namespace and vanish with it."""
    need_root()
    need("debootstrap", "debootstrap")
    need("unshare", "util-linux")
    chroot = Path(os.environ["DCMON_TEST_CHROOT"])
    if not (chroot / "etc/debian_version").exists():
        r = run(["debootstrap", "--variant=minbase", "--include=systemd", "bookworm", str(chroot),
                 "http://deb.debian.org/debian"], timeout=900)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    src = chroot / "root/dcmon-src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    snapshot_source(src)
    shutil.copy("/etc/resolv.conf", chroot / "etc/resolv.conf")
    env = ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"]
    ca = os.environ.get("PIP_CERT") or os.environ.get("REQUESTS_CA_BUNDLE")
    if ca:  # a TLS-intercepting proxy's CA, as the host trusts it
        shutil.copy(ca, chroot / "root/host-ca.crt")
        env.append("PIP_CERT=/root/host-ca.crt")

    def inside(*cmd: str) -> subprocess.CompletedProcess[str]:
        script = 'mount -t proc proc "$1/proc" && mount --bind /dev "$1/dev" && shift && exec chroot "$@"'
        return run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(chroot),
                    str(chroot), "/usr/bin/env", "-i", *env, *cmd], timeout=600)

    first = inside("bash", "/root/dcmon-src/deploy/install.sh")
    assert first.returncode == 0, first.stdout + first.stderr
    second = inside("bash", "/root/dcmon-src/deploy/install.sh")
    assert second.returncode == 0 and "0 changes" in second.stdout, second.stdout + second.stderr
    check = inside("sh", "-c", "id dcmon && systemctl is-enabled dcmon && stat -c '%a %U:%G' /etc/dcmon/config.local.toml "
                   "&& su -s /bin/sh dcmon -c '/usr/local/bin/dcmon check-config' && systemd-analyze verify /etc/systemd/system/dcmon.service")
    assert check.returncode == 0 and check.stderr == "", check.stdout + check.stderr
    assert "dialout" in check.stdout and "enabled" in check.stdout and "640 root:dcmon" in check.stdout
    gone = inside("bash", "/root/dcmon-src/deploy/install.sh", "--uninstall", "--purge")
    assert gone.returncode == 0 and "removed user dcmon" in gone.stdout, gone.stdout + gone.stderr
    assert not (chroot / "opt/dcmon").exists() and not (chroot / "etc/dcmon").exists()


# ------------------------------------------------------------------------------------------ systemd unit

def unit_settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def test_unit_has_the_contract_with_the_poller():
    s = unit_settings(UNIT.read_text())
    one = {k: v[-1] for k, v in s.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main" and one["WatchdogSec"] == "60"
    assert one["Restart"] == "on-failure" and one["RestartSec"] == "5"
    assert int(one["StartLimitBurst"]) >= 3 and int(one["StartLimitIntervalSec"]) >= 60
    assert one["ExecStart"] == "/opt/dcmon/venv/bin/dcmon run --config /etc/dcmon/config.toml"
    assert "DCMON_SPOOL_PATH=/var/lib/dcmon/spool.sqlite" in s["Environment"]
    assert one["User"] == "dcmon" and one["SupplementaryGroups"] == "dialout" and one["StateDirectory"] == "dcmon"
    assert one["ProtectSystem"] == "strict" and one["NoNewPrivileges"] == "yes" and one["PrivateTmp"] == "yes"
    assert one["CapabilityBoundingSet"] == "" and one["DevicePolicy"] == "closed"
    for dev in ("ttyUSB", "ttyAMA", "ttyS", "ttyACM"):
        assert f"char-{dev} rw" in s["DeviceAllow"]
    assert one["RestrictAddressFamilies"] == "AF_UNIX AF_INET AF_INET6"
    # started after time-sync.target (which install.sh makes mean "synchronised", bounded), never Requires=
    assert "time-sync.target" in " ".join(s["After"])
    assert "time-sync.target" not in " ".join(s.get("Requires", []) + s.get("Requisite", []) + s.get("BindsTo", []))


@pytest.fixture(scope="module")
def runnable_unit(tmp_path_factory):
    """The unit with ExecStart pointed at a program that exists here. systemd-analyze verify checks that
    ExecStart is executable, and /opt/dcmon is not installed on this machine: the copy differs only in
    that path (the ExecStart line itself is checked in test_unit_has_the_contract_with_the_poller)."""
    need("systemd-analyze", "systemd")
    d = tmp_path_factory.mktemp("unit")
    exe = d / "dcmon"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    text = UNIT.read_text().replace("ExecStart=/opt/dcmon/venv/bin/dcmon", f"ExecStart={exe}")
    assert text != UNIT.read_text()
    (d / "dcmon.service").write_text(text)
    return d / "dcmon.service"


def test_systemd_analyze_verify_is_clean(runnable_unit):
    r = run(["systemd-analyze", "verify", str(runnable_unit)])
    assert r.returncode == 0 and r.stderr == "", r.stderr
    # and on the file as shipped, the only complaint is the missing program
    r = run(["systemd-analyze", "verify", str(UNIT)])
    assert [line for line in r.stderr.splitlines() if "/opt/dcmon/venv/bin/dcmon" not in line] == [], r.stderr


def test_systemd_analyze_verify_would_catch_a_mistake(runnable_unit, tmp_path):
    """The check above is worth something: a typo in a key or a bad device right is reported on stderr."""
    bad = tmp_path / "dcmon.service"
    bad.write_text(runnable_unit.read_text().replace("DeviceAllow=char-ttyS rw", "DeviceAllow=char-ttyS rwx\nWatchdogSecs=60"))
    r = run(["systemd-analyze", "verify", str(bad)])
    assert "Invalid device rights" in r.stderr and "Unknown key" in r.stderr


def test_unit_exposure_score(runnable_unit):
    r = run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(runnable_unit)])
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout + r.stderr)
    assert m, r.stdout[-500:] + r.stderr
    assert float(m.group(1)) <= 2.5, f"exposure {m.group(1)}: the hardening got weaker"


# -------------------------------------------------------------------------------------------- udev rule

def udev_problems(rules_text: str, tmp: Path) -> list[str]:
    """Parse a rules file with the real udevadm: it reads every rules file and reports bad lines as
    ``FILE:LINE message``. Run in a private mount namespace with our file as /etc/udev/rules.d and a
    tmpfs on /run, on the loopback device (no device node), so the machine is left as it was."""
    need_root()
    need("udevadm", "udev")
    need("unshare", "util-linux")
    d = tmp / "rules.d"
    d.mkdir()
    (d / "99-dcmon-serial.rules").write_text(rules_text)
    script = ('mount --bind "$1" /etc/udev/rules.d && mount -t tmpfs tmpfs /run && '
              "exec udevadm test --action=add /sys/devices/virtual/net/lo")
    r = run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(d)], timeout=60)
    out = r.stdout + r.stderr
    assert "Reading rules file: /etc/udev/rules.d/99-dcmon-serial.rules" in out, out[-2000:]
    return [line for line in out.splitlines() if line.startswith("/etc/udev/rules.d/99-dcmon-serial.rules:")]


def test_udev_rule_parses(tmp_path):
    assert udev_problems(RULES.read_text(), tmp_path) == []


def test_udev_rule_examples_parse_when_enabled(tmp_path):
    """The commented symlink examples, uncommented as the docs tell the user to, are valid too."""
    text = RULES.read_text()
    enabled = re.sub(r"^# (SUBSYSTEM==)", r"\1", text, flags=re.M)
    assert enabled.count("SYMLINK+=") == 3 and enabled != text
    assert udev_problems(enabled, tmp_path) == []


def test_udev_check_would_catch_a_mistake(tmp_path):
    bad = RULES.read_text().replace("ATTR{device/latency_timer}", "ATRS{device/latency_timer}")
    assert any("Invalid key" in p for p in udev_problems(bad, tmp_path))


def test_udev_rule_sets_ftdi_latency():
    active = [line for line in RULES.read_text().splitlines() if line and not line.startswith("#")]
    assert active == ['ACTION=="add", SUBSYSTEM=="tty", KERNEL=="ttyUSB[0-9]*", ENV{ID_VENDOR_ID}=="0403", '
                      'ATTR{device/latency_timer}="1"']


# ------------------------------------------------------------------------------------------------- docs

def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    return repr(v)


def test_configuration_doc_lists_every_key_with_its_default():
    """docs/configuration.md is the reference: every key of every table, with the default from config.py."""
    from dcmon import config as c
    from dcmon.schema import MISSING, default, keys

    doc = (ROOT / "docs/configuration.md").read_text()
    sections = {m.group(1): m.start() for m in re.finditer(r"^## `\[\[?([a-z.]+)(?:\.NAME)?\]?\]`", doc, re.M)}
    tables = {"poller": c.PollerConfig, "spool": c.SpoolConfig, "influxdb": c.InfluxConfig,
              "grafana": c.GrafanaConfig, "mqtt": c.MqttConfig, "http": c.HttpConfig, "buses": c.BusConfig,
              "sensors": c.SensorConfig, "sensors.calibration": c.Calibration, "models": c.ModelConfig,
              "batteries": c.BatterySettings}
    missing = []
    for table, model in tables.items():
        assert table in sections, f"no '## `[{table}]`' section in docs/configuration.md"
        start = sections[table]
        end = min([p for p in sections.values() if p > start] + [len(doc)])
        body = doc[start:end]
        for key, field in keys(model).items():
            row = next((line for line in body.splitlines() if line.startswith(f"| `{key}`")), None)
            if row is None:
                missing.append(f"{table}.{key}")
                continue
            value = default(field)
            if value is not MISSING and isinstance(value, (bool, int, float, str)):
                shown = toml_value(value)
                if shown not in row and not (isinstance(value, float) and repr(int(value)) in row):
                    missing.append(f"{table}.{key} default {shown}")
    start = sections["models"]   # the fields of [[models.NAME.fields]] are listed in the same section
    body = doc[start:min([p for p in sections.values() if p > start] + [len(doc)])]
    missing += [f"models.NAME.fields.{k}" for k in keys(c.FieldConfig) if f"| `{k}`" not in body]
    assert missing == [], f"docs/configuration.md lacks: {missing}"


def test_docs_links_resolve():
    """Relative links in the docs I wrote point at files that exist."""
    for name in ("install.md", "wiring.md", "troubleshooting.md", "configuration.md"):
        doc = ROOT / "docs" / name
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" in target:
                continue
            assert (doc.parent / target).exists(), f"{name} links to missing {target}"


def test_diagram_is_a_real_svg_that_renders(tmp_path):
    svg = ROOT / "images/diagram.svg"
    tree = ET.parse(svg)
    ns = "{http://www.w3.org/2000/svg}"
    assert tree.getroot().tag == f"{ns}svg" and tree.getroot().get("viewBox")
    text = " ".join("".join(t.itertext()) for t in tree.iter(f"{ns}text"))
    for word in ("PZEM-017", "shunt", "RS485", "Raspberry Pi", "spool", "InfluxDB", "Grafana"):
        assert word in text, f"the diagram does not name {word}"
    need("rsvg-convert", "librsvg2-bin")
    png = tmp_path / "diagram.png"
    r = run(["rsvg-convert", "-o", str(png), str(svg)])
    assert r.returncode == 0 and r.stderr == "", r.stderr
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    assert width >= 600 and height >= 200
