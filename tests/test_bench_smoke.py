"""The benchmarks under bench/ still run: each in its --quick mode, checked for its RATIO lines.

The numbers are not judged here (a quick run on a busy machine says little; bench/README.md has the real
runs): only that every benchmark reaches its verdicts, so that none of them rots (plus counts that do not
depend on the machine's speed, such as commits per poll cycle). About 25 s in all;
bench_cost and bench_spool start their own influxd, like the tests do.
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
                     *(f"extra bus time a read, {g}" for g in (
                         "1 junk byte", "3 junk bytes", "local echo", "a foreign-address reply", "truncated")),
                     "healthy meters' cadence with one dead meter of 8, shipped"],
    "bench_config.py": ["config start-up"],
    "bench_cost.py": [f"{what}, min_send_interval_s = {variant}" for variant in ("0 (shipped)", "5")
                      for what in ("CPU per reading", "peak RSS with 32 meters", "CPU at 8 meters × 1 Hz")],
    "bench_encode.py": ["line protocol"],
    "bench_spool.py": ["spool drain vs direct post"],
    "bench_dashboards.py": ["dashboard queries, raw / downsampled"],
    "bench_http.py": ["on_reading with 20 live clients + 1 stalled vs none", "exposition, prometheus_client"],
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
    """One quick run of each: bench_bus (which mostly waits on the simulated wire) beside bench_encode and
    bench_spool (short bursts), then bench_cost alone (it keeps both cores busy), then bench_dashboards, then
    bench_config alone (its back-to-back interpreters would starve the timed simulators), then bench_http alone
    (its feeding loop and 20 clients would disturb bench_bus's timing)."""
    return {**_run(["bench_bus.py", "bench_encode.py", "bench_spool.py"]), **_run(["bench_cost.py"]),
            **_run(["bench_dashboards.py"]), **_run(["bench_config.py"]), **_run(["bench_http.py"])}


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
    assert re.search(r"^reference: pymodbus stock recv +1 +[\d.]+ ", out, re.M), out        # the side-by-side row
    for which in ("shipped", "reference"):
        assert re.search(rf"^why \({which}\): +recv\(\) returns [+-][\d.]+ ms after", out, re.M), out


def test_encode_benchmark_compares_like_with_like(outputs):
    out = outputs["bench_encode.py"].stdout
    verdicts = [m for line in out.splitlines() if (m := VERDICT.match(line))]
    if "pip install influxdb-client" in out:       # influxdb_client is not installed: nothing to compare with
        assert verdicts[0]["verdict"] == "SKIP", out
        return
    assert "same points from every encoder (incl. names to escape): yes" in out, out
    assert len(verdicts) == 1 and verdicts[0]["what"].startswith("line protocol, dcmon Reading.to_line()"), out
    assert verdicts[0]["verdict"] in ("PASS", "MISS"), out


def test_cost_benchmark_measured_real_readings(outputs):
    out = outputs["bench_cost.py"].stdout
    assert re.search(r"^start-up .*`dcmon run` imports \d+ ms", out, re.M), out
    rates = re.findall(r"^  readings into influxd a second +([\d.]+) +([\d.]+)$", out, re.M)
    assert len(rates) == 2 and all(float(n) > 0 for row in rates for n in row), out  # readings reached influxd
    written = re.findall(r"^  disk writes a reading, bytes +([\d,]+) +([\d,]+)$", out, re.M)
    assert len(written) == 2 and all(int(n.replace(",", "")) > 0 for row in written for n in row), out
    assert re.search(r"^trade-off, min_send_interval_s 0 → 5 s at 8 meters × 1 Hz: CPU ", out, re.M), out
    assert re.search(r"^exit status after SIGTERM +0/0 +0/0$", out, re.M), out
    # the second output beside InfluxDB alone (issue 14): readings still reach influxd, both exit cleanly
    both = re.findall(r"^  readings a second into influxd +([\d.]+) +([\d.]+)$", out, re.M)
    assert len(both) == 1 and all(float(n) > 0 for n in both[0]), out
    assert re.search(r"^exit status after SIGTERM, both workloads +0/0 +0/0$", out, re.M), out
    assert re.search(r"^RATIO disk writes per reading, InfluxDB \+ MQTT / InfluxDB alone .*: [\d.]+×", out, re.M), out


def test_dashboard_benchmark_compares_the_same_energy(outputs):
    out = outputs["bench_dashboards.py"].stdout
    assert "same energy from raw and downsampled: yes" in out, out
    assert "same battery Ah from raw and downsampled: yes" in out, out
    assert re.search(r"^energy per week .* dcmon_1h ", out, re.M), out


def test_config_benchmark_compares_the_same_values(outputs):
    out = outputs["bench_config.py"].stdout
    assert re.search(r"^now: dataclasses \+ dcmon\.schema +[\d.]+ ", out, re.M), out
    if "pydantic: not measured (" not in out:      # pip could not fetch pydantic: the RATIO line says SKIP
        assert "same values from both models: yes" in out, out


def test_spool_benchmark_drained_every_point(outputs):
    out = outputs["bench_spool.py"].stdout
    assert re.search(r"^points in InfluxDB: \{'direct1': (\d+), 'spool': \1, 'direct2': \1\}", out, re.M), out
    assert re.search(r"^process +up +[\d,]+ +[\d,]+ +0\.125 ", out, re.M), out  # one commit a poll cycle
