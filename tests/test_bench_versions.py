"""The versions benchmark's parts that need no compile: the weights-only version's perturbation, the copies of the
example, the result's interface keys. (`make bench-versions` itself runs for minutes: measured, not tested.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from compile_cache.tools import bench_versions as bv
from compile_cache.versions import weights_digest
from tests.conftest import ROOT


def test_perturbation_changes_every_float_value_and_keeps_the_structure(tmp_path: Path) -> None:
    src = tmp_path / "w"
    (src / "sub").mkdir(parents=True)
    save_file({"a": torch.randn(8, 4), "b": torch.ones(3, dtype=torch.float16), "ids": torch.arange(5)},
              str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "sub" / "config.json").write_text("{}")
    assert bv.perturb_weights(src, tmp_path / "w2") == 2
    bv.perturb_weights(src, tmp_path / "w3")
    before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "w2" / "model.safetensors")
    assert (before["a"] != after["a"]).all() and (before["b"] != after["b"]).all()
    assert torch.equal(before["ids"], after["ids"])  # not a float tensor
    assert torch.equal(after["a"], load_file(tmp_path / "w3" / "model.safetensors")["a"])  # deterministic
    assert (tmp_path / "w2" / "sub" / "config.json").read_text() == "{}"
    assert weights_digest(src, values=False).split(":")[1] == weights_digest(tmp_path / "w2", values=False).split(
        ":")[1]  # the key sees the same structure


def test_the_examples_copies_change_what_they_say(tmp_path: Path) -> None:
    code = bv._copy_with(f"{ROOT}/predict.py:Runner", tmp_path / "v3", *bv.POSTPROCESS, "code-only")
    model = bv._copy_with(f"{ROOT}/predict.py:Runner", tmp_path / "v4", *bv.MODEL_CHANGE, "model-change")
    assert code == f"{tmp_path}/v3/predict.py:Runner" and model.endswith("/v4/predict.py:Runner")
    assert bv.POSTPROCESS[1] in (tmp_path / "v3" / "predict.py").read_text()
    assert bv.MODEL_CHANGE[1] in (tmp_path / "v4" / "predict.py").read_text()
    assert (tmp_path / "v3" / "requirements.txt").read_bytes() == (ROOT / "requirements.txt").read_bytes()
    with pytest.raises(bv.BenchError, match="does not contain"):
        bv._copy_with(f"{ROOT}/tests/tiny_predictor.py:Predictor", tmp_path / "x", *bv.MODEL_CHANGE, "model-change")


def test_the_result_has_the_interface_keys(tmp_path: Path) -> None:
    def boot(total: float, cache: str, diff: float) -> dict:
        return {"max_abs_diff": diff, "metrics": {
            "total_s": total, "cache": cache, "seeded_from": "", "fxgraph_hits": 1, "fxgraph_misses": 0,
            "bytes_uploaded": 10, "strategy": "jit", "key": "k", "cache_reason": "", "restore_s": 0.1,
            "compile_s": 1.0, "bytes_downloaded": 5, "key_s": 0.01, "eager_fallback": "", "upload_state": "done"}}

    versions = [bv.Version("v1", "none", "p.py:P", tmp_path), bv.Version("v2", "weights", "p.py:P", tmp_path)]
    versions[0].result, versions[1].result = boot(50.0, "miss", 0.0), boot(14.0, "hit", 2e-4)
    r = bv.summarize("default", boot(10.0, "disabled", 0.0), versions, 123)
    assert set(bv.REQUIRED_KEYS) <= set(r) and r["cold_setup_s"] == 50.0 and r["store_bytes"] == 123
    v1, v2 = r["versions"]
    assert set(bv.VERSION_KEYS) <= set(v2)
    assert v1["overhead_removed"] == 0.0 and v2["overhead_removed"] == 0.9
    assert v1["outputs_match_eager"] and not v2["outputs_match_eager"]  # 2e-4 > 1e-4
    json.dumps(r)
