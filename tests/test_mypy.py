"""The package type-checks: ``python -m mypy src/dcmon`` with the [tool.mypy] settings in pyproject.toml.
A habit that keeps the next refactor honest (it found a sender probe calling a method the wrapped sink lacked)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_on_the_package_is_clean():
    r = subprocess.run([sys.executable, "-m", "mypy", "src/dcmon"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "Success: no issues found" in r.stdout
