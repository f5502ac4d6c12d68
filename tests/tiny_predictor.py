"""Tiny runners for fast integration tests: a 2-layer MLP with two declared batch shapes, and a small CNN with
BatchNorm (what every ResNet, UNet and VAE has) for the export strategy.

``Runner`` is the current API (``CompiledRunner``, ``run()``); ``Predictor`` is the older one (``CompiledPredictor``,
``predict()``), kept to show that code written against it still boots."""

from __future__ import annotations

import os
import time

import torch
from cog import Input

from compile_cache import Batch, CompileConfig, CompiledPredictor, CompiledRunner, Dim, Example, ExportSpec

FEATURES = 16
BATCHES = (1, 4)
EXPORT_MAX_BATCH = 32  # strategy=export: one package for batch 1..32


class TinyMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(FEATURES, 32)
        self.b = torch.nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.a(x)).sin() @ torch.ones(32, 4) + self.b(torch.relu(self.a(x)))


def _broken_backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):  # type: ignore[no-untyped-def]
    """A backend that fails when the first compiled call reaches it (torch.compile itself is lazy and succeeds)."""
    raise RuntimeError("tiny_broken backend refuses to compile")


torch._dynamo.register_backend(_broken_backend, name="tiny_broken")


def inputs(batch: int) -> torch.Tensor:
    return torch.arange(batch * FEATURES, dtype=torch.float32).reshape(batch, FEATURES) / 100.0


def eager(batch: int) -> list[list[float]]:
    """The reference output: the tiny model run eagerly, as the tests compare every served output with it."""
    with torch.no_grad():
        return TinyMLP()(inputs(batch)).tolist()


def close(a: list, b: list) -> bool:
    return torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)


class _Tiny:
    # TINY_BREAK_FORWARD=1: the first compiled call fails (same as COMPILE_CACHE_BACKEND=tiny_broken).
    compile_config = CompileConfig(
        dynamic=False, backend="tiny_broken" if os.environ.get("TINY_BREAK_FORWARD") == "1" else "inductor"
    )
    model_version = "tiny-1"
    weights_dir = None

    def load(self, weights=None):  # type: ignore[no-untyped-def]
        return TinyMLP().eval()

    def warmup_examples(self):  # type: ignore[no-untyped-def]
        return [Example((inputs(b),)) for b in BATCHES]

    def export_spec(self) -> ExportSpec:
        return ExportSpec((inputs(3),), {0: {0: Dim("batch", 1, EXPORT_MAX_BATCH)}})


class Runner(_Tiny, CompiledRunner):
    def run(self, batch: int = Input(default=1, ge=1, le=64)) -> list[list[float]]:
        return self.model(inputs(batch)).tolist()


class GatedRunner(Runner):
    """``Runner`` whose build (the warm-up, inside setup's compile step) waits until the file ``TINY_GATE`` names
    exists: a test holds a replica mid-build, e.g. to start another one beside it or to kill it there."""

    def warmup_examples(self):  # type: ignore[no-untyped-def]
        gate = os.environ.get("TINY_GATE")
        while gate and not os.path.exists(gate):
            time.sleep(0.05)
        return super().warmup_examples()


class Predictor(_Tiny, CompiledPredictor):
    def predict(self, batch: int = Input(default=1, ge=1, le=64)) -> list[list[float]]:
        return self.model(inputs(batch)).tolist()


class DataDependent(TinyMLP):
    """Control flow on a tensor's value: torch.export refuses it, Dynamo graph-breaks around it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if y.sum() > 1e9:
            return -y
        return y


class UnexportablePredictor(Predictor):
    def load(self, weights=None):  # type: ignore[no-untyped-def]
        return DataDependent().eval()


class Noisy(TinyMLP):
    """Output plus fresh noise: compiled code draws other random numbers than eager, so a precompiled function
    never reproduces the eager output (its round trip fails; the jit function serves)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y + torch.rand_like(y)


class NoisyPredictor(Predictor):
    def load(self, weights=None):  # type: ignore[no-untyped-def]
        return Noisy().eval()


class TinyCNN(torch.nn.Module):
    """Two conv + BatchNorm blocks in eval mode: BatchNorm's ``num_batches_tracked`` buffers are lifted by
    torch.export but never read, and its 8-element weights and running stats are what Inductor would inline."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.c1, self.b1 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.c2, self.b2 = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 4)
        with torch.no_grad():  # running stats as a trained model has them (fresh ones are 0 and 1)
            for bn in (self.b1, self.b2):
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
                bn.weight.uniform_(0.5, 2)
                bn.bias.uniform_(-1, 1)
                bn.num_batches_tracked.fill_(100 + seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def images(batch: int) -> torch.Tensor:
    return torch.linspace(-1, 1, batch * 3 * 8 * 8).reshape(batch, 3, 8, 8)


def cnn_eager(batch: int) -> list[list[float]]:
    with torch.no_grad():
        return TinyCNN().eval()(images(batch)).tolist()


class BatchNormPredictor(CompiledPredictor):
    compile_config = CompileConfig(strategy="export", dynamic=False)
    model_version = "tiny-cnn-1"
    weights_dir = None

    def load(self, weights=None):  # type: ignore[no-untyped-def]
        return TinyCNN().eval()

    def warmup_examples(self):  # type: ignore[no-untyped-def]
        return [Example((images(b),)) for b in BATCHES]

    def export_spec(self) -> ExportSpec:
        return ExportSpec((images(3),), {0: {0: Dim("batch", 1, EXPORT_MAX_BATCH)}})

    def predict(self, batch: int = Input(default=1, ge=1, le=64)) -> list[list[float]]:
        return self.model(images(batch)).tolist()


class SequentialPredictor(Predictor):
    """The model is an nn.Sequential: torch.nn containers are compiled through another frame than their forward."""

    def load(self, weights=None):  # type: ignore[no-untyped-def]
        return torch.nn.Sequential(TinyMLP(), torch.nn.Tanh()).eval()


class AsyncRunner(Runner):
    """``Runner`` with an async ``run()``: the Cog runtime runs several predictions at once (COG_MAX_CONCURRENCY)."""

    async def run(self, batch: int = Input(default=1, ge=1, le=64)) -> list[list[float]]:  # type: ignore[override]
        return self.model(inputs(batch)).tolist()


class BatchedRunner(AsyncRunner):
    """``AsyncRunner`` whose concurrent predictions are joined into one model call (up to 8 rows within 50 ms): the
    joined rows are padded or split to the declared batches, 1 and 4."""

    compile_config = _Tiny.compile_config.model_copy(update={"batch": Batch(max_size=8, max_delay_ms=50)})

    async def run(self, batch: int = Input(default=1, ge=1, le=64)) -> list[list[float]]:  # type: ignore[override]
        return (await self.model.batched(inputs(batch))).tolist()
