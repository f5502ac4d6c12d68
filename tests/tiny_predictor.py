"""A tiny predictor for fast integration tests: a 2-layer MLP, two declared batch shapes."""

from __future__ import annotations

import os

import torch
from cog import Input

from compile_cache import CompileConfig, CompiledPredictor
from compile_cache.compiler import Example

FEATURES = 16
BATCHES = (1, 4)


class TinyMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(FEATURES, 32)
        self.b = torch.nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if os.environ.get("TINY_BREAK_FORWARD") == "1":
            # Fails only under Dynamo tracing: eager runs this forward fine.
            if torch.compiler.is_compiling():
                raise RuntimeError("tiny model refuses to be compiled")
        return torch.relu(self.a(x)).sin() @ torch.ones(32, 4) + self.b(torch.relu(self.a(x)))


def inputs(batch: int) -> torch.Tensor:
    return torch.arange(batch * FEATURES, dtype=torch.float32).reshape(batch, FEATURES) / 100.0


class Predictor(CompiledPredictor):
    compile_config = CompileConfig(dynamic=False)
    model_version = "tiny-1"
    weights_dir = None

    def load(self, weights=None):  # type: ignore[no-untyped-def]
        return TinyMLP().eval()

    def warmup_examples(self):  # type: ignore[no-untyped-def]
        return [Example((inputs(b),)) for b in BATCHES]

    def predict(self, batch: int = Input(default=1, ge=1, le=64)) -> list[list[float]]:
        return self.model(inputs(batch)).tolist()
