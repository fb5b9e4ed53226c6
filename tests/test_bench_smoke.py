"""The benchmarks under bench/ still run: each in its --quick mode, checked for its RATIO lines.

The numbers are not judged here (a quick run on a busy machine says little; bench/README.md has the real
runs): only that every benchmark reaches its verdicts, so that none of them rots. About 20 s in all;
bench_cost starts its own influxd, like the tests do.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
VERDICT = re.compile(r"^RATIO (?P<what>.+): .+ \(target [≥≤] [\d.]+ ?(?:%|×|ms|MB)\) (?P<verdict>PASS|MISS|SKIP)$")

# (script, the RATIO lines it must print: start of the text after "RATIO ")
EXPECTED = {
    "bench_bus.py": ["bus throughput, shipped", "bus scaling, shipped",
                     "bus throughput, prototype", "bus scaling, prototype"],
    "bench_cost.py": [f"{what}, {variant}" for variant in ("shipped", "recv", "recv+batch")
                      for what in ("CPU per reading", "peak RSS with 32 meters", "CPU at 8 meters × 1 Hz")],
    "bench_encode.py": ["line protocol"],
}


def _run(names: list[str]) -> dict[str, subprocess.CompletedProcess]:
    procs = {n: subprocess.Popen([sys.executable, str(BENCH / n), "--quick"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for n in names}
    done = {}
    for n, p in procs.items():
        try:
            out, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.terminate()                    # bench_cost then stops its influxd and pollers
            try:
                out, err = p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
            err += f"\n{n} --quick took more than 60 s"
        done[n] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    return done


@pytest.fixture(scope="module")
def outputs() -> dict[str, subprocess.CompletedProcess]:
    """One quick run of each: bench_bus (which mostly waits on the simulated wire) beside bench_encode, then
    bench_cost alone (it keeps both cores busy)."""
    return {**_run(["bench_bus.py", "bench_encode.py"]), **_run(["bench_cost.py"])}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_benchmark_reaches_its_verdicts(outputs, name):
    run = outputs[name]
    assert run.returncode == 0, f"{name} exited {run.returncode}: {run.stderr.strip()[-2000:]}"
    verdicts = [m for line in run.stdout.splitlines() if (m := VERDICT.match(line))]
    for what in EXPECTED[name]:
        assert any(m["what"].startswith(what) for m in verdicts), f"{name}: no RATIO line for {what!r}:\n{run.stdout}"
    assert "Traceback" not in run.stderr


def test_bus_benchmark_checks_its_timing_model_and_says_why(outputs):
    out = outputs["bench_bus.py"].stdout
    assert re.search(r"^wire limit: .* = 19\.51 reads/s a bus$", out, re.M), out  # (8+21+7) × 11/9600 s + 10 ms
    assert re.search(r"^calibration: simulator request → last reply byte [\d.]+ ms, model 47\.24 ms", out, re.M), out
    assert re.search(r"^why \(shipped\): +recv\(\) returns [+-][\d.]+ ms after", out, re.M), out


def test_encode_benchmark_compares_like_with_like(outputs):
    out = outputs["bench_encode.py"].stdout
    verdicts = [m for line in out.splitlines() if (m := VERDICT.match(line))]
    try:
        import influxdb_client  # noqa: F401
    except ImportError:
        assert "pip install influxdb-client" in out and verdicts[0]["verdict"] == "SKIP"
        return
    assert "same points from every encoder (incl. names to escape): yes" in out, out
    assert len(verdicts) == 3 and all(v["verdict"] in ("PASS", "MISS") for v in verdicts), out


def test_cost_benchmark_measured_real_readings(outputs):
    out = outputs["bench_cost.py"].stdout
    assert re.search(r"^start-up .*`dcmon run` imports \d+ ms", out, re.M), out
    rate = re.search(r"^  readings into influxd a second +(\d+) +(\d+) +(\d+)$", out, re.M)
    assert rate and all(int(n) > 0 for n in rate.groups()), out     # readings reached the real influxd
    assert re.search(r"^exit status after SIGTERM +0/0 +0/0 +0/0$", out, re.M), out
