"""Start-up cost of the configuration model: import + load of config.toml, pydantic (before) vs dcmon.schema (now).

Run:  .venv/bin/python bench/bench_config.py [--repeats 15] [--quick]

Each variant runs in fresh interpreters, alternately, with a bytecode cache (as an installed package has), and
times from before its first import to a validated Config from the committed config.toml:

- before: the pydantic model as it was (bench/config_pydantic.py, a frozen copy of commit e00e206's config.py);
- now:    dcmon.config on stdlib dataclasses + dcmon.schema;
- and, for the decision in docs/architecture.md, what importing attrs + cattrs alone costs (no model built).

pydantic, attrs and cattrs are not dcmon dependencies: when they are not importable here, they are installed
with pip into a temporary folder for this run only (needs PyPI or the configured index; without it the row
says so and the RATIO line prints SKIP). Both models must produce the same values from the file (checked).
Also: the time of one load() once imported (validation only), in one interpreter, best of several.
Prints ``RATIO …`` lines with PASS/MISS; exits 0 (a benchmark reports, it does not fail CI).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config.toml"
TARGET = 2.0  # at least twice as fast to start

# Prints {"ms": import+load, "values": a digest of the loaded config, "load_us": one load once imported}.
PROBE = """
import json, sys, time
t0 = time.perf_counter()
import importlib
mod = importlib.import_module(sys.argv[1])
cfg = mod.load(sys.argv[2], env={})
ms = (time.perf_counter() - t0) * 1000
best = min(((lambda t: (mod.load(sys.argv[2], env={}), time.perf_counter() - t)[1])(time.perf_counter())
            for _ in range(int(sys.argv[3]))), default=0.0)
s = cfg.sensors[0]
values = [cfg.poller.interval_s, cfg.spool.path, cfg.spool.max_bytes, cfg.influxdb.url, cfg.influxdb.api,
          cfg.buses["rs485"].gap_s, cfg.stopbits("rs485"), s.name, s.address, s.model, s.shunt_a, s.tags,
          s.calibration.voltage_gain]
print(json.dumps({"ms": ms, "values": values, "load_us": best * 1e6}))
"""

IMPORT_ONLY = """
import json, time
t0 = time.perf_counter()
import attrs, cattrs
cattrs.Converter()
print(json.dumps({"ms": (time.perf_counter() - t0) * 1000}))
"""


def ensure(modules: list[str], packages: list[str], into: Path) -> str:
    """'' when ``modules`` import here (or after pip-installing ``packages`` into ``into``), else why not."""
    code = "import " + ", ".join(modules)
    env = {**os.environ, "PYTHONPATH": str(into)}
    if subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode == 0:
        return ""
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        "--no-compile", "--target", str(into), *packages], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        return f"pip install {' '.join(packages)} failed: {r.stderr.strip().splitlines()[-1:] or r.returncode}"
    return ""


def probe(env: dict[str, str], module: str, loads: int) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, module, str(CONFIG), str(loads)], env=env,
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise SystemExit(f"bench_config: {module} failed: {r.stderr.strip()[-500:]}")
    return json.loads(r.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15, help="fresh interpreters per variant (best is kept)")
    ap.add_argument("--quick", action="store_true", help="3 interpreters a variant (smoke test)")
    args = ap.parse_args(argv)
    repeats, loads = (3, 20) if args.quick else (args.repeats, 200)
    print(f"load average at start: {os.getloadavg()[0]:.2f}; {repeats} fresh interpreters a variant; {CONFIG}")

    with tempfile.TemporaryDirectory(prefix="bench-config-") as tmp:
        site, cache = Path(tmp) / "site", Path(tmp) / "pycache"
        base = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE",) and not k.startswith("DCMON_")}
        base["PYTHONPYCACHEPREFIX"] = str(cache)
        path = os.pathsep.join([str(ROOT / "src"), str(ROOT / "bench"), str(site)])
        env = {**base, "PYTHONPATH": path}
        why_not = ensure(["pydantic"], ["pydantic>=2.6,<3"], site)
        why_not_attrs = ensure(["attrs", "cattrs"], ["attrs", "cattrs"], site)

        variants = {"now: dataclasses + dcmon.schema": "dcmon.config"}
        if not why_not:
            variants = {"before: pydantic": "config_pydantic", **variants}
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for name, module in variants.items():   # warm-up: writes the bytecode cache
            probe(env, module, 1)
        for _ in range(repeats):
            for name, module in variants.items():
                runs[name].append(probe(env, module, loads))
        attrs_ms: list[float] = []
        if not why_not_attrs:
            subprocess.run([sys.executable, "-c", IMPORT_ONLY], env=env, capture_output=True)
            for _ in range(repeats):
                r = subprocess.run([sys.executable, "-c", IMPORT_ONLY], env=env, capture_output=True, text=True)
                attrs_ms.append(json.loads(r.stdout)["ms"])

    print()
    print(f"{'variant':<36} {'import + load, ms':>18} {'median':>8} {'one load once imported':>24}")
    for name, rs in runs.items():
        ms = [r["ms"] for r in rs]
        print(f"{name:<36} {min(ms):18.1f} {statistics.median(ms):8.1f} {min(r['load_us'] for r in rs):21.0f} µs")
    if attrs_ms:
        print(f"{'(attrs + cattrs: the imports alone)':<36} {min(attrs_ms):18.1f} {statistics.median(attrs_ms):8.1f}")
    else:
        print(f"attrs + cattrs: not measured ({why_not_attrs})")
    now = min(r["ms"] for r in runs["now: dataclasses + dcmon.schema"])
    if why_not:
        print(f"pydantic: not measured ({why_not})")
        print(f"RATIO config start-up, pydantic → dataclasses: not measured (target ≥ {TARGET:g}×) SKIP")
        return 0
    before = min(r["ms"] for r in runs["before: pydantic"])
    same = runs["before: pydantic"][0]["values"] == runs["now: dataclasses + dcmon.schema"][0]["values"]
    print(f"same values from both models: {'yes' if same else 'NO'}")
    ratio = before / now
    print(f"RATIO config start-up (import + load of config.toml), pydantic → dataclasses: {before:.1f} → {now:.1f} ms "
          f"= {ratio:.1f}× faster (target ≥ {TARGET:g}×) {'PASS' if ratio >= TARGET and same else 'MISS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
