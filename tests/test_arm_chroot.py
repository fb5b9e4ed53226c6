"""Opt-in: the real install on emulated Raspberry Pi CPUs, polling into a real InfluxDB.

``DCMON_TEST_ARM=DIR`` runs it (DIR, e.g. /work/arm-chroots, keeps the chroots for the next run). For each of
Debian bookworm **arm64** (Pi 3/4/5/Zero 2 W on a 64-bit OS) and **armhf** (ARMv7: Pi 2/3/4 on a 32-bit OS),
under qemu-user-static, and this machine's own architecture as the native reference measured the same way:

1. ``debootstrap --arch=ARCH --variant=minbase --include=systemd bookworm DIR/ARCH`` once (about 5 min
   emulated), from the Debian mirror this machine's apt uses;
2. a clean export of the committed tree (``git archive HEAD``) into the chroot, pip's cache emptied (a user's
   first install has none), a previous install purged;
3. ``deploy/install.sh`` as root, without ``--prefix`` (apt-get, useradd, systemctl enable offline, pip from
   PyPI: the user's path). Nothing may be compiled: pip caches every wheel it builds from an sdist, and that
   cache must stay empty; every compiled wheel installed must carry this architecture's tag;
4. a ``config.local.toml`` pointing at two meters served by the simulator on a real pty of this machine
   (fixed values, group dialout, as a USB adapter is) and at influxd on this machine's 127.0.0.1 (the chroot
   shares the network); ``dcmon run --once`` as the dcmon user, and the exact values must be in InfluxDB;
5. a short ``dcmon run`` (the service's loop) ended by SIGTERM: exit 0, more points;
6. ``dcmon run --simulate --once``: the simulator itself on the emulated CPU, on a pty of a devpts of its own;
7. ``install.sh --uninstall --purge``.

It records the wall times (debootstrap, install.sh, ``dcmon --version``, ``import pydantic``, ``dcmon run
--once``) in DIR/timings-ARCH.json and prints them; ``python tests/test_arm_chroot.py DIR`` prints the table
of all architectures with the ratio to the native one (bench/README.md, section "Emulated Raspberry Pi").

Each command runs in its own private mount namespace (``unshare --mount``) where /proc, /dev and /dev/pts
are mounted: the mounts exist only as long as that process, so no exit path (failure, timeout, kill) leaves
one behind on this machine, and DIR can be deleted with ``rm -rf`` at any time.

Not covered: ARMv6 (Pi Zero W, Pi 1): Debian's armhf needs ARMv7 and no Debian port runs there; Raspberry Pi
OS's armhf is built for ARMv6, and its images are not on the Debian mirror. The wheel-availability test checks
that every dependency has a wheel (or is pure Python) for armv6l. qemu-user emulates the CPU only, so its
speed is not a Pi's: the times say how the steps compare, not how long a Pi takes.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dcmon.models import MODELS
from dcmon.simulator import SimMeter, Simulator

ROOT = Path(__file__).resolve().parent.parent
SUITE = "bookworm"
# Debian architecture → (binfmt entry of qemu-user-static, the machine name Python and wheel tags use)
ARCHES = {"arm64": ("qemu-aarch64", "aarch64"), "armhf": ("qemu-arm", "armv7l"), "amd64": (None, "x86_64")}
DIALOUT_GID = 20  # Debian's fixed gid for dialout (base-passwd), the same inside the chroot


def native_arch() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, check=True).stdout.strip()


def arch_params() -> list[str]:
    native = native_arch() if shutil.which("dpkg") else "amd64"
    return ["arm64", "armhf"] + ([native] if native not in ("arm64", "armhf") else [])


def need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if not path:
        pytest.fail(f"{tool} not found: apt-get install {package}")
    return path


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 or one-line sources), else deb.debian.org."""
    texts = []
    for p in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if p.is_file() and p.suffix in (".list", ".sources"):
            texts.append(p.read_text(errors="replace"))
    for text in texts:
        for m in re.finditer(r"^\s*(?:URIs:|deb(?:\s+\[[^]]*\])?)\s+(\S+)", text, re.M):
            uri = m.group(1).rstrip("/")
            if uri.startswith("http") and uri.endswith("/debian"):
                return uri
    return "http://deb.debian.org/debian"


def check_binfmt(arch: str) -> None:
    entry = ARCHES[arch][0]
    if entry is None:
        return
    fix = (f"mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; update-binfmts --enable {entry} "
           "(apt-get install qemu-user-static binfmt-support)")
    p = Path("/proc/sys/fs/binfmt_misc") / entry
    if not p.exists():
        pytest.fail(f"{arch} binaries cannot run here: binfmt entry {entry} not registered: {fix}")
    text = p.read_text()
    if not text.startswith("enabled"):
        pytest.fail(f"binfmt entry {entry} is disabled: update-binfmts --enable {entry}")
    flags = re.search(r"^flags: *(\S*)", text, re.M)
    if not flags or "F" not in flags.group(1):
        # without F the interpreter is looked up inside the chroot, where it is not
        pytest.fail(f"binfmt entry {entry} lacks the F (fix-binary) flag: reinstall qemu-user-static (Debian's has it)")


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def __str__(self) -> str:
        return f"exit {self.returncode} after {self.seconds:.1f} s\n{self.stdout[-3000:]}\n{self.stderr[-3000:]}"


def run_timed(argv: list[str], timeout: float) -> Result:
    """Run in its own process group; on timeout the whole group is killed (and with it the mount namespace)."""
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"{' '.join(argv[-6:])}: no result after {timeout:.0f} s\n{out[-2000:]}\n{err[-2000:]}")
    return Result(p.returncode, out, err, time.monotonic() - t0)


@dataclass
class Chroot:
    arch: str
    path: Path
    env: list[str] = field(default_factory=lambda: ["PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root",
                                                    "LANG=C.UTF-8"])

    @property
    def ready_mark(self) -> Path:
        return self.path / ".dcmon-debootstrap-ok"

    def ensure(self) -> float | None:
        """debootstrap once; the seconds it took, or None when the chroot was there already."""
        if self.ready_mark.exists():
            return None
        if self.path.exists():  # a half-made root from an interrupted run
            shutil.rmtree(self.path)
        r = run_timed(["debootstrap", f"--arch={self.arch}", "--variant=minbase", "--include=systemd", SUITE,
                       str(self.path), debian_mirror()], timeout=3600)
        assert r.returncode == 0, f"debootstrap {self.arch}: {r}"
        self.ready_mark.write_text(json.dumps({"seconds": round(r.seconds, 1), "mirror": debian_mirror()}))
        return r.seconds

    def inside(self, *cmd: str, timeout: float = 900, own_pts: bool = False) -> Result:
        """``own_pts``: a private devpts instance, so that a pty made inside is numbered apart from this machine's
        (where another program may hold /dev/pts/N locked); otherwise this machine's, to reach its ptys."""
        pts = ('mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5 devpts "$1/dev/pts" && '
               'mount --bind "$1/dev/pts/ptmx" "$1/dev/ptmx"') if own_pts else 'mount --bind /dev/pts "$1/dev/pts"'
        script = f'mount -t proc proc "$1/proc" && mount --rbind /dev "$1/dev" && {pts} && shift && exec chroot "$@"'
        return run_timed(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(self.path),
                          str(self.path), "/usr/bin/env", "-i", *self.env, *cmd], timeout)

    def as_dcmon(self, *cmd: str, timeout: float = 300, own_pts: bool = False) -> Result:
        """As the service runs it: user dcmon with its groups (dialout), no login shell in between."""
        return self.inside("setpriv", "--reuid=dcmon", "--regid=dcmon", "--init-groups", *cmd, timeout=timeout,
                           own_pts=own_pts)

    def best_of(self, n: int, *cmd: str) -> float:
        times = []
        for _ in range(n):
            r = self.inside(*cmd)
            assert r.returncode == 0, f"{' '.join(cmd)}: {r}"
            times.append(r.seconds)
        return min(times)


@dataclass
class FixedMeter(SimMeter):
    """A simulated meter that always answers the same values, so InfluxDB can be checked exactly."""

    fixed: dict[str, float | bool] = field(default_factory=dict)

    def values(self, now: float | None = None) -> dict[str, float | bool]:
        return dict(self.fixed)


# the values each meter serves, at the PZEM-017's resolution (0.01 V, 0.01 A, 0.1 W, 1 Wh; P = V × I)
EXPECTED = {
    "battery": (1, {"voltage_v": 13.57, "current_a": 4.32, "power_w": 58.6, "energy_wh": 12345.0}),
    "solar": (2, {"voltage_v": 26.41, "current_a": 7.05, "power_w": 186.2, "energy_wh": 5432.0}),
}

LOCAL_CONFIG = """# written by tests/test_arm_chroot.py
[poller]
interval_s = 1.0
settle_s = 0
host = "{host}"
health_interval_s = 0

[influxdb]
url = "{url}"
database = "{db}"
timeout_s = 10

[buses.rs485]
port = "{port}"
timeout_s = 2.0
retries = 1

[[sensors]]
name = "battery"
bus = "rs485"
address = 1
model = "pzem017"
shunt_a = 100
tags = {{ site = "pi" }}

[[sensors]]
name = "solar"
bus = "rs485"
address = 2
model = "pzem017"
shunt_a = 100
tags = {{ site = "pi" }}
"""


def unlocked_simulator(meters: list[SimMeter], stack: ExitStack) -> Simulator:
    """A simulator on a pty nobody else holds locked. /dev/pts is this machine's, shared with every other program:
    a program that keeps /dev/pts/N open and flock'ed after its pty was closed (a leaked test fixture) makes
    the next pty given that number look "in use" to dcmon. Such ptys are kept open (so their numbers are not
    handed out again) until a free one comes."""
    for _ in range(8):
        sim = stack.enter_context(Simulator(meters))
        fd = os.open(sim.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return sim
        except BlockingIOError:
            continue
        finally:
            os.close(fd)
    pytest.fail("every new pty is locked by another program (see /proc/locks)")


def compiled_wheels(venv_site: Path) -> dict[str, str]:
    """Distribution → wheel tag, for every installed distribution whose wheel is not pure Python."""
    out = {}
    for wheel in venv_site.glob("*.dist-info/WHEEL"):
        tags = re.findall(r"^Tag: *(\S+)", wheel.read_text(), re.M)
        if tags and not all(t.endswith("-none-any") for t in tags):
            out[wheel.parent.name.removesuffix(".dist-info")] = tags[0]
    return out


pytestmark = pytest.mark.skipif(
    not os.environ.get("DCMON_TEST_ARM"),
    reason="opt-in, about 15 min per architecture the first time (emulated debootstrap), then about 6: "
           "DCMON_TEST_ARM=/work/arm-chroots runs install.sh in emulated Debian arm64 and armhf chroots")


@pytest.mark.parametrize("arch", arch_params())
def test_install_and_poll_on_emulated_pi(arch, influxd, fresh_db):
    if os.geteuid() != 0:
        pytest.fail("this test needs root (debootstrap, chroot, mount namespaces): run it as root")
    need("debootstrap", "debootstrap")
    need("unshare", "util-linux")
    need("git", "git")
    check_binfmt(arch)
    base = Path(os.environ["DCMON_TEST_ARM"])
    base.mkdir(parents=True, exist_ok=True)
    chroot = Chroot(arch, base / arch)
    timings: dict[str, object] = {"arch": arch, "machine": ARCHES[arch][1]}
    took = chroot.ensure()
    timings["debootstrap_s"] = round(took if took is not None else json.loads(chroot.ready_mark.read_text())["seconds"], 1)
    timings["debootstrap_this_run"] = took is not None

    r = chroot.inside("uname", "-m")
    assert r.stdout.strip() == ARCHES[arch][1], f"the chroot does not run {arch} code: {r}"

    # -- a clean export of the committed tree, and a first-time install (no pip cache, nothing installed)
    if (chroot.path / "opt/dcmon").exists() or (chroot.path / "etc/dcmon").exists():
        r = chroot.inside("bash", "/root/dcmon-src/deploy/install.sh", "--uninstall", "--purge")
        assert r.returncode == 0, f"purging the previous install: {r}"
    src = chroot.path / "root/dcmon-src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "HEAD"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True)
    shutil.rmtree(chroot.path / "root/.cache/pip", ignore_errors=True)
    shutil.copy("/etc/resolv.conf", chroot.path / "etc/resolv.conf")
    ca = os.environ.get("PIP_CERT") or os.environ.get("REQUESTS_CA_BUNDLE")
    if ca:  # a TLS-intercepting proxy's CA, as this machine trusts it
        shutil.copy(ca, chroot.path / "root/host-ca.crt")
        chroot.env.append("PIP_CERT=/root/host-ca.crt")

    install = chroot.inside("bash", "/root/dcmon-src/deploy/install.sh", timeout=3600)
    assert install.returncode == 0, f"install.sh on {arch}: {install}"
    assert "installed dcmon" in install.stdout, install
    timings["install_s"] = round(install.seconds, 1)
    timings["install_ran_apt"] = "installing Debian packages" in install.stdout

    built = sorted(p.name for p in (chroot.path / "root/.cache/pip/wheels").rglob("*.whl"))
    assert built == [], f"pip built wheels from source on {arch} (a Pi would need a compiler): {built}"
    site = next((chroot.path / "opt/dcmon/venv/lib").glob("python3*/site-packages"))
    wheels = compiled_wheels(site)
    timings["compiled_wheels"] = wheels
    wrong = {d: t for d, t in wheels.items() if not t.endswith(ARCHES[arch][1])}
    assert not wrong, f"compiled wheels for another platform installed on {arch}: {wrong}"

    # -- start-up under emulation: the whole command tree (every import), and pydantic alone
    r = chroot.inside("/usr/local/bin/dcmon", "--version")
    assert r.returncode == 0 and r.stdout.startswith("dcmon "), r
    timings["version_s"] = round(chroot.best_of(3, "/opt/dcmon/venv/bin/dcmon", "--version"), 2)
    timings["python_s"] = round(chroot.best_of(3, "/opt/dcmon/venv/bin/python", "-c", "pass"), 2)
    if "pydantic_core" in "".join(wheels):
        timings["import_pydantic_s"] = round(chroot.best_of(3, "/opt/dcmon/venv/bin/python", "-c", "import pydantic"), 2)

    # -- the installed poller against meters on a real pty and influxd on this machine's loopback
    meters = [FixedMeter(model=MODELS["pzem017"], address=addr, fixed={**vals, "high_voltage_alarm": False,
                                                                        "low_voltage_alarm": False})
              for addr, vals in EXPECTED.values()]
    host_tag = f"emulated-{arch}"
    with ExitStack() as stack:
        sim = unlocked_simulator(meters, stack)
        os.chown(sim.path, 0, DIALOUT_GID)  # as udev gives a USB serial adapter: group dialout, 0660
        os.chmod(sim.path, 0o660)
        local = chroot.path / "etc/dcmon/config.local.toml"
        local.write_text(LOCAL_CONFIG.format(host=host_tag, url=influxd.url, db=fresh_db, port=sim.path))
        check = chroot.as_dcmon("/usr/local/bin/dcmon", "check-config")
        assert check.returncode == 0 and "ok: 2 sensor(s)" in check.stdout, check

        once = chroot.as_dcmon("/usr/local/bin/dcmon", "run", "--once")
        assert once.returncode == 0, f"dcmon run --once on {arch}: {once}"
        assert "all readings written" in once.stderr + once.stdout, once
        timings["run_once_s"] = round(once.seconds, 2)
        assert "Traceback" not in once.stderr, once
        for sensor, (addr, vals) in EXPECTED.items():
            assert re.search(rf"^{sensor}\s+{vals['voltage_v']:.2f} V\s+{vals['current_a']:.3f} A", once.stdout, re.M), once.stdout
            rows = influxd.query(f"SELECT voltage_v, current_a, power_w, energy_wh, low_voltage_alarm, model, address, "
                                 f"host, site FROM dc_power WHERE sensor = '{sensor}'", fresh_db)
            assert rows and len(rows[0]["values"]) == 1, rows
            got = dict(zip(rows[0]["columns"], rows[0]["values"][0]))
            assert {k: got[k] for k in vals} == vals, (arch, sensor, got)
            assert got["low_voltage_alarm"] is False and got["model"] == "pzem017" and got["address"] == str(addr)
            assert got["host"] == host_tag and got["site"] == "pi"

        # the service's own loop, for a while, then SIGTERM as systemctl stop sends it
        forever = chroot.as_dcmon("timeout", "--preserve-status", "--signal=TERM", "25",
                                  "/usr/local/bin/dcmon", "run", "--no-print")
        assert forever.returncode == 0, f"dcmon run, stopped by SIGTERM, on {arch}: {forever}"
        assert "Traceback" not in forever.stderr, forever
        polled = sim.requests
    counts = {s: influxd.count("dc_power", db=fresh_db, where=f"WHERE sensor = '{s}'") for s in EXPECTED}
    # 25 s at 1 s intervals, less start-up (several seconds emulated): at least a handful more per meter
    assert all(n >= 1 + 5 for n in counts.values()), (counts, polled, forever)
    timings["run_25s_points_per_meter"] = min(counts.values()) - 1

    # -- the simulator itself on the emulated CPU (a pty inside the chroot), through the same install
    sim_once = chroot.as_dcmon("/usr/local/bin/dcmon", "run", "--simulate", "--once", own_pts=True)
    assert sim_once.returncode == 0, f"dcmon run --simulate --once on {arch}: {sim_once}"
    for sensor in EXPECTED:
        m = re.search(rf"^{sensor}\s+([\d.]+) V\s+([\d.]+) A\s+([\d.]+) W", sim_once.stdout, re.M)
        assert m, sim_once
        v, i, p = map(float, m.groups())
        assert 12.5 < v < 14.5 and 0 < i < 20 and abs(p - v * i) <= 0.1 + 0.01 * v * i, (sensor, v, i, p)
    after = {s: influxd.count("dc_power", db=fresh_db, where=f"WHERE sensor = '{s}'") for s in EXPECTED}
    assert all(after[s] == counts[s] + 1 for s in EXPECTED), (counts, after)

    gone = chroot.inside("bash", "/root/dcmon-src/deploy/install.sh", "--uninstall", "--purge")
    assert gone.returncode == 0 and "removed user dcmon" in gone.stdout, gone
    assert not (chroot.path / "opt/dcmon").exists()

    (base / f"timings-{arch}.json").write_text(json.dumps(timings, indent=1) + "\n")
    print(f"\n{arch}: {json.dumps(timings)}")


# ------------------------------------------------------------------------------ the table for bench/README.md

def table(base: Path) -> str:
    rows = {p.stem.removeprefix("timings-"): json.loads(p.read_text()) for p in sorted(base.glob("timings-*.json"))}
    if not rows:
        return f"no timings in {base}: run DCMON_TEST_ARM={base} pytest tests/test_arm_chroot.py first"
    native = rows.get(native_arch())
    keys = [("debootstrap_s", "debootstrap"), ("install_s", "install.sh"), ("python_s", "python -c pass"),
            ("version_s", "dcmon --version"), ("import_pydantic_s", "import pydantic"), ("run_once_s", "dcmon run --once")]
    lines = ["| step | " + " | ".join(f"{a} ({r['machine']})" for a, r in rows.items()) + " |",
             "|---|" + "---:|" * len(rows)]
    for key, label in keys:
        cells = []
        for r in rows.values():
            v = r.get(key)
            apt = " with apt-get" if key == "install_s" and r.get("install_ran_apt") else ""
            if v is None:
                cells.append("–")
            elif native and native is not r and native.get(key) and not (key == "install_s" and (
                    apt or native.get("install_ran_apt"))):
                cells.append(f"{v:g} s (×{v / native[key]:.1f})")
            else:
                cells.append(f"{v:g} s{apt}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("DCMON_TEST_ARM", "/work/arm-chroots"))))
