"""`scripts/predict` (what `make predict` runs): a short readable summary by default, the raw output as one JSON
line with --json. The end-to-end case boots the tiny predictor eager in the real Cog runtime (no compile)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def load_script():  # scripts/predict has no .py suffix
    loader = importlib.machinery.SourceFileLoader("predict_script", str(ROOT / "scripts" / "predict"))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_summary_names_each_sentences_nearest_other() -> None:
    s = load_script()
    rows = [[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0]]
    out = s.summary(rows, {"text": "food\n\nbread \nbaby"})
    lines = out.splitlines()
    assert lines[0] == "3 embeddings x 3 floats, norm 1.000-1.000"
    assert lines[2].split() == ['"food"', "->", '"bread"', "0.800"]
    assert lines[3].split() == ['"bread"', "->", '"food"', "0.800"]
    assert lines[4].split() == ['"baby"', "->", '"food"', "0.000"]  # ties: the first of the others
    # Rows that do not match the input's lines are numbered; anything else is described, not dumped whole.
    assert '"#2"' in s.summary(rows, {"text": "only one"})
    other = s.summary({"label": "cat"}, {})
    assert other.startswith("output: dict") and '"cat"' in other


def run_predict(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "COMPILE_CACHE_COMPILE": "0",
        "COMPILE_CACHE_DISABLE": "1",
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
    }
    return subprocess.run(
        [sys.executable, "scripts/predict", "--predictor", "tests/tiny_predictor.py:Predictor", "--timeout", "300",
         *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )


def test_default_is_a_summary_and_json_is_one_raw_line(tmp_path: Path) -> None:
    raw = run_predict(tmp_path, "--json")
    assert raw.returncode == 0, raw.stderr[-3000:]
    (line,) = raw.stdout.splitlines()  # exactly one line on stdout: scripts parse it
    output = json.loads(line)
    assert isinstance(output, list) and all(isinstance(x, float) for x in output[0])
    assert "compile_cache setup timeline" in raw.stderr  # the setup timeline still goes to stderr

    readable = run_predict(tmp_path)
    assert readable.returncode == 0, readable.stderr[-3000:]
    assert readable.stdout.startswith(f"{len(output)} embeddings x {len(output[0])} floats, norm ")
    assert "[" not in readable.stdout and "compile_cache setup timeline" in readable.stderr
