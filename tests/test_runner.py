"""The runner API in the real Cog runtime (coglet), on tiny models: Cog's current API boots without deprecation
warnings and the old one still boots; a two-part runner (export + jit) boots cold then warm in a new container with
per-part metrics; a part whose compile fails falls back alone; a shape nobody declared is served eager or fails the
prediction, per ``on_new_shape``; concurrent predictions each get their own request-path compile count.

Each server runs in its own directory: the repo's .cog/openapi_schema.json is the example's (input "text"), and the
runtime would strip the tiny runners' inputs."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from compile_cache.tools.cogrun import CogServer
from tests.conftest import ROOT, boot, precompiled
from tests.tiny_parts import eager as parts_eager
from tests.tiny_predictor import BATCHES, close
from tests.tiny_predictor import eager as mlp_eager

READY_S = 600.0
TINY = str(ROOT / "tests" / "tiny_predictor.py")
PARTS = str(ROOT / "tests" / "tiny_parts.py")


def server(ref: str, root: Path, **env: str) -> CogServer:
    root.mkdir(parents=True, exist_ok=True)
    full = {"PYTHONPATH": str(ROOT), "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"),
            "COMPILE_CACHE_METRICS_FILE": str(root / "metrics.json"), **env}
    return CogServer(ref, cwd=root, env=full, log_path=root / "server.log")


def ok(srv: CogServer, **inputs: Any) -> dict[str, Any]:
    code, resp = srv.predict(inputs)
    assert code == 200 and resp["status"] == "succeeded", resp
    return resp


def metrics(root: Path) -> dict[str, Any]:
    return json.loads((root / "metrics.json").read_text())


# -- Cog's API: run() boots without deprecation warnings; predict() still boots ------------------------------------
@pytest.mark.parametrize(("ref", "deprecated"), [(f"{TINY}:Runner", False), (f"{TINY}:Predictor", True)],
                         ids=["Runner-run", "Predictor-predict"])
def test_runner_api_and_the_old_predictor_api_boot(ref: str, deprecated: bool, tmp_path: Path) -> None:
    with server(ref, tmp_path, COMPILE_CACHE_DISABLE="1", COMPILE_CACHE_COMPILE="0") as srv:
        srv.wait_ready(READY_S)
        resp = ok(srv, batch=2)
        logs = srv.wait_ready(30)["setup"]["logs"]
        srv.shutdown("post")
    assert close(resp["output"], mlp_eager(2))
    assert "compile_cache setup timeline" in logs
    # Cog's loader warns about BasePredictor and predict(); the check sees them for the old API, so their absence
    # for the new one means something.
    assert ("DeprecationWarning" in logs) is deprecated, logs


# -- two parts: export + jit, cold then warm -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("parts")
    store = f"file://{d / 'store'}"
    out: dict[str, Any] = {}
    for boot_name, batches in (("cold", (1, 7)), ("warm", (4, 7))):
        root = d / boot_name  # a new container: its own empty TORCHINDUCTOR_CACHE_DIR, the same store
        with server(f"{PARTS}:TwoParts", root, COMPILE_CACHE_URL=store) as srv:
            srv.wait_ready(READY_S)
            resps = [ok(srv, batch=n) for n in batches]
            logs = srv.wait_ready(30)["setup"]["logs"]
            assert srv.shutdown("post") == 0
        out[boot_name] = {"metrics": metrics(root), "resps": resps, "batches": batches, "logs": logs}
    return out


def test_two_parts_cold_boot_compiles_each_part_by_its_strategy(two_parts: dict[str, Any]) -> None:
    b = two_parts["cold"]
    m, parts = b["metrics"], b["metrics"]["parts"]
    assert m["cache"] == "miss" and m["strategy"] == "mixed"
    assert parts["encoder"]["strategy"] == "export" and parts["head"]["strategy"] == "jit"
    assert (parts["encoder"]["jit_restore"], parts["head"]["jit_restore"]) == ("", "precompile")  # the default
    assert parts["encoder"]["fxgraph_misses"] == 0  # torch.export + AOTInductor: no FX graph cache
    assert precompiled(m, "head")["built"] == len(BATCHES)  # jit: each warm-up shape precompiled
    # every existing key is the sum over the parts
    for k in ("fxgraph_hits", "fxgraph_misses", "request_path_compiles", "request_path_eager_calls"):
        assert m[k] == sum(p[k] for p in parts.values()), k
    assert m["bytes_uploaded"] > 0 and m["eager_fallback"] == ""
    assert "part encoder: export  " in b["logs"] and "part head: jit, jit_restore precompile  " in b["logs"]  # a line each
    for n, r in zip(b["batches"], b["resps"], strict=True):
        assert close(r["output"], parts_eager(n))


def test_two_parts_new_container_hits_the_store_for_every_part(two_parts: dict[str, Any]) -> None:
    b = two_parts["warm"]
    m, parts = b["metrics"], b["metrics"]["parts"]
    assert m["key"] == two_parts["cold"]["metrics"]["key"]
    assert m["cache"] == "hit" and m["bytes_uploaded"] == 0
    enc = [w for w in m["warmup"] if w["part"] == "encoder"]
    assert len(enc) == 1 and "package restored" in enc[0]["shape"]  # loaded, not rebuilt
    assert precompiled(m, "head") == {"loaded": len(BATCHES), "adopted": 0, "built": 0, "fallback": ""}
    assert m["compiles"] == 0 and m["fxgraph_misses"] == 0 and m["request_path_compiles"] == 0  # no Dynamo
    # batch 7: inside the encoder's export dims (compiled), undeclared for the head: served eager and counted there
    assert parts["encoder"]["request_path_eager_calls"] == 0 and parts["head"]["request_path_eager_calls"] == 1
    assert m["request_path_eager_calls"] == 1
    r4, r7 = b["resps"]
    assert "request_path_eager_calls" not in r4["metrics"] and r7["metrics"]["request_path_eager_calls"] == 1
    for n, r in zip(b["batches"], b["resps"], strict=True):
        assert close(r["output"], parts_eager(n))


def test_a_part_that_fails_to_compile_falls_back_alone(tmp_path: Path) -> None:
    b = boot("tests.tiny_parts:BrokenEncoder",
             {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "ind"), "COMPILE_CACHE_DISABLE": "1"},
             {"batch": 1}, {"batch": 4})
    parts = b.metrics["parts"]
    assert "compiled call raised" in parts["encoder"]["eager_fallback"]
    assert parts["head"]["eager_fallback"] == "" and precompiled(b.metrics, "head")["built"] == len(BATCHES)
    assert b.metrics["eager_fallback"].startswith("encoder: ")
    assert "part 'encoder': serving EAGER" in b.stderr
    for n, out in zip((1, 4), b.outputs, strict=True):
        assert close(out, parts_eager(n))


# -- on_new_shape --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_inductor(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ONE cold compile of the tiny runner's warm-up shapes, in the runtime; tests copy the Inductor dir."""
    root = tmp_path_factory.mktemp("tiny-cold")
    with server(f"{TINY}:Runner", root, COMPILE_CACHE_DISABLE="1") as srv:
        srv.wait_ready(READY_S)
        assert srv.shutdown("post") == 0
    assert precompiled(metrics(root))["built"] == len(BATCHES)
    return root / "inductor"


def test_undeclared_shape_under_eager_is_served_uncompiled(tiny_inductor: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_inductor, tmp_path / "inductor")
    with server(f"{TINY}:Runner", tmp_path, COMPILE_CACHE_URL=str(tmp_path / "store"),
                COMPILE_CACHE_ON_NEW_SHAPE="eager") as srv:
        srv.wait_ready(READY_S)
        first, again, declared = ok(srv, batch=7), ok(srv, batch=7), ok(srv, batch=4)
        assert srv.shutdown("post") == 0
    assert close(first["output"], mlp_eager(7)) and close(again["output"], mlp_eager(7))
    assert close(declared["output"], mlp_eager(4))
    assert first["metrics"]["request_path_eager_calls"] == 1 and "request_path_compiles" not in first["metrics"]
    assert "request_path_eager_calls" not in declared["metrics"]
    m = metrics(tmp_path)  # rewritten by the exit flush
    assert m["request_path_compiles"] == 0 and m["request_path_eager_calls"] == 2
    assert m["parts"]["model"]["request_path_eager_calls"] == 2
    log = (tmp_path / "inductor" / "compile_cache" / "log.txt").read_text()
    assert log.count("input (7x16) was declared nowhere") == 1  # logged once per shape


def test_undeclared_shape_under_error_fails_the_prediction_and_the_worker_serves_on(tiny_inductor: Path,
                                                                                     tmp_path: Path) -> None:
    shutil.copytree(tiny_inductor, tmp_path / "inductor")
    with server(f"{TINY}:Runner", tmp_path, COMPILE_CACHE_URL=str(tmp_path / "store"),
                COMPILE_CACHE_ON_NEW_SHAPE="error") as srv:
        srv.wait_ready(READY_S)
        code, failed = srv.predict({"batch": 7})
        after = ok(srv, batch=4)  # the worker lives and still serves
        assert srv.shutdown("post") == 0
    assert failed["status"] == "failed", failed
    assert "NewShapeError" in failed["error"] or "on_new_shape='error'" in failed["error"], failed["error"]
    assert "(7x16)" in failed["error"]
    assert close(after["output"], mlp_eager(4))
    m = metrics(tmp_path)
    assert m["request_path_compiles"] == 0 and m["request_path_eager_calls"] == 1


# -- concurrency: an async run() with COG_MAX_CONCURRENCY > 1 ----------------------------------------------------------
@pytest.mark.parametrize("restore", ["precompile", "dir"])
def test_concurrent_predictions_are_correct_and_each_counts_its_own_compiles(restore: str, tiny_inductor: Path,
                                                                              tmp_path: Path) -> None:
    """Four slots. Two predictions each bring an undeclared batch (compiled on the request path:
    on_new_shape=compile) while others call the model on declared batches in a loop, each in its own thread; the
    metrics file's request_path_compiles is the sum of the predictions'.

    Under the default restore, a new shape is precompiled under the part's lock: each new batch is built once, by
    the prediction that brought it (and saved for the next boot), and declared batches compile nothing.

    Under jit_restore="dir" (set here: only the jit function recompiles in Dynamo), each prediction's
    request_path_compiles must equal the recompiles Dynamo itself logged in that prediction's logs
    (TORCH_LOGS=recompiles; coglet routes a thread's output to its prediction). Measured here on torch 2.13: a
    declared batch can recompile too while another thread compiles (Dynamo logs "runtime guards failed even though
    they passed during recompilation-reason analysis"); such a compile is charged to the prediction whose call made
    it, and to no other."""
    shutil.copytree(tiny_inductor, tmp_path / "inductor")
    results: dict[str, Any] = {}
    env = {} if restore == "precompile" else {"COMPILE_CACHE_JIT_RESTORE": "dir"}
    with server(f"{PARTS}:ConcurrentRunner", tmp_path, COMPILE_CACHE_URL=str(tmp_path / "store"),
                COMPILE_CACHE_ON_NEW_SHAPE="compile", COG_MAX_CONCURRENCY="4", TORCH_LOGS="recompiles", **env) as srv:
        srv.wait_ready(READY_S)
        jobs = {"new-7": {"batch": 7, "calls": 1}, "declared-1": {"batch": 1, "calls": 5000},
                "declared-4": {"batch": 4, "calls": 5000}, "new-9": {"batch": 9, "calls": 1}}

        def go(name: str, inputs: dict[str, Any]) -> None:
            results[name] = srv.predict(inputs, timeout=300)

        threads = [threading.Thread(target=go, args=item) for item in jobs.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert srv.shutdown("post") == 0
    counted = {}
    for name, inputs in jobs.items():
        code, resp = results[name]
        assert code == 200 and resp["status"] == "succeeded", (name, resp)
        assert close(resp["output"], mlp_eager(inputs["batch"])), name
        counted[name] = resp["metrics"].get("request_path_compiles", 0)
        if restore == "dir":
            assert counted[name] == resp["logs"].count("Recompiling function"), (name, counted, resp["logs"])
    m = metrics(tmp_path)
    assert m["request_path_compiles"] == sum(counted.values()) and m["request_path_eager_calls"] == 0
    if restore == "dir":
        assert counted["new-7"] >= 1 and counted["new-9"] >= 1, counted
        return
    assert counted == {"new-7": 1, "declared-1": 0, "declared-4": 0, "new-9": 1}, counted
    saved = tmp_path / "inductor" / "precompile" / m["key"]
    assert [len(list(saved.glob(f"*{n}x16*.bin"))) for n in (7, 9)] == [1, 1]  # built once each, kept


def test_a_sequential_model_serves_its_declared_shapes_compiled(tmp_path: Path) -> None:
    """After setup the jit function runs in Dynamo's run-only mode; for an nn.Sequential that once ran every
    request eager and reported each as a shape nobody declared. Under the precompile default: its loaded function
    fails its own guards (torch 2.13), so the round trip refuses it and the jit function serves."""
    b = boot("tests.tiny_predictor:SequentialPredictor",
             {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "ind"), "COMPILE_CACHE_DISABLE": "1"},
             *({"batch": n} for n in BATCHES))
    pc = precompiled(b.metrics)
    assert pc["built"] == 0 and "GuardManager check failed" in pc["fallback"], pc
    assert b.metrics["compiles"] >= len(BATCHES) and b.metrics["eager_fallback"] == ""
    assert b.metrics["request_path_eager_calls"] == 0 and b.request_path_compiles == 0
    assert "declared nowhere" not in b.stderr
