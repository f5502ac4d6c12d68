"""``scripts/gpu_check --cpu`` end to end, so the GPU check cannot rot between sessions that have a GPU.

One ``--quick`` run for the module (each part at batch 1 only: half the cold compiles; an eager boot, then a cold
and a warm boot for jit and for export; reduce-overhead and max-autotune share the jit boots on CPU and say so),
then asserts on what it wrote:
the JSON interface, the warm boots' counts (cache hit, 0 FX-graph misses, 0 autotune runs, 0 Triton compiles),
outputs equal to eager, the foreign-GPU fault refused naming the factor, the chart. Counts, never timings.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from compile_cache.tools.gpucheck import RUN_KEYS, TOP_KEYS
from compile_cache.tools.gpucheck_models import MODELS, CheckModel, Size, register

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def check(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, str]:
    out = tmp_path_factory.mktemp("gpu-check")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPILE_CACHE_", "TORCHINDUCTOR_"))}
    cp = subprocess.run([sys.executable, "scripts/gpu_check", "--cpu", "--quick", "--out", str(out)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=1200)
    assert cp.returncode == 0, f"{cp.stdout[-4000:]}\n{cp.stderr[-4000:]}"
    return json.loads((out / "gpu_check.json").read_text()), out, cp.stdout


def test_the_json_interface(check: tuple[dict[str, Any], Path, str]) -> None:
    r, _, _ = check
    assert set(TOP_KEYS) <= set(r), sorted(set(TOP_KEYS) - set(r))
    assert r["device"].startswith("cpu") and r["torch"] and r["cuda"] is None and r["triton"] is None
    assert r["quick"] is True and r["sizes"]["llm"]["batches"] == r["sizes"]["llm"]["latency_batches"] == [1]
    runs = {(x["model"], x["strategy"], x["mode"]): x for x in r["runs"]}
    assert set(runs) == {("llm", "jit", "default"), ("llm", "jit", "reduce-overhead"), ("llm", "jit", "max-autotune"),
                         ("llm", "export", "default")}
    for x in r["runs"]:
        missing = set(RUN_KEYS) - set(x)
        assert not missing, (x["strategy"], x["mode"], sorted(missing))
        for k in ("eager_setup_s", "cold_setup_s", "warm_setup_s"):
            assert isinstance(x[k], float) and x[k] >= 0, (k, x[k])
        assert sorted(x["eager_ms"]) == sorted(x["compiled_ms"]) == ["1"]  # --quick: the CPU size's first batch
        assert all(v > 0 for v in (*x["eager_ms"].values(), *x["compiled_ms"].values()))
        assert x["key_factors"]["device"] == "cpu" and x["key_factors"]["gpu.arch"] is None
    # On CPU the modes that degrade to the default one share its boots, and say why.
    for mode in ("reduce-overhead", "max-autotune"):
        shared = runs[("llm", "jit", mode)]
        assert shared["shared_with"] == "jit/default" and shared["shared_why"]
        assert r["cpu_shared"][f"jit/{mode}"]["shared_with"] == "jit/default"
    assert "shared_with" not in runs[("llm", "jit", "default")] and "shared_with" not in runs[("llm", "export",
                                                                                                "default")]


def test_warm_boots_restore_everything_and_compile_nothing(check: tuple[dict[str, Any], Path, str]) -> None:
    r, _, _ = check
    for x in r["runs"]:
        what = (x["strategy"], x["mode"])
        assert x["warm_cache"] == "hit", (what, x["warm_cache_reason"])
        assert x["same_key_cold_warm"] and x["warm_bytes_downloaded"] > 0, what
        assert x["warm_fxgraph_misses"] == 0, what
        assert x["warm_autotune_runs"] == 0 and x["warm_runtime_autotunes"] == 0, what
        assert x["warm_triton_compiles"] == 0, what
        assert x["outputs_match_eager"] is True, what
        assert x["eager_fallback"] == "", what
        assert x["served"] == x["strategy"], what  # export really served export (no fallback to jit)
    jit = next(x for x in r["runs"] if x["strategy"] == "jit" and x["mode"] == "default")
    # 2 parts x 1 batch size (--quick), static shapes: 2 functions precompiled cold (the jit default), both loaded
    # warm, so Dynamo and the FX-graph cache have nothing to do
    assert jit["cold_precompiled_built"] == 2 and jit["warm_precompiled_loaded"] == 2, jit
    assert jit["warm_precompiled_fallback"] == "" and jit["warm_fxgraph_hits"] == 0


def test_table1_modes_at_each_batch(check: tuple[dict[str, Any], Path, str]) -> None:
    r, _, _ = check
    cells = {(c["batch"], c["mode"]) for c in r["table1"]}
    assert cells == {(b, m) for b in (1,) for m in ("eager", "compile-decode", "compile-prefill+decode")}
    for c in r["table1"]:
        assert c["same_tokens_as_eager"] is True and c["tokens"] == 3, c
        assert c["total_s"] >= c["warm_setup_s"] >= 0, c  # generation itself may round to 0.000 s


def test_a_foreign_gpu_entry_is_refused_naming_the_factor(check: tuple[dict[str, Any], Path, str]) -> None:
    f = check[0]["foreign_gpu"]
    assert f["status"] == "rejected", f
    assert "gpu.arch" in f["reason"] and "foreign" in f["reason"], f
    assert f["edited"]["gpu.arch"] == [None, "sm_90"]  # on CPU the factor is added
    assert f["files_placed"] == 0


def test_the_chart_and_the_progress_lines(check: tuple[dict[str, Any], Path, str]) -> None:
    r, out, stdout = check
    phases = [p["phase"] for p in r["phases"]]
    assert phases[:3] == ["llm/weights", "llm/eager", "llm/jit/default/cold"] and "foreign-gpu fault" in phases
    png = (out / "gpu_check.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    lines = stdout.splitlines()
    assert all(re.match(r"\[\d\d:\d\d:\d\d\] ", ln) for ln in lines), lines[:5]
    assert any("llm/jit/default/warm" in ln for ln in lines) and "gpu_check.json" in lines[-1]


def test_the_registry_refuses_a_duplicate_and_reports_a_missing_example() -> None:
    llm = MODELS["llm"]
    with pytest.raises(ValueError, match="registered already"):
        register(llm)
    ghost = CheckModel("ghost", "examples/ghost/check.py:CheckRunner", "GHOST_WEIGHTS", llm.make_weights,
                       {"gpu": Size("x", (1,), (1, 1)), "cpu": Size("x", (1,), (1, 1))})
    assert "not in this tree" in ghost.unavailable()
    assert llm.unavailable() == ""


def test_no_cuda_without_cpu_flag_is_a_clear_error(tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    cp = subprocess.run([sys.executable, "scripts/gpu_check", "--out", str(tmp_path)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
    assert cp.returncode == 2 and "--cpu" in cp.stderr


def test_a_skipped_run_keeps_every_key_and_the_chart_still_draws(tmp_path: Path) -> None:
    from compile_cache.tools.gpucheck import RUNS, _chart, _unmeasured

    row = _unmeasured(MODELS["llm"], RUNS[-1], skipped="budget: 12s left, a run needs about 90s")
    assert set(RUN_KEYS) <= set(row) and row["warm_cache"] is None and row["mode"] == "max-autotune"
    res = {"device": "cpu", "torch": "x", "triton": None, "cuda": None, "timestamp": "t", "runs": [row], "table1": []}
    _chart(tmp_path / "c.png", res)
    assert (tmp_path / "c.png").read_bytes().startswith(b"\x89PNG")


def test_diffusion_is_registered_for_the_gpu_and_named_on_cpu() -> None:
    from compile_cache.tools.gpucheck import default_models

    diffusion = MODELS["diffusion"]
    assert diffusion.needs == ("diffusers",) and diffusion.unavailable() == ""  # diffusers is a dev requirement
    assert default_models("gpu") == ["llm", "diffusion"]
    assert default_models("cpu") == ["llm"]  # its cold boots cost minutes here: `--cpu --models diffusion`
    assert diffusion.sizes["gpu"].batches == (1, 8) and diffusion.sizes["gpu"].table1_batches == ()


def test_a_model_is_skipped_whole_when_the_budget_is_spent(tmp_path: Path) -> None:
    import time

    from compile_cache.tools.gpucheck import RUNS, Check, _check_model

    c = Check(tmp_path, tmp_path, "gpu", time.monotonic() - 1)
    c.result = {"runs": []}
    _check_model(c, MODELS["diffusion"], RUNS, False)  # no weights made, no boot started
    assert [(r["model"], r["strategy"], r["mode"]) for r in c.result["runs"]] == [
        ("diffusion", r.strategy, r.mode) for r in RUNS]
    assert all(r["skipped"].startswith("budget") and r["warm_cache"] is None for r in c.result["runs"])
    assert not list(tmp_path.glob("weights-*"))


def test_the_diffusion_check_runner_batches_images_of_one_prompt(tmp_path: Path) -> None:
    """The batched denoiser on B images equals the served example's denoiser on each image alone (eager, tiny
    config), and the check runner declares both parts at every batch, with a dynamic batch dim for export."""
    weights = tmp_path / "w"
    subprocess.run([sys.executable, "examples/diffusion/model.py", "--config", "tiny", "--out", str(weights)],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    code = """
import os, sys, torch
sys.path.insert(0, "examples/diffusion")
from check import CheckRunner
r = CheckRunner()
parts = r.load()
assert sorted(parts) == ["decoder", "denoiser"], parts
for name, p in parts.items():
    assert [e.label.split()[0] for e in p.examples] == ["batch=1", "batch=2"], name
    assert p.export_spec.dynamic_dims[0][0].name == "batch" and p.export_spec.example_args[0].shape[0] == 2
lat, t, cond = parts["denoiser"].examples[1].args
assert lat.shape == (2, 4, 6, 6) and cond.shape[0] == 2
with torch.no_grad():
    got = parts["denoiser"].module(lat, t, cond)
    one = [r.pipe.denoiser(lat[i:i + 1], t, cond) for i in range(2)]
assert got.shape == lat.shape and torch.allclose(got, torch.cat(one), atol=1e-5), (got - torch.cat(one)).abs().max()
print("ok")
"""
    env = {**os.environ, "DIFFUSION_WEIGHTS_DIR": str(weights), "GPU_CHECK_BATCHES": "2,1", "GPU_CHECK_LATENT": "6",
           "GPU_CHECK_DEVICE": "cpu", "PYTHONPATH": str(ROOT)}
    cp = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert cp.returncode == 0 and cp.stdout.strip() == "ok", cp.stderr[-3000:]
