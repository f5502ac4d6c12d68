"""jit_restore="precompile" through the lifecycle: a cold boot precompiles each warm-up shape into the cache dir; a new
container restores the dir and serves from the precompiled functions without Dynamo; a damaged file, an undeclared
shape and a model with a graph break all still get correct answers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from compile_cache.config import CompileConfig, Settings
from tests.conftest import ROOT, boot
from tests.tiny_predictor import BATCHES, close, eager

TARGET = "tests.tiny_predictor:Predictor"
# "compile": the undeclared shape below is precompiled on the request path (the default would serve it eager)
ENV = {"COMPILE_CACHE_ON_NEW_SHAPE": "compile"}


def test_precompile_is_the_jit_default_and_shares_the_dir_entry() -> None:
    assert CompileConfig().jit_restore == "precompile"
    cfg = CompileConfig().with_overrides(Settings.from_env({"COMPILE_CACHE_JIT_RESTORE": "DIR"}))
    assert cfg.jit_restore == "dir"
    # one entry for both: the precompiled functions sit in the cache dir beside the kernels they need
    assert cfg.cache_factors() == CompileConfig().cache_factors()


@pytest.fixture(scope="module")
def precompile_store(tiny_seeded_store: Path) -> tuple[Path, str]:
    """The session's cold boot of the tiny predictor (``tiny_seeded_store``, the jit default): its store and key.
    ``on_new_shape`` changes no generated code, so that entry is this file's too."""
    (key_dir,) = (tiny_seeded_store.parent / "inductor" / "precompile").iterdir()
    files = list(key_dir.glob("*.bin"))
    assert len(files) == len(BATCHES)  # one precompiled function per warm-up shape
    return tiny_seeded_store, key_dir.name


def test_new_container_serves_without_dynamo(precompile_store: tuple[Path, str], tmp_path: Path) -> None:
    store, key = precompile_store
    shutil.copytree(store, tmp_path / "store")
    ind = tmp_path / "ind"
    # a damaged local file must not fail the boot: it is skipped with a warning
    (ind / "precompile" / key).mkdir(parents=True)
    (ind / "precompile" / key / "damaged.bin").write_bytes(b"not a precompiled function")
    b = boot(TARGET, {**ENV, "TORCHINDUCTOR_CACHE_DIR": str(ind), "COMPILE_CACHE_URL": str(tmp_path / "store")},
             *({"batch": n} for n in BATCHES), {"batch": 7})
    m = b.metrics
    assert m["cache"] == "hit" and m["key"] == key
    assert m["compiles"] == 0 and m["eager_fallback"] == ""  # warm-up: only precompiled functions, no tracing
    assert f"precompile: {len(BATCHES)} function(s) loaded" in b.stderr
    assert "cannot load damaged.bin" in b.stderr
    for n, out in zip((*BATCHES, 7), b.outputs, strict=True):
        assert close(out, eager(n))
    # batch 7 is outside the plan: precompiled on the request path (and counted), saved for the next boot
    assert b.request_path_compiles == 1 and "(7x16)" in b.stderr
    assert len(list((ind / "precompile" / key).glob("*7x16*.bin"))) == 1


def test_graph_break_serves_through_the_jit_function(tmp_path: Path) -> None:
    b = boot("tests.tiny_predictor:UnexportablePredictor",
             {**ENV, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "ind"), "COMPILE_CACHE_DISABLE": "1"}, {"batch": 4})
    assert "precompile FAILED" in b.stderr and b.metrics["eager_fallback"] == ""
    assert close(b.outputs[0], eager(4))


def test_a_function_that_does_not_round_trip_is_refused_and_remembered(tmp_path: Path) -> None:
    """Saved and loaded back, the function must give the eager output; this one cannot (random numbers). The part
    serves through the jit function, the failure is shipped in the entry, and the next boot does not try again."""
    env = {**ENV, "COMPILE_CACHE_URL": str(tmp_path / "store")}
    first = boot("tests.tiny_predictor:NoisyPredictor", {**env, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "i1")},
                 {"batch": 4})
    part = first.metrics["parts"]["model"]
    assert (part["strategy"], part["jit_restore"]) == ("jit", "precompile")  # one strategy, and its restore mode
    assert "part model: jit, jit_restore precompile  " in first.stderr
    pc = part["precompiled"]
    assert pc["built"] == 0 and "differs from eager" in pc["fallback"], pc
    assert first.metrics["eager_fallback"] == "" and first.metrics["compiles"] >= len(BATCHES)  # jit serves
    assert first.stderr.count("precompile FAILED") == 1
    second = boot("tests.tiny_predictor:NoisyPredictor", {**env, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "i2")},
                  {"batch": 4})
    pc = second.metrics["parts"]["model"]["precompiled"]
    assert second.metrics["cache"] == "hit" and "failed for this key before" in pc["fallback"], pc
    assert "precompile FAILED" not in second.stderr and pc["built"] == 0
    cp = subprocess.run([sys.executable, "-m", "compile_cache", "inspect", first.metrics["key"]], cwd=ROOT,
                        env={**os.environ, **env, "COMPILE_CACHE_PROGRESS": "0"}, capture_output=True, text=True,
                        timeout=120)
    line = next(ln for ln in cp.stdout.splitlines() if ln.startswith("precompile FAILED"))
    assert "RoundTripError" in line and "differs from eager" in line, cp.stdout
    assert second.metrics["fxgraph_misses"] == 0 and second.metrics["fxgraph_hits"] >= len(BATCHES)  # the dir


def test_a_function_whose_traced_source_changed_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What torch records of the traced code (each inlined function's lines and their sha256) is checked against
    the source as it reads now: a library or project module edited since the function was traced is caught, one
    edited elsewhere in the file (same lines) is not a change."""
    import importlib
    import linecache

    from torch._dynamo.package import SourceInfo

    from compile_cache.precompile import changed_source

    mod_file = tmp_path / "traced_mod.py"
    mod_file.write_text("def f(x):\n    return x + 1\n\n\nOTHER = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("traced_mod")
    info = SourceInfo(inlined_sources=set())
    info.add_code(mod.f.__code__)

    class Traced:  # what changed_source reads of an AOT-compiled function
        def source_info(self) -> SourceInfo:
            return info

    assert changed_source(Traced()) == ""
    mod_file.write_text("def f(x):\n    return x + 1\n\n\nOTHER = 2\n")  # elsewhere in the file
    linecache.checkcache(str(mod_file))
    assert changed_source(Traced()) == ""
    mod_file.write_text("def f(x):\n    return x + 2\n\n\nOTHER = 2\n")  # the traced function itself
    linecache.checkcache(str(mod_file))
    assert changed_source(Traced()) == "traced_mod lines 1-2"
    monkeypatch.delitem(sys.modules, "traced_mod")


def test_the_state_digest_sees_flags_configs_and_constants_but_not_where_weights_came_from(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a seed's function may have baked in besides code: a module's plain attributes (a config object's values
    too) and the plain globals of the modules it traced. The weights' directory is not part of it."""
    import importlib

    import torch
    from torch._dynamo.package import SourceInfo

    from compile_cache.precompile import state_digest

    (tmp_path / "baked_mod.py").write_text("LIMIT = 3\n\n\ndef f(x):\n    return x.clamp(max=LIMIT)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("baked_mod")
    info = SourceInfo(inlined_sources=set())
    info.add_code(mod.f.__code__)

    class Traced:
        def source_info(self) -> SourceInfo:
            return info

    class Config:
        def __init__(self, eps: float) -> None:
            self.eps, self._name_or_path = eps, "/weights/v1"

        def to_dict(self) -> dict:
            return dict(vars(self))

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)
            self.config, self.scale = Config(1e-5), 2.0

    base = state_digest(Net(), Traced())
    assert state_digest(Net(), Traced()) == base  # weights differ (random init): not part of it
    moved = Net()
    moved.config._name_or_path = "/weights/v2"
    assert state_digest(moved, Traced()) == base
    flag = Net()
    flag.lin.scale = 3.0
    assert state_digest(flag, Traced()) != base
    eps = Net()
    eps.config.eps = 1e-6
    assert state_digest(eps, Traced()) != base
    monkeypatch.setattr(mod, "LIMIT", 4)
    assert state_digest(Net(), Traced()) != base
    monkeypatch.delitem(sys.modules, "baked_mod")
