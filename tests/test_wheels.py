"""Every runtime dependency (and theirs) installs on every Raspberry Pi without a compiler: pure Python, or a wheel
on PyPI for armv6l (Pi Zero W, Pi 1), armv7l (32-bit OS on Pi 2-5) and aarch64 (64-bit OS).

Checked from pyproject.toml's own dependency list with pip's resolver for a foreign platform
(``pip install --dry-run --only-binary=:all: --platform … --python-version 3.11``): no source distribution may
be chosen, so anything that would need a compiler on the Pi fails here. PyPI has no armv6l wheels at all
(its manylinux tags stop at armv7l), so there only pure-Python wheels pass — exactly what a Pi Zero W gets
without piwheels. A compiled-only dependency (pydantic-core) is shown to fail, and to pass on aarch64 (so the
tag lists are right, not just strict).

pip runs without this machine's pip configuration (PIP_CONFIG_FILE=/dev/null: no local indexes, wheel folders
or constraint files), against PyPI or whatever PIP_INDEX_URL names. Needs the network (DCMON_TEST_OFFLINE=1
skips it); about 10 s (the four resolutions run in parallel, metadata only: nothing is downloaded but PEP 658 metadata).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ("3.11", "cp311")  # Debian bookworm / Raspberry Pi OS 12; pure wheels satisfy any newer one too
GLIBC = range(17, 37)       # manylinux_2_17 … 2_36 (bookworm's glibc)


def platforms(arch: str) -> list[str]:
    """The wheel platform tags pip on a Pi with this CPU accepts (PyPI has manylinux only for armv7l/aarch64)."""
    tags = [f"linux_{arch}"]
    if arch != "armv6l":
        tags += [f"manylinux2014_{arch}", *(f"manylinux_2_{v}_{arch}" for v in GLIBC)]
    return tags


def dependencies() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def resolve(arch: str, requirements: list[str], tmp: Path) -> subprocess.Popen[str]:
    report = tmp / f"{arch}-{abs(hash(tuple(requirements)))}.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
           "--disable-pip-version-check", "--report", str(report), "--target", str(tmp / "target"),
           "--only-binary=:all:", "--python-version", PYTHON[0], "--implementation", "cp",
           "--abi", PYTHON[1], "--abi", "abi3", "--abi", "none"]
    for tag in platforms(arch):
        cmd += ["--platform", tag]
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull}
    for k in ("PIP_CONSTRAINT", "PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"):
        env.pop(k, None)
    proc = subprocess.Popen([*cmd, *requirements], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    proc.report = report  # type: ignore[attr-defined]
    return proc


def outcome(proc: subprocess.Popen[str]) -> tuple[int, str, list[str]]:
    out, _ = proc.communicate(timeout=300)
    files = []
    if proc.returncode == 0:
        files = [i["download_info"]["url"].rsplit("/", 1)[-1] for i in json.loads(proc.report.read_text())["install"]]  # type: ignore[attr-defined]
    return proc.returncode, out, files


COMPILED = "pydantic-core>=2.14"   # wheels for armv7l and aarch64 on PyPI, none for armv6l; no compiler on a Pi Zero
CASES = {  # name: (arch, extra requirements beside pyproject's)
    "armv6l": ("armv6l", []),
    "armv7l": ("armv7l", []),
    "aarch64": ("aarch64", [COMPILED]),   # the control: a compiled wheel is found where PyPI has one
    "pydantic-core on armv6l": ("armv6l", None),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if os.environ.get("DCMON_TEST_OFFLINE"):
        pytest.skip("DCMON_TEST_OFFLINE is set: no PyPI to resolve against")
    tmp = tmp_path_factory.mktemp("wheels")
    procs = {name: resolve(arch, [*dependencies(), *extra] if extra is not None else [COMPILED], tmp)
             for name, (arch, extra) in CASES.items()}
    return {name: outcome(p) for name, p in procs.items()}


@pytest.mark.parametrize("arch", ["armv6l", "armv7l", "aarch64"])
def test_every_runtime_dependency_installs_without_a_compiler(results, arch):
    code, out, files = results[arch]
    assert code == 0, f"a runtime dependency has no wheel for {arch} on PyPI (a Pi would compile it):\n{out}"
    names = {f.split("-")[0].lower() for f in files}
    for dep in ("pymodbus", "pyserial", "httpx", "tomlkit"):
        assert dep in names, files
    assert all(f.endswith(".whl") for f in files), files
    if not CASES[arch][1]:
        assert "pydantic" not in names and "pydantic_core" not in names, files


def test_a_compiled_only_dependency_fails_on_armv6l_and_is_found_on_aarch64(results):
    code, out, _ = results["pydantic-core on armv6l"]
    assert code != 0 and "pydantic-core" in out and "No matching distribution" in out, out
    code, out, files = results["aarch64"]
    assert code == 0, out
    assert any("aarch64" in f and f.startswith("pydantic_core-") for f in files), files


def test_tag_lists():
    assert platforms("armv6l") == ["linux_armv6l"]
    assert "manylinux_2_17_armv7l" in platforms("armv7l") and "manylinux_2_36_aarch64" in platforms("aarch64")
