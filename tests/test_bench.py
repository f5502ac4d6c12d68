"""The benchmark end to end on the tiny predictor (four fresh boots, about a minute): bench.json keeps its interface
and the chart is a PNG. No timing asserts: timings on a shared machine are noise, the keys are not."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from compile_cache.tools.bench import REPO_ROOT, REQUIRED_KEYS, break_even, overhead_removed, percentiles, repo_relative

ROOT = Path(__file__).resolve().parent.parent


def test_arithmetic() -> None:
    assert percentiles([1.0, 2.0, 3.0, 4.0, 5.0])["p50"] == 3.0
    assert percentiles([7.0]) == {"p50": 7.0, "p90": 7.0, "p99": 7.0}
    assert overhead_removed(1.0, 31.0, 4.0) == pytest.approx(0.9)
    assert overhead_removed(1.0, 1.0, 1.0) is None  # compiling cost nothing: no overhead to remove
    # 30 s extra boot, 1.1 ms saved per request → 27273 requests (ceil)
    assert break_even(31.0, 1.0, 11.0, 9.9) == math.ceil(30.0 / 0.0011)
    assert break_even(0.5, 1.0, 11.0, 9.9) == 0  # compiled boot no slower: pays from the first request
    assert break_even(31.0, 1.0, 9.0, 9.9) is None  # compiled not faster: never pays back


def test_paths_are_recorded_relative_to_the_checkout() -> None:
    assert REPO_ROOT == ROOT
    assert repo_relative(str(ROOT)) == "."
    assert repo_relative(f"{ROOT / 'examples' / 'llm' / 'predict.py'}:Runner") == "examples/llm/predict.py:Runner"
    assert repo_relative("/tmp/bench-out") == "/tmp/bench-out"  # outside the checkout: as given
    # The committed results carry no worktree path: they say how to rerun them from any checkout.
    committed = sorted((ROOT / "docs" / "bench").glob("*/bench.json"))
    assert committed
    for path in committed:
        r = json.loads(path.read_text())
        assert r["cwd"] == "." and (ROOT / r["predictor"].partition(":")[0]).is_file(), path
        assert str(ROOT) not in path.read_text(), path


def test_bench_quick_tiny(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "compile_cache", "bench", "--quick"]
    cmd += ["--predictor", "tests/tiny_predictor.py:Predictor", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cp = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert cp.returncode == 0, f"{cp.stdout}\n{cp.stderr}"
    r = json.loads((out / "bench.json").read_text())

    missing = [k for k in REQUIRED_KEYS if k not in r]
    assert not missing, missing
    for k in ("eager_setup_s", "cold_setup_s", "warm_setup_s"):
        assert isinstance(r[k], float) and r[k] >= 0, (k, r[k])
    for who in ("eager", "compiled"):
        for b in ("b1", "b16"):
            p = [r[f"{who}_{q}_ms_{b}"] for q in ("p50", "p90", "p99")]
            assert all(isinstance(v, float) and v > 0 for v in p), (who, b, p)
            assert p[0] <= p[1] <= p[2]
    assert r["overhead_removed"] is None or isinstance(r["overhead_removed"], float)
    assert r["warm_fixed_s"] == pytest.approx(r["warm_setup_s"] - r["eager_setup_s"], abs=1e-3)
    for k in ("break_even_requests_cold", "break_even_requests_warm"):
        assert r[k] is None or (isinstance(r[k], int) and r[k] >= 0), (k, r[k])
    if r["break_even_requests_cold"] is None:
        assert "break_even_note" in r  # a null is always explained
    assert r["request_path_compiles"] == 0
    assert r["boots"]["warm"]["request_path"]["requests"] == 20
    # The modes really differ: eager compiled nothing, the warm boot restored what the seed boot uploaded.
    assert r["boots"]["eager"]["compiled"] is False and r["boots"]["warm"]["compiled"] is True
    assert r["warm_cache"] == "hit" and r["boots"]["seed"]["upload_state"] == "done"
    assert r["boots"]["cold"]["compiles"] > 0 and r["boots"]["warm"]["compiles"] == 0  # warm: no Dynamo
    assert r["strategy"] in ("jit", "export") and isinstance(r["torch_version"], str)
    assert isinstance(r["machine"]["nproc"], int) and r["command"].startswith("python -m compile_cache bench")
    assert r["cwd"] == "." and r["predictor"] == "tests/tiny_predictor.py:Predictor"  # run from the checkout's root
    # The tiny model declares batches 1 and 4: the b16 figures say which batch they are at.
    assert r["latency_examples"]["b16"]["batch"] == 4

    png = (out / "bench.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert not (out / "work").exists()  # caches and the store are removed unless --keep-work
    assert "overhead removed" in cp.stdout and "request-path compiles: 0" in cp.stdout


def test_bench_quick_two_parts(tmp_path: Path) -> None:
    """A runner with named parts (export + jit): requests and latency go through run() with its default inputs, and
    each part is timed alone; the keys every bench.json has are there, the batch keys are not invented."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "compile_cache", "bench", "--quick", "--requests", "5", "--latency-iters", "3"]
    cmd += ["--predictor", "tests/tiny_parts.py:TwoParts", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cp = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert cp.returncode == 0, f"{cp.stdout}\n{cp.stderr}"
    r = json.loads((out / "bench.json").read_text())
    common = [k for k in REQUIRED_KEYS if "_ms_b" not in k]
    missing = [k for k in common if k not in r]
    assert not missing, missing
    assert r["parts"] == ["encoder", "head"] and r["request_path_compiles"] == 0
    assert set(r["latency_examples"]) == {"run", "part_encoder", "part_head"}
    assert r["latency_examples"]["run"]["example"] == "run(batch=1)"
    for tag in r["latency_examples"]:
        for who in ("eager", "compiled"):
            assert len(r["samples_ms"][f"{who}_{tag}"]) == 3 and r[f"{who}_p50_ms_{tag}"] > 0
    assert "compiled_p50_ms_b1" not in r  # no batch sizes of its own: not made up
    assert "compiled_p50_ms_run" in r["break_even_formula"]
    for name in ("cold", "warm"):
        rp = r["boots"][name]["request_path"]
        assert rp["requests"] == 5 and rp["via"] == "run() with its default inputs"
    assert r["warm_cache"] == "hit" and r["boots"]["warm"]["compiled"] is True
    assert r["boots"]["eager"]["compiled"] is False
    assert (out / "bench.png").read_bytes().startswith(b"\x89PNG")


def test_bench_bad_predictor(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "compile_cache", "bench", "--predictor", "nope.py:Predictor", "--out", str(tmp_path)]
    cp = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert cp.returncode == 2 and "nope.py" in cp.stderr
