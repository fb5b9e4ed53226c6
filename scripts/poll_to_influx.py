#!/usr/bin/env python3
"""The poller's entrypoint, as the README names it: `python3 scripts/poll_to_influx.py [options]`.

A thin shim over the package (`dcmon run`, same options). On a fresh clone, where the package is not installed
yet, it builds the project's virtual environment (.venv) once and runs itself from there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
VENV_PY = VENV / "bin" / "python"


def fail(msg: str) -> None:
    print(f"poll_to_influx: {msg}", file=sys.stderr)
    sys.exit(2)


def bootstrap() -> None:
    """Not importable here: create .venv if needed, install the package into it once, re-run from it."""
    in_venv = Path(sys.prefix).resolve() == VENV.resolve()
    if in_venv:
        if os.environ.get("DCMON_BOOTSTRAPPED"):
            fail("the package is still not importable from .venv; rerun: .venv/bin/pip install -e .")
        print("poll_to_influx: installing dcmon and its dependencies into .venv (first run only; pip shows its "
              "progress below) ...", file=sys.stderr, flush=True)
        # Not --quiet: on a Pi this takes a minute or more, and silence looks like a hang. On stderr, so that
        # stdout stays the poller's (run --test prints line protocol there).
        if subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check",
                           "--progress-bar", "on", "-e", str(ROOT)], stdout=sys.stderr).returncode != 0:
            fail("installing the package into .venv failed (see pip's message above)")
        print(f"poll_to_influx: installed. The dcmon command is {VENV / 'bin' / 'dcmon'} (or, in this shell, "
              f"`. .venv/bin/activate`, then `dcmon --help`)", file=sys.stderr, flush=True)
        os.environ["DCMON_BOOTSTRAPPED"] = "1"
    elif not VENV_PY.exists():
        print("poll_to_influx: creating .venv ...", file=sys.stderr, flush=True)
        if subprocess.run([sys.executable, "-m", "venv", str(VENV)]).returncode != 0:
            fail("cannot create a virtual environment; install it first: sudo apt-get install python3-venv")
    os.execv(str(VENV_PY), [str(VENV_PY), str(Path(__file__).resolve()), *sys.argv[1:]])


try:
    from dcmon.cli import main
except ImportError:
    bootstrap()

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
