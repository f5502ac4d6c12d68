"""The LLM example's model code (examples/llm/model.py) on a tiny config: the prefill/decode parts generate the same
greedy tokens as transformers' own ``generate``, and compiled (torch.compile) they generate the same tokens as
eager, with one graph per prefill bucket and one decode graph for every step. One cold compile (~60 s)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.conftest import ROOT

LLM = ROOT / "examples" / "llm"


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


M = _load("llm_example_model", LLM / "model.py")
BOUNDS = M.Bounds(max_prompt=32, max_new=16, buckets=(8, 16, 32))
PROMPTS = ["Hello, world", "Compile once!"]  # 13 and 14 tokens with BOS: both in bucket 16


@pytest.fixture(scope="module")
def lm():  # type: ignore[no-untyped-def]
    return M.random_model(M.tiny_config(), seed=0)


def _eager(lm, prompt: str, n: int = BOUNDS.max_new, **kw) -> list[int]:  # type: ignore[no-untyped-def]
    ids = M.ByteTokenizer().encode(prompt)
    return M.greedy(M.Prefill(lm), M.Decode(lm), ids, n, lm.config, BOUNDS, stop_at_eos=False, **kw)


def test_parts_generate_what_transformers_generates(lm) -> None:  # type: ignore[no-untyped-def]
    for prompt in PROMPTS + ["x"]:
        ids = M.ByteTokenizer().encode(prompt)
        with torch.no_grad():
            out = lm.generate(torch.tensor([ids]), max_new_tokens=BOUNDS.max_new, min_new_tokens=BOUNDS.max_new,
                              do_sample=False, eos_token_id=None, pad_token_id=M.PAD)
        ref = out[0, len(ids):].tolist()
        assert _eager(lm, prompt) == ref  # padded to the prompt's bucket
        assert _eager(lm, prompt, bucketed=False) == ref  # exactly the prompt's length
    assert len(set(_eager(lm, PROMPTS[0]))) > 1  # not one token repeated: the comparison has teeth


def test_compiled_parts_generate_the_eager_tokens(lm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    counters.clear()
    prefill = torch.compile(M.Prefill(lm), dynamic=False)
    decode = torch.compile(M.Decode(lm), dynamic=False)
    tok = M.ByteTokenizer()
    for prompt in PROMPTS:
        got = M.greedy(prefill, decode, tok.encode(prompt), BOUNDS.max_new, lm.config, BOUNDS, stop_at_eos=False)
        assert got == _eager(lm, prompt), prompt
    # one prefill graph (both prompts pad to bucket 16) and one decode graph for all 2 x 15 steps
    assert counters["stats"]["unique_graphs"] == 2
    assert counters["inductor"]["fxgraph_cache_miss"] == 2


def test_bounds_and_tokenizer() -> None:
    tok = M.ByteTokenizer()
    ids = tok.encode("héllo")
    assert ids[0] == M.BOS and tok.decode(ids + [M.EOS, M.PAD]) == "héllo"
    assert BOUNDS.max_len == 48 and BOUNDS.bucket(1) == 8 and BOUNDS.bucket(9) == 16 and BOUNDS.bucket(32) == 32
    with pytest.raises(ValueError, match="1 to 32"):
        BOUNDS.bucket(33)
    with pytest.raises(ValueError, match="end at max_prompt"):
        M.Bounds(max_prompt=32, buckets=(8, 16))
    ids, length = M.prefill_inputs([M.BOS, 7, 8], BOUNDS, bucketed=True)
    assert ids.shape == (1, 8) and ids[0, 3:].eq(M.PAD).all() and length.tolist() == [3]
    assert M.prefill_inputs([M.BOS], BOUNDS, bucketed=False)[0].shape == (1, 2)
    with pytest.raises(ValueError, match="max_new_tokens is 17"):
        M.greedy(None, None, [M.BOS], 17, M.tiny_config(), BOUNDS)


def test_make_weights_writes_what_load_model_reads(lm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "weights"
    cp = subprocess.run([sys.executable, str(LLM / "make_weights.py"), "--config", "tiny", "--out", str(out)],
                        capture_output=True, text=True, timeout=300)
    assert cp.returncode == 0, cp.stderr[-2000:]
    assert (out / "model.safetensors").stat().st_size > 0
    loaded = M.load_model(out)
    for (n, a), (m, b) in zip(lm.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert n == m and torch.equal(a, b), n  # same seed, same bytes
    with pytest.raises(FileNotFoundError, match="make_weights.py"):
        M.load_model(tmp_path / "nothing")


def _python(code: str, cwd: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "LLM_WEIGHTS_DIR"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.Popen([sys.executable, "-c", code], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(p: subprocess.Popen[str]) -> str:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    return out


def test_load_makes_the_weights_make_weights_makes(tmp_path: Path) -> None:
    """From a fresh clone ``weights/`` is missing: the Runner's load() makes it, byte for byte what make_weights.py
    writes (so the cache key, which hashes the weights dir, is the same either way), and a second load() reuses it."""
    from compile_cache.versions import weights_digest

    ex = tmp_path / "llm"
    shutil.copytree(LLM, ex, ignore=shutil.ignore_patterns("weights", ".cache", "__pycache__"))
    assert not (ex / "weights").exists()
    boot = ("from compile_cache.predictors import load_predictor\n"
            "r = load_predictor('predict.py:Runner')\n"
            "print(sorted(r.load()))\n")
    booting = _python(boot, ex)
    making = _python(f"import runpy, sys; sys.argv = ['make_weights.py', '--out', {str(tmp_path / 'made')!r}]; "
                     f"runpy.run_path({str(LLM / 'make_weights.py')!r}, run_name='__main__')", tmp_path)
    assert _finish(booting).strip() == "['decode', 'prefill']"
    _finish(making)
    made, booted = tmp_path / "made", ex / "weights"
    assert {"config.json", "model.safetensors"} <= {f.name for f in booted.iterdir()}
    assert not list(booted.glob(".incomplete-*"))
    assert weights_digest(booted, values=True) == weights_digest(made, values=True)  # every byte, config.json too
    before = {f.name: f.stat().st_mtime_ns for f in booted.iterdir()}
    assert _finish(_python(boot, ex)).strip() == "['decode', 'prefill']"
    assert {f.name: f.stat().st_mtime_ns for f in booted.iterdir()} == before  # reused, not written again


def test_weights_are_made_once_by_processes_booting_at_once(tmp_path: Path) -> None:
    code = f"import sys; sys.path.insert(0, {str(LLM)!r}); from model import ensure_weights; " \
           f"print(ensure_weights({str(tmp_path / 'w')!r}, 'tiny'))"
    procs = [_python(code, tmp_path) for _ in range(3)]
    made = [_finish(p).strip() for p in procs]
    assert sorted(made) == ["False", "False", "True"]  # one wrote them; the others found them
    assert not list((tmp_path / "w").glob(".incomplete-*"))
    assert M.load_model(tmp_path / "w").config.num_hidden_layers == M.tiny_config().num_hidden_layers


def test_served_parts_keep_the_kv_cache_writes(lm) -> None:  # type: ignore[no-untyped-def]
    """The parts as the framework serves them uncompiled (COMPILE_CACHE_COMPILE=0, or a part left eager): its wrapper
    copies inference-tensor inputs to ordinary ones, so a cache made inside greedy's inference mode would be copied
    and the parts' writes lost (the text then differs from eager's). greedy makes the cache outside inference mode."""
    from compile_cache import CompileConfig
    from compile_cache.compiler import CompiledModel

    off = CompileConfig(enable=False)
    prefill = CompiledModel(M.Prefill(lm), M.Prefill(lm), off, name="prefill")
    decode = CompiledModel(M.Decode(lm), M.Decode(lm), off, name="decode")
    ids = M.ByteTokenizer().encode(PROMPTS[0])
    got = M.greedy(prefill, decode, ids, BOUNDS.max_new, lm.config, BOUNDS, stop_at_eos=False)
    assert got == _eager(lm, PROMPTS[0])


def test_greedy_batch_rows_are_each_prompts_greedy(lm) -> None:  # type: ignore[no-untyped-def]
    tok = M.ByteTokenizer()
    prompts = [tok.encode(p) for p in ("Hello, world", "Goodbye, all", "Hello, world")]  # one length: 13 tokens
    rows = M.greedy_batch(M.Prefill(lm), M.Decode(lm), prompts, BOUNDS.max_new, lm.config, BOUNDS, bucketed=False,
                          stop_at_eos=False)
    assert rows == [_eager(lm, p, bucketed=False) for p in ("Hello, world", "Goodbye, all", "Hello, world")]
    assert rows[0] != rows[1]  # the rows are not one prompt's tokens repeated
    with pytest.raises(ValueError, match="one length"):
        M.greedy_batch(M.Prefill(lm), M.Decode(lm), [prompts[0], tok.encode("x")], 4, lm.config, BOUNDS)


@pytest.mark.parametrize("batch", [1, 4])
def test_part_examples_are_tensors_of_their_own(batch: int) -> None:
    """Warm-up inputs must not be views: Dynamo guards on a view's base, and a graph warmed up on one is missed by
    every request (at batch 1, ``expand(...).contiguous()`` returned a view and prefill was served eager)."""
    cfg = M.tiny_config()
    pre, dec = M.part_examples(cfg, BOUNDS, 13, batch)
    assert [tuple(t.shape[:2]) for t in pre[:2]] == [(batch, 13), (batch,)] and pre[1].tolist() == [13] * batch
    assert dec[0].shape == (batch, 1) and dec[1].tolist() == [13]
    for t in (*pre, *dec):
        assert t._base is None and t.is_contiguous() and not t.is_inference()
    assert pre[2].shape == (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, BOUNDS.max_len, 16)
