"""The diffusion example (examples/diffusion) booted in the real Cog runtime on the tests' TINY config, once per
session: a cold boot, then a warm one (a new container: fresh Inductor dir, the same local store), each serving
``REQUESTS``. Shared by tests/test_diffusion_example_runtime.py (the boots themselves) and
tests/test_diffusion_example.py (the packages the cold boot's export strategy built), so the two units are exported
once per session, not once per module.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from compile_cache.tools.cogrun import CogServer

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_DIR = ROOT / "examples" / "diffusion"
REF = f"{EXAMPLE_DIR / 'predict.py'}:Runner"
READY_S = 600.0
PIXEL_TOLERANCE = 1  # max |compiled - eager| per 8-bit channel value (examples/diffusion/README.md, "Tolerance")
REQUESTS = [{"prompt": "a red fox", "steps": 3, "seed": 7}, {"prompt": "a lighthouse at dusk", "steps": 2, "seed": 1}]


def example_model() -> ModuleType:
    """examples/diffusion/model.py, loaded by file under its own name (other examples have a model.py too)."""
    name = "diffusion_example_model"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLE_DIR / "model.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def diffusion_boots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """{"weights": dir, "cold"/"warm": {"resps", "logs" (setup logs), "metrics", "log", "inductor" (its cache dir)}}.
    The TINY weights are served through DIFFUSION_WEIGHTS_DIR; one cold boot (two small exports, ~40 s)."""
    m = example_model()
    d = tmp_path_factory.mktemp("diffusion-runtime")
    m.ensure_weights(m.TINY, d / "weights")  # what `python model.py --config tiny --out DIR` writes
    store = f"file://{d / 'store'}"
    out: dict[str, Any] = {"weights": d / "weights"}
    for name in ("cold", "warm"):
        root = d / name  # a new container: its own empty TORCHINDUCTOR_CACHE_DIR, the same store
        env = {"DIFFUSION_WEIGHTS_DIR": str(d / "weights"), "COMPILE_CACHE_URL": store,
               "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"), "COMPILE_CACHE_METRICS_FILE": str(root / "m.json"),
               "COMPILE_CACHE_LOG_FILE": str(root / "log.txt")}
        b: dict[str, Any] = {"inductor": root / "inductor", "resps": []}
        with CogServer.in_project(REF, env=env, log_path=root / "server.log") as srv:
            srv.wait_ready(READY_S)
            for inputs in REQUESTS:
                code, resp = srv.predict(inputs)
                assert code == 200 and resp["status"] == "succeeded", resp
                b["resps"].append(resp)
            b["logs"] = srv.wait_ready(30)["setup"]["logs"]
            assert srv.shutdown("post") == 0
        b["metrics"] = json.loads((root / "m.json").read_text())
        b["log"] = (root / "log.txt").read_text()
        out[name] = b
    return out
