"""The code base passes the linter with the rules in pyproject.toml (pyflakes, bugbear, pyupgrade, isort)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_is_clean() -> None:
    ruff = Path(sys.executable).parent / "ruff"
    cp = subprocess.run([str(ruff), "check", "compile_cache", "tests", "scripts", "predict.py"], cwd=ROOT,
                        capture_output=True, text=True)
    assert cp.returncode == 0, cp.stdout + cp.stderr
