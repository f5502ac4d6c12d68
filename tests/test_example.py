"""The real example (all-MiniLM-L6-v2, real weights) in the real Cog runtime: cold boot, a prediction that ranks
sentences sensibly, graceful shutdown, store holds the entry; then a new container boots warm."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from compile_cache.manifest import Manifest
from compile_cache.tools.cogrun import CogServer
from tests.conftest import ROOT

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."]


def cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def boot_once(store: Path, inductor: Path, metrics: Path, text: str) -> tuple[dict, list, dict]:
    env = {
        "TORCHINDUCTOR_CACHE_DIR": str(inductor),
        "COMPILE_CACHE_URL": f"file://{store}",
        "COMPILE_CACHE_METRICS_FILE": str(metrics),
    }
    with CogServer("predict.py:Runner", cwd=ROOT, env=env, log_path=metrics.with_suffix(".log")) as srv:
        health = srv.wait_ready(900)
        code, resp = srv.predict({"text": text})
        assert code == 200, resp
        assert resp["status"] == "succeeded", resp
        # setup's last log lines may land after READY; the slot may still read BUSY for a moment after a response
        health = srv.wait_ready(30)
        assert srv.shutdown("post", timeout=30) == 0
    return health, resp["output"], json.loads(metrics.read_text())


@pytest.fixture(scope="module")
def cold_then_warm(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("example")
    store = d / "store"
    first = boot_once(store, d / "ind1", d / "m1.json", "\n".join(SENTENCES))
    manifests = list(store.glob("entries/*/manifest.json"))
    second = boot_once(store, d / "ind2", d / "m2.json", "hello world")
    return {"first": first, "second": second, "manifests": manifests, "store": store}


def test_cold_boot_predicts_sensible_embeddings(cold_then_warm: dict) -> None:
    health, out, metrics = cold_then_warm["first"]
    assert health["status"] == "READY"
    logs = health["setup"]["logs"]
    assert "compile_cache setup timeline" in logs and "part model: export" in logs
    assert "DeprecationWarning" not in logs, logs  # Cog's current API: a Runner with run()
    assert metrics["cache"] == "miss" and metrics["strategy"] == "export"  # the example's default strategy
    assert metrics["parts"]["model"]["strategy"] == "export" and metrics["parts"]["model"]["eager_fallback"] == ""
    assert metrics["bytes_uploaded"] > 0
    assert len(out) == 3 and all(len(v) == 384 for v in out)
    assert all(math.isclose(math.sqrt(cos(v, v)), 1.0, abs_tol=1e-4) for v in out)
    assert cos(out[0], out[1]) > cos(out[0], out[2]) + 0.2


def test_store_holds_the_entry_after_shutdown(cold_then_warm: dict) -> None:
    (mf,) = cold_then_warm["manifests"]
    m = Manifest.from_bytes(mf.read_bytes())
    assert m.files() and m.key == cold_then_warm["first"][2]["key"]
    for seg in m.segments:
        assert (cold_then_warm["store"] / seg.object).stat().st_size == seg.size


def test_new_container_boots_warm(cold_then_warm: dict) -> None:
    _, out, m2 = cold_then_warm["second"]
    m1 = cold_then_warm["first"][2]
    assert m2["key"] == m1["key"]
    assert m2["cache"] == "hit" and m2["strategy"] == "export", m2
    assert m2["compiles"] == 0 and m2["fxgraph_misses"] == 0, m2  # no Dynamo, nothing compiled
    assert any("package restored" in w["shape"] for w in m2["warmup"]), m2  # loaded, not rebuilt
    assert m2["bytes_uploaded"] == 0, m2
    assert len(out) == 1 and len(out[0]) == 384
