"""``compile_cache.tools.profile`` on the tiny predictor: both tables printed, both Chrome traces written and valid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compile_cache.compiler import Example
from compile_cache.tools.profile import main, pick_example, side_by_side

ROOT = Path(__file__).resolve().parent.parent


def test_profile_prints_both_tables_and_writes_traces(tmp_path: Path) -> None:
    out = tmp_path / "prof"
    cp = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from compile_cache.tools.profile import main; sys.exit(main(sys.argv[1:]))",
            "--predictor",
            "tests/tiny_predictor.py:Predictor",
            "--batch",
            "4",
            "--rows",
            "30",
            "--iters",
            "3",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert cp.returncode == 0, cp.stderr[-3000:]
    text = cp.stdout
    assert "input (4x16)" in text and "EAGER" in text and "COMPILED" in text
    table = text[text.index("EAGER") :].splitlines()
    rows = [ln for ln in table[3:] if " | " in ln or ln.strip().startswith("aten::")]
    assert any(ln.startswith("aten::addmm") for ln in rows)  # the eager side
    # The compiled side: Inductor's fused C++ kernels, by name, in place of aten::relu / aten::sin.
    compiled_side = [ln.split(" | ", 1)[1] for ln in rows if " | " in ln]
    assert any("cpp_fused" in ln for ln in compiled_side), text
    assert not any("aten::sin" in ln for ln in compiled_side)
    assert "a request compiled" not in cp.stderr and "recompile" not in cp.stderr
    for mode in ("eager", "compiled"):
        trace = json.loads((out / f"{mode}.json").read_text())
        assert trace["traceEvents"], mode
    names = {e.get("name", "") for e in json.loads((out / "compiled.json").read_text())["traceEvents"]}
    assert any("cpp_fused" in n for n in names)


def test_pick_example_by_batch_and_seq() -> None:
    exs = [Example((torch.zeros(b, s), torch.ones(b, s)), label=f"b{b} s{s}") for b in (1, 16) for s in (64, 256)]
    assert pick_example(exs, None, None).label == "b1 s64"
    assert pick_example(exs, 16, None).label == "b16 s64"
    assert pick_example(exs, 1, 256).label == "b1 s256"
    with pytest.raises(ValueError, match="b16 s256"):
        pick_example(exs, 2, 64)


def test_side_by_side_pads_the_shorter_table() -> None:
    text = side_by_side([("aten::mm", 1.5, 3, 0.0)], [("a", 1.0, 1, 0.0), ("b", 0.5, 2, 0.0)])
    lines = text.splitlines()
    assert lines[0].startswith("EAGER") and "COMPILED" in lines[0]
    assert len(lines) == 5 and lines[-1].lstrip().startswith("|")


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--rows", "0"]) == 2
    assert main(["--predictor", "nope.py:Predictor"]) == 2
    assert "no file" in capsys.readouterr().err
