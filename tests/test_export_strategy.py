"""strategy=export through the lifecycle: build → store → a new container loads the package without Dynamo;
fallbacks to jit; inputs outside the dims get a clear error through the real Cog runtime."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from compile_cache.tools.cogrun import CogServer
from tests.conftest import ROOT, boot
from tests.tiny_predictor import EXPORT_MAX_BATCH, close, cnn_eager, eager

TARGET = "tests.tiny_predictor:Predictor"



@pytest.fixture(scope="module")
def export_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("export")
    b = boot(TARGET, {"TORCHINDUCTOR_CACHE_DIR": str(d / "ind"), "COMPILE_CACHE_URL": str(d / "store"),
                      "COMPILE_CACHE_STRATEGY": "export"}, {"batch": 2})
    assert b.metrics["strategy"] == "export" and b.metrics["cache"] == "miss"
    assert b.metrics["compiles"] == 0  # no Dynamo even on the cold boot: torch.export traced it
    assert close(b.outputs[0], eager(2))
    return d / "store"


UNEXPORTABLE = "tests.tiny_predictor:UnexportablePredictor"


@pytest.fixture(scope="module")
def failed_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One cold boot of a model torch.export refuses: (its dir with ind/ and store/, its metrics)."""
    d = tmp_path_factory.mktemp("failed-export")
    b = boot(UNEXPORTABLE, {"TORCHINDUCTOR_CACHE_DIR": str(d / "ind"), "COMPILE_CACHE_URL": str(d / "store"),
                            "COMPILE_CACHE_STRATEGY": "export", "COMPILE_CACHE_JIT_RESTORE": "precompile"}, {"batch": 4})
    assert "export FAILED" in b.stderr and "falling back to the jit strategy" in b.stderr
    assert b.export_attempts == 1
    assert b.metrics["strategy"] == "jit" and b.metrics["compiles"] >= 1
    # jit_restore is the jit strategy's own setting, not its fallback's: the fallback restores the dir alone
    assert (b.metrics["parts"]["model"]["strategy"], b.metrics["parts"]["model"]["jit_restore"]) == ("jit", "dir")
    assert close(b.outputs[0], eager(4))
    return d, b.metrics


def test_export_failure_falls_back_to_jit_and_is_recorded(failed_export: tuple[Path, dict]) -> None:
    d, metrics = failed_export
    rec = json.loads((d / "ind" / "aoti" / f"{metrics['key']}.failed.json").read_text())
    assert rec["stage"] == "export" and "torch.export.export failed for DataDependent" in rec["reason"]
    assert metrics["upload_state"] == "done"


def test_a_warm_boot_skips_the_export_that_failed(failed_export: tuple[Path, dict], tmp_path: Path) -> None:
    d, cold = failed_export
    store = tmp_path / "store"
    shutil.copytree(d / "store", store)
    b = boot(UNEXPORTABLE, {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "fresh"), "COMPILE_CACHE_URL": str(store),
                            "COMPILE_CACHE_STRATEGY": "export"}, {"batch": 4})
    assert b.export_attempts == 0  # the record came back with the restore: no torch.export, no build
    assert "export skipped: it failed for this key before" in b.stderr and "export FAILED" not in b.stderr
    m = b.metrics
    assert m["key"] == cold["key"] and m["cache"] == "hit" and m["strategy"] == "jit"
    assert m["fxgraph_misses"] == 0 and m["bytes_uploaded"] == 0
    assert close(b.outputs[0], eager(4))


def test_a_changed_key_tries_the_export_again(failed_export: tuple[Path, dict], tmp_path: Path) -> None:
    d, cold = failed_export
    store, ind = tmp_path / "store", tmp_path / "ind"
    shutil.copytree(d / "store", store)
    shutil.copytree(d / "ind", ind)  # the old key's record is right here too: it is not this key's
    b = boot(UNEXPORTABLE, {"TORCHINDUCTOR_CACHE_DIR": str(ind), "COMPILE_CACHE_URL": str(store),
                            "COMPILE_CACHE_STRATEGY": "export", "COMPILE_CACHE_MODEL_VERSION": "tiny-2",
                            "COMPILE_CACHE_KEY_BY_VERSION": "1"},  # a version label is in the key only so
             {"batch": 4})
    assert b.metrics["key"] != cold["key"]
    assert b.export_attempts == 1 and "export FAILED" in b.stderr
    assert (ind / "aoti" / f"{b.metrics['key']}.failed.json").exists()
    assert close(b.outputs[0], eager(4))


def test_batchnorm_cnn_keeps_the_export_strategy(tmp_path: Path) -> None:
    """BatchNorm's unread num_batches_tracked no longer gets a weights-out package refused (and the boot onto jit)."""
    b = boot("tests.tiny_predictor:BatchNormPredictor",
             {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "ind"), "COMPILE_CACHE_URL": str(tmp_path / "store")},
             {"batch": 2}, {"batch": 9})
    assert b.metrics["strategy"] == "export" and b.metrics["eager_fallback"] == ""
    assert "baked into" not in b.stderr and "falling back" not in b.stderr
    assert b.metrics["compiles"] == 0 and b.request_path_compiles == 0  # no Dynamo: the package serves
    assert len(list((tmp_path / "ind" / "aoti").glob("*.pt2"))) == 1
    assert close(b.outputs[0], cnn_eager(2)) and close(b.outputs[1], cnn_eager(9))


def test_new_container_loads_the_package_without_dynamo_and_rejects_inputs_outside_the_dims(
        export_store: Path, tmp_path: Path) -> None:
    """One warm container in the real runtime: any batch inside the dims is served from the restored package
    without Dynamo; one outside them fails its prediction with a message naming the dim and range, and the server
    lives on."""
    store = tmp_path / "store"
    shutil.copytree(export_store, store)
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "ind"), "COMPILE_CACHE_URL": str(store),
           "COMPILE_CACHE_STRATEGY": "export", "PYTHONPATH": str(ROOT), "COMPILE_CACHE_ON_NEW_SHAPE": "error",
           "COMPILE_CACHE_METRICS_FILE": str(tmp_path / "m.json")}
    shapes = [1, 5, 17, EXPORT_MAX_BATCH]  # any batch inside the dims, none of them declared anywhere
    # A cwd without .cog/openapi_schema.json: the tiny predictor's inputs are not the example's.
    with CogServer(f"{ROOT}/tests/tiny_predictor.py:Predictor", cwd=tmp_path, env=env,
                   log_path=tmp_path / "server.log") as srv:
        srv.wait_ready(300)
        for n in shapes:
            code, resp = srv.predict({"batch": n})
            assert code == 200 and resp["status"] == "succeeded" and close(resp["output"], eager(n)), (n, resp)
            assert "request_path_compiles" not in resp.get("metrics", {}), (n, resp)
        code, resp = srv.predict({"batch": EXPORT_MAX_BATCH + 8})
        assert resp["status"] == "failed", resp
        assert "outside" in resp["error"] and str(EXPORT_MAX_BATCH) in resp["error"], resp["error"]
        code, resp = srv.predict({"batch": 3})  # the worker survived and still serves
        assert code == 200 and resp["status"] == "succeeded" and close(resp["output"], eager(3))
        srv.shutdown("post")
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["cache"] == "hit" and m["strategy"] == "export"
    assert m["compiles"] == 0 and m["request_path_compiles"] == 0
    assert m["bytes_uploaded"] == 0
    assert any(".pt2" in w["shape"] or "restored" in w["shape"] for w in m["warmup"])
