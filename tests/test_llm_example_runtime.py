"""The LLM example (examples/llm) in the real Cog runtime, on a tiny config: ``scripts/predict``'s way of running
it (CogServer.in_project: cwd the example's dir, its own input schema) boots cold, then warm in a new container
(fresh Inductor dir, the same local store) with both parts' export packages restored and none built, and generates
the text eager greedy generation does. A prompt over the bound fails its prediction only. One cold boot (two
exports, ~60 s)."""

from __future__ import annotations

import importlib.util
import json
import sys
from types import ModuleType
from typing import Any

import pytest

from compile_cache.tools.cogrun import CogServer
from tests.conftest import ROOT

LLM = ROOT / "examples" / "llm"
REF = f"{LLM / 'predict.py'}:Runner"
READY_S = 600.0
PROMPTS = ["Once upon a time", "Hello, world"]
NEW = 12
LONGEST = "a" * 255  # 256 tokens with BOS: the prompt bound (predict.BOUNDS.max_prompt)


def _model() -> ModuleType:
    spec = importlib.util.spec_from_file_location("llm_example_model", LLM / "model.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


M = _model()
BOUNDS = M.Bounds(max_prompt=256, max_new=128)  # the Runner's (examples/llm/predict.py)


def eager_text(lm: Any, prompt: str, n: int) -> str:
    """What the Runner's run() returns, computed with the uncompiled parts."""
    tok = M.ByteTokenizer()
    return tok.decode(M.greedy(M.Prefill(lm), M.Decode(lm), tok.encode(prompt), n, lm.config, BOUNDS, bucketed=False))


def ok(srv: CogServer, **inputs: Any) -> dict[str, Any]:
    code, resp = srv.predict(inputs)
    assert code == 200 and resp["status"] == "succeeded", resp
    return resp


@pytest.fixture(scope="module")
def boots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("llm-runtime")
    lm = M.random_model(M.tiny_config(), seed=0)  # what make_weights.py --config tiny writes
    lm.save_pretrained(d / "weights", safe_serialization=True)
    store = f"file://{d / 'store'}"
    out: dict[str, Any] = {"lm": lm}
    for name in ("cold", "warm"):
        root = d / name  # a new container: its own empty TORCHINDUCTOR_CACHE_DIR, the same store
        env = {"LLM_WEIGHTS_DIR": str(d / "weights"), "COMPILE_CACHE_URL": store,
               "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"), "COMPILE_CACHE_METRICS_FILE": str(root / "m.json"),
               "COMPILE_CACHE_LOG_FILE": str(root / "log.txt")}
        b: dict[str, Any] = {}
        with CogServer.in_project(REF, env=env, log_path=root / "server.log") as srv:
            srv.wait_ready(READY_S)
            b["resps"] = [ok(srv, prompt=p, max_new_tokens=NEW) for p in PROMPTS]
            if name == "warm":
                b["schema"] = srv.openapi()
                b["invalid"] = srv.predict({"prompt": "x", "max_new_tokens": 0})
                b["too_long"] = srv.predict({"prompt": LONGEST + "b", "max_new_tokens": NEW})
                b["longest"] = ok(srv, prompt=LONGEST, max_new_tokens=4)  # still serving, at the bound
            b["logs"] = srv.wait_ready(30)["setup"]["logs"]
            assert srv.shutdown("post") == 0
        b["metrics"] = json.loads((root / "m.json").read_text())
        b["log"] = (root / "log.txt").read_text()
        b["server_log"] = (root / "server.log").read_text()
        out[name] = b
    return out


def test_the_runtime_runs_the_example_in_its_dir_with_its_schema(boots: dict[str, Any]) -> None:
    b = boots["warm"]
    assert "Loaded OpenAPI schema from .cog/openapi_schema.json" in b["server_log"]
    inputs = b["schema"]["components"]["schemas"]["Input"]["properties"]
    assert set(inputs) == {"prompt", "max_new_tokens"}  # the example's, not the repository root's ("text")
    code, body = b["invalid"]
    assert code == 422 and body["detail"][0]["loc"] == ["body", "input", "max_new_tokens"], body
    # the default store is relative to the project dir; here COMPILE_CACHE_URL names one, absolute
    assert b["metrics"]["store"].endswith("/store")


def test_cold_boot_builds_both_export_packages(boots: dict[str, Any]) -> None:
    m = boots["cold"]["metrics"]
    assert m["cache"] == "miss" and m["eager_fallback"] == ""
    assert {n: p["strategy"] for n, p in m["parts"].items()} == {"prefill": "export", "decode": "export"}
    assert sorted(w["part"] for w in m["warmup"] if "package built" in w["shape"]) == ["decode", "prefill"]
    assert boots["cold"]["log"].count("export: built") == 2
    assert m["bytes_uploaded"] > 0 and m["upload_state"] == "done"


def test_warm_boot_restores_both_packages_and_exports_nothing(boots: dict[str, Any]) -> None:
    cold, warm = boots["cold"]["metrics"], boots["warm"]["metrics"]
    assert warm["key"] == cold["key"] and warm["cache"] == "hit", warm["cache_reason"]
    assert {n: p["strategy"] for n, p in warm["parts"].items()} == {"prefill": "export", "decode": "export"}
    assert sorted(w["part"] for w in warm["warmup"] if "package restored" in w["shape"]) == ["decode", "prefill"]
    assert not [w for w in warm["warmup"] if "package built" in w["shape"]]
    assert "export: built" not in boots["warm"]["log"]  # 0 export attempts: every build logs that line
    assert warm["compiles"] == 0 and warm["fxgraph_misses"] == 0 and warm["request_path_compiles"] == 0
    assert warm["bytes_uploaded"] == 0 and warm["eager_fallback"] == ""
    assert "part prefill: export" in boots["warm"]["logs"] and "part decode: export" in boots["warm"]["logs"]


@pytest.mark.parametrize("name", ["cold", "warm"])
def test_generated_text_equals_eager_greedy_generation(boots: dict[str, Any], name: str) -> None:
    got = [r["output"] for r in boots[name]["resps"]]
    want = [eager_text(boots["lm"], p, NEW) for p in PROMPTS]
    assert got == want
    assert got[0] != got[1]  # the prompt reached the model: inputs are not dropped


def test_a_prompt_over_the_bound_fails_only_its_prediction(boots: dict[str, Any]) -> None:
    b = boots["warm"]
    code, resp = b["too_long"]
    assert code == 200 and resp["status"] == "failed", resp
    assert "this model takes at most 255" in resp["error"]
    assert b["longest"]["output"] == eager_text(boots["lm"], LONGEST, 4)  # the next one, at the bound, is served
    assert b["metrics"]["request_path_compiles"] == 0 and b["metrics"]["request_path_eager_calls"] == 0
