"""Request batching (compile_cache/batching.py): concurrent ``batched()`` calls joined into one model call, each caller
given its own rows, padded or split so that a compiled part only ever sees declared shapes.

Most tests drive a :class:`Batcher` directly with asyncio around the tiny model run eager (a compile is not their
point); one boots the tiny runner in the real Cog runtime, warm from the session's seeded store, with eight slots.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import json
import random
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from compile_cache import Batch, ConfigError
from compile_cache import batching as batching_mod
from compile_cache.batching import Batcher, Sizes, prediction_scopes
from compile_cache.tools.cogrun import CogServer
from tests.conftest import ROOT
from tests.tiny_predictor import FEATURES, TinyMLP, close, eager, inputs

# "Rows equal the unbatched call's" (docs/runner.md, Batching): within this tolerance
ATOL, RTOL = 1e-5, 1e-4


class Model:
    """The tiny MLP, eager, standing in for a served part: it records each call's input shape. ``compiled`` and
    ``strategy`` are what the batcher reads to decide how to pad (a CompiledModel's attributes)."""

    def __init__(self, *, compiled: bool = False, strategy: str = "jit", delay_s: float = 0.0) -> None:
        self.mlp = TinyMLP().eval()
        self.is_compiled, self.strategy, self.delay_s = compiled, strategy, delay_s
        self.shapes: list[tuple[int, ...]] = []
        self.seen: list[list[Any]] = []  # prediction_scopes() inside each call

    def __call__(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        self.seen.append(prediction_scopes())
        if (x < 0).any():
            raise ValueError("negative input")
        time.sleep(self.delay_s)
        with torch.no_grad():
            if x.shape[-1] == FEATURES:
                return self.mlp(x) * scale
            return x.sin().cumsum(-1) * scale  # any length: calls of other lengths go in other groups


def alone(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return Model()(x, scale)


def seq(batch: int, length: int) -> torch.Tensor:
    return torch.linspace(0, 1, batch * length).reshape(batch, length)


def wave(batcher: Batcher, calls: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> list[Any]:
    """All calls at once, as concurrent predictions; an exception is returned in its call's place."""
    async def go() -> list[Any]:
        return await asyncio.gather(*(batcher(*a, **k) for a, k in calls), return_exceptions=True)

    return asyncio.run(go())


def test_rows_equal_the_unbatched_outputs_with_several_shapes_in_one_wave() -> None:
    model = Model()
    b = Batcher("model", model, Batch(max_size=64, max_delay_ms=50), Sizes())
    calls = [((inputs(1),), {}), ((seq(2, 5),), {}), ((inputs(4),), {}), ((seq(3, 7),), {}), ((seq(1, 5),), {}),
             ((inputs(2),), {"scale": 2.0}), ((inputs(3),), {}), ((seq(2, 5),), {"scale": 2.0})]
    outs = wave(b, calls)
    for (a, k), out in zip(calls, outs, strict=True):
        assert torch.allclose(out, alone(*a, **k), atol=ATOL, rtol=RTOL), (a[0].shape, k)
    # joined by equal other dims and equal non-tensor args: MLP rows 1+4+3, seq(.,5) 2+1, and four alone
    assert sorted(model.shapes) == sorted([(8, FEATURES), (3, 5), (3, 7), (2, FEATURES), (2, 5)]), model.shapes
    assert b.stats.to_dict()["sizes"] == {"2": 2, "3": 2, "8": 1}


def test_a_bad_request_fails_alone_and_the_rest_of_its_batch_is_answered() -> None:
    model = Model()
    b = Batcher("model", model, Batch(max_size=16, max_delay_ms=50), Sizes())
    bad = -inputs(2)
    outs = wave(b, [((inputs(1),), {}), ((bad,), {}), ((inputs(4),), {})])
    assert isinstance(outs[1], ValueError) and "negative input" in str(outs[1])
    assert torch.allclose(outs[0], alone(inputs(1)), atol=ATOL, rtol=RTOL)
    assert torch.allclose(outs[2], alone(inputs(4)), atol=ATOL, rtol=RTOL)
    assert model.shapes == [(7, FEATURES), (1, FEATURES), (2, FEATURES), (4, FEATURES)]  # joined, then each alone


@pytest.mark.parametrize("strategy", ["jit", "export"])
def test_padding_and_splitting_never_produce_an_undeclared_shape(strategy: str) -> None:
    declared, lo, hi = (1, 4, 6), 2, 5
    sizes = Sizes(declared) if strategy == "jit" else Sizes(lo=lo, hi=hi)
    model = Model(compiled=True, strategy=strategy)
    b = Batcher("model", model, Batch(max_size=16, max_delay_ms=20), sizes)
    rnd = random.Random(0)
    for _ in range(6):
        rows = [rnd.randint(1, 9) for _ in range(rnd.randint(1, 6))]
        outs = wave(b, [((inputs(n),), {}) for n in rows])
        for n, out in zip(rows, outs, strict=True):
            assert out.shape == (n, 4) and torch.allclose(out, alone(inputs(n)), atol=ATOL, rtol=RTOL)
    batch_sizes = {s[0] for s in model.shapes}
    assert batch_sizes <= set(declared) if strategy == "jit" else all(lo <= n <= hi for n in batch_sizes), batch_sizes
    eager_model = Model()  # an eager part (compile off, or its build pending) runs the exact rows
    wave(Batcher("model", eager_model, Batch(max_size=16, max_delay_ms=20), sizes), [((inputs(3),), {})] * 3)
    assert eager_model.shapes == [(9, FEATURES)]


def test_a_cancelled_call_leaves_the_rest_of_its_batch_answered() -> None:
    model = Model(delay_s=0.3)
    b = Batcher("model", model, Batch(max_size=16, max_delay_ms=20), Sizes())

    async def go() -> tuple[list[Any], Any]:
        tasks = [asyncio.create_task(b(inputs(n))) for n in (1, 2, 3)]
        await asyncio.sleep(0.15)  # the batch is in the model now
        tasks[1].cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        return done, await b(inputs(4))  # the part serves on

    (first, cancelled, third), after = asyncio.run(go())
    assert isinstance(cancelled, asyncio.CancelledError)
    assert torch.allclose(first, alone(inputs(1)), atol=ATOL, rtol=RTOL)
    assert torch.allclose(third, alone(inputs(3)), atol=ATOL, rtol=RTOL)
    assert torch.allclose(after, alone(inputs(4)), atol=ATOL, rtol=RTOL)
    assert model.shapes == [(6, FEATURES), (4, FEATURES)]  # the cancelled call's rows stayed in its batch


class Scope:
    """A Cog prediction scope: the metrics recorded on it."""

    def __init__(self, name: str) -> None:
        self.name, self.metrics = name, {}

    def record_metric(self, key: str, value: Any, mode: str = "replace") -> None:
        self.metrics[key] = self.metrics.get(key, 0) + value if mode == "incr" else value


_PREDICTION: contextvars.ContextVar[Scope | None] = contextvars.ContextVar("test_prediction", default=None)


@pytest.fixture
def scopes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each caller task's scope is the Scope it set in _PREDICTION (as Cog's current_scope() is the task's)."""
    monkeypatch.setattr(batching_mod, "_caller_scope", _PREDICTION.get)


async def predict(b: Batcher, scope: Scope, x: torch.Tensor) -> torch.Tensor:
    _PREDICTION.set(scope)
    return await b(x)


def test_per_prediction_metrics_land_on_the_right_prediction(scopes: None) -> None:
    model = Model()
    b = Batcher("model", model, Batch(max_size=16, max_delay_ms=50), Sizes())
    p = {name: Scope(name) for name in ("a", "b", "c", "other")}

    async def go() -> None:
        await asyncio.gather(predict(b, p["a"], inputs(1)), predict(b, p["b"], inputs(4)),
                             predict(b, p["c"], inputs(2)), predict(b, p["other"], seq(3, 5)))

    asyncio.run(go())
    assert [p[n].metrics["batch_size"] for n in ("a", "b", "c", "other")] == [7, 7, 7, 3]
    assert all(0 <= s.metrics["batch_wait_ms"] for s in p.values())
    seen = {tuple(s.name for s in call) for call in model.seen}  # what request-path counters would reach
    assert seen == {("a", "b", "c"), ("other",)}, seen


def _setup(runner: Any) -> None:
    """setup() in a thread, as a tool runs it: no signal handlers installed in the test process."""
    t = threading.Thread(target=runner.setup)
    t.start()
    t.join(300)


def test_a_runner_part_batches_counts_request_path_calls_per_prediction_and_writes_its_metrics(
        scopes: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.tiny_predictor import BatchedRunner, Runner

    for k, v in {"COMPILE_CACHE_DISABLE": "1", "COMPILE_CACHE_COMPILE": "0", "COMPILE_CACHE_LOG_FILE": str(tmp_path / "log"),
                 "COMPILE_CACHE_METRICS_FILE": str(tmp_path / "metrics.json"),
                 "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}.items():
        monkeypatch.setenv(k, v)
    plain = Runner()
    _setup(plain)
    with pytest.raises(ConfigError, match="no batching"):
        asyncio.run(plain.model.batched(inputs(1)))

    r = BatchedRunner()
    _setup(r)
    atexit.unregister(r._flush)  # its exit flush would log into pytest's closed streams
    part = r.model

    def new_shape(x: torch.Tensor) -> torch.Tensor:  # as a compiled part reports an undeclared shape
        part.on_request("eager", "(nx16)", 1)
        return part.eager(x)

    part.fn = new_shape
    p = [Scope(str(i)) for i in range(3)]

    async def go() -> list[torch.Tensor]:
        return await asyncio.gather(*(predict(part.batched, s, inputs(n)) for s, n in zip(p, (1, 4, 2), strict=True)))

    outs = asyncio.run(go())
    for n, out in zip((1, 4, 2), outs, strict=True):
        assert close(out.tolist(), eager(n))
    # one joined call of 7 rows: padded to 4 + split, two calls of the part, each counted on all three predictions
    assert [s.metrics["request_path_eager_calls"] for s in p] == [2, 2, 2]
    assert [s.metrics["batch_size"] for s in p] == [7, 7, 7]
    assert r.metrics.parts["model"]["request_path_eager_calls"] == 2
    r._write_metrics()
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["parts"]["model"]["batch"]["batches"] == 1 and m["parts"]["model"]["batch"]["sizes"] == {"7": 1}


def test_the_example_batched_runner_pads_to_declared_shapes_and_answers_as_the_sync_runner(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Concurrent requests of several lengths give the sync runner's embeddings, and every joined call reaching the
    part has a declared jit shape (batch and length buckets). The part is the eager model standing in for a compiled
    jit one (what is checked is the join, not a compile)."""
    import predict

    for k, v in {"COMPILE_CACHE_DISABLE": "1", "COMPILE_CACHE_COMPILE": "0", "COMPILE_CACHE_LOG_FILE": str(tmp_path / "log"),
                 "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}.items():
        monkeypatch.setenv(k, v)
    r = predict.BatchedRunner()
    _setup(r)
    atexit.unregister(r._flush)
    seen: list[tuple[int, ...]] = []
    eager_fn = r.model.fn
    r.model.fn = lambda ids, mask: seen.append(tuple(ids.shape)) or eager_fn(ids, mask)
    texts = ["A man is eating food.", "Two lines.\nThe second one is a good deal longer than the first line is.",
             "Short.", "\n".join(f"sentence number {i}" for i in range(5))]

    async def go() -> list[Any]:
        return await asyncio.gather(*(r.run(text=t) for t in texts))

    outs = asyncio.run(go())
    joined = list(seen)  # before the sync runner's own calls below
    for t, out in zip(texts, outs, strict=True):
        want = r.embed([s for s in t.splitlines() if s.strip()])
        assert torch.allclose(torch.tensor(out), torch.tensor(want), atol=ATOL, rtol=RTOL), t
    assert len(joined) < len(texts), joined
    assert all(s[0] in predict.BATCH_BUCKETS and s[1] in predict.SEQ_BUCKETS for s in joined), joined
    # Where every shape is served (the eager model here; an export package alike), the collate pads to the longest.
    r.model.fn = eager_fn
    calls = [((torch.ones(n, t, dtype=torch.int64), torch.ones(n, t, dtype=torch.int64)), {}) for n, t in ((1, 5), (2, 9))]
    (ids, mask), _, sizes = r.collate(calls)
    assert ids.shape == mask.shape == (3, 9) and sizes == [1, 2] and mask[0, 5:].sum() == 0


# -- in the real Cog runtime -------------------------------------------------------------------------------------
def test_concurrent_predictions_in_the_cog_runtime_are_batched_on_the_compiled_part(tiny_seeded_store: Path,
                                                                                      tmp_path: Path) -> None:
    """Eight slots, sixteen predictions at once, warm from the seeded entry (the same key: batching is no key
    factor; the lineage named as the seeding runner's): every output is the eager model's, some predictions rode in
    a joined call, and the joined calls compiled nothing and ran nothing eager (only declared batches reached the
    compiled part)."""
    store = tmp_path / "store"
    shutil.copytree(tiny_seeded_store, store)
    key = next(store.glob("entries/*/manifest.json")).parent.name
    (tmp_path / "c").mkdir()  # the container's project dir: no .cog schema of another runner there
    env = {"COMPILE_CACHE_URL": str(store), "COMPILE_CACHE_MODEL_NAME": key.split(".")[0],
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "c" / "inductor"),
           "COMPILE_CACHE_METRICS_FILE": str(tmp_path / "c" / "metrics.json"), "COG_MAX_CONCURRENCY": "8",
           "PYTHONPATH": str(ROOT)}
    batches = [1, 4, 2, 1, 3, 4, 1, 2] * 2
    results: list[tuple[int, Any]] = [(0, None)] * len(batches)
    with CogServer(f"{ROOT / 'tests' / 'tiny_predictor.py'}:BatchedRunner", cwd=tmp_path / "c", env=env,
                   log_path=tmp_path / "c" / "server.log") as srv:
        srv.wait_ready(600)

        def client(i: int) -> None:
            results[i] = srv.predict({"batch": batches[i]}, timeout=120)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(batches))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert srv.shutdown("post") == 0, srv.log_tail()
    for n, (code, body) in zip(batches, results, strict=True):
        assert code == 200 and body["status"] == "succeeded" and close(body["output"], eager(n)), body
        assert body["metrics"]["batch_size"] >= n and "request_path_eager_calls" not in body["metrics"], body
    assert max(body["metrics"]["batch_size"] for _, body in results) > 1
    m = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert m["cache"] == "hit" and m["key"] == key, m
    assert m["request_path_compiles"] == 0 and m["request_path_eager_calls"] == 0 and not m["eager_fallback"], m
    b = m["parts"]["model"]["batch"]
    assert sum(int(rows) * k for rows, k in b["sizes"].items()) == sum(batches) and b["batches"] < len(batches), b
