"""The vertical slice on the tiny model: cold boot → miss, new container → hit that loads every warm-up shape's
precompiled function (no Dynamo), eager fallback, and no compile on the request path over the declared shapes."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.conftest import boot, precompiled
from tests.tiny_predictor import BATCHES, close, eager

TARGET = "tests.tiny_predictor:Predictor"



def test_new_container_hits_the_store(tiny_seeded_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(tiny_seeded_store, store)
    metrics_file = tmp_path / "m.json"
    b = boot(
        TARGET,
        {
            "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "fresh-inductor"),
            "COMPILE_CACHE_URL": f"file://{store}",
            "COMPILE_CACHE_METRICS_FILE": str(metrics_file),
        },
        *({"batch": n} for n in BATCHES),
    )
    m = b.metrics
    assert m["cache"] == "hit"
    assert m["compiles"] == 0 and m["fxgraph_misses"] == 0  # no Dynamo, nothing compiled
    assert precompiled(m) == {"loaded": len(BATCHES), "adopted": 0, "built": 0, "fallback": ""}
    assert m["bytes_downloaded"] > 0 and m["files_restored"] > 0
    assert m["bytes_uploaded"] == 0  # nothing new compiled: nothing uploaded
    assert b.request_path_compiles == 0
    for n, out in zip(BATCHES, b.outputs, strict=False):
        assert close(out, eager(n))
    assert metrics_file.exists()
    for key in ("cache", "restore_s", "load_s", "compile_s", "total_s", "fxgraph_hits", "fxgraph_misses",
                "bytes_downloaded", "bytes_uploaded", "key"):
        assert key in m


def test_undeclared_shape_is_counted_on_the_request_path(tiny_seeded_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(tiny_seeded_store, store)
    b = boot(
        TARGET,
        {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "ind"), "COMPILE_CACHE_URL": str(store),
         "COMPILE_CACHE_ON_NEW_SHAPE": "compile"},
        {"batch": 1},
        {"batch": 7},  # not in the warm-up plan
    )
    assert b.request_path_compiles >= 1
    assert "add this shape to the warm-up plan" in b.stderr and "7x16" in b.stderr
    assert close(b.outputs[1], eager(7))


def test_compile_failure_serves_eager(tmp_path: Path) -> None:
    b = boot(
        TARGET,
        {
            "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "ind"),
            "COMPILE_CACHE_URL": str(tmp_path / "store"),
            "COMPILE_CACHE_BACKEND": "no_such_backend",
        },
        {"batch": 4},
    )
    assert "serving EAGER" in b.stderr
    assert b.metrics["eager_fallback"]
    assert close(b.outputs[0], eager(4))


def test_first_compiled_call_failure_serves_eager(tmp_path: Path) -> None:
    b = boot(
        TARGET,
        {
            "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "ind"),
            "COMPILE_CACHE_URL": str(tmp_path / "store"),
            "COMPILE_CACHE_BACKEND": "tiny_broken",
        },
        {"batch": 1},
    )
    assert "serving EAGER" in b.stderr and "compiled call raised" in b.metrics["eager_fallback"]
    assert close(b.outputs[0], eager(1))


def test_disabled_cache_still_compiles(tiny_seeded_store: Path, tmp_path: Path) -> None:
    """No store: the model is still served compiled, from what the Inductor dir holds (here the seed boot's, so
    that this boot costs no cold compile)."""
    shutil.copytree(tiny_seeded_store.parent / "inductor", tmp_path / "ind")
    b = boot(
        TARGET,
        {
            "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "ind"),
            "COMPILE_CACHE_URL": str(tmp_path / "store"),
            "COMPILE_CACHE_DISABLE": "1",
        },
        {"batch": 1},
    )
    assert b.metrics["cache"] == "disabled"
    assert not (tmp_path / "store").exists()
    assert b.metrics["eager_fallback"] == "" and precompiled(b.metrics)["loaded"] == len(BATCHES)
    assert close(b.outputs[0], eager(1))


def test_bad_setting_fails_the_boot_with_the_variable_name(tmp_path: Path) -> None:
    b = boot(
        TARGET,
        {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "ind"), "COMPILE_CACHE_URL": "ftp://nowhere"},
        check=False,
    )
    assert b.metrics == {}
    assert "COMPILE_CACHE_URL" in b.stderr and "s3://bucket" in b.stderr
