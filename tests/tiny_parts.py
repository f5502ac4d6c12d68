"""Tiny runners with several compiled parts, for the parts API's integration tests.

``TwoParts``: an ``encoder`` (the tiny MLP, strategy ``export``: one package for batch 1..32) feeding a ``head``
(strategy ``jit``, warm-up batches 1 and 4). ``BrokenEncoder``: both parts jit, and the encoder's compile fails.
``ConcurrentRunner``: one jit part behind an ``async run()`` that hands each call to a thread, for
``COG_MAX_CONCURRENCY`` > 1.
"""

from __future__ import annotations

import asyncio

import torch
from cog import Input

from compile_cache import CompileConfig, CompiledRunner, Dim, Example, ExportSpec, Part
from tests.tiny_predictor import BATCHES, EXPORT_MAX_BATCH, TinyMLP, inputs


class Head(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.l = torch.nn.Linear(4, 2)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.l(h)) * 2 + h[:, :2]


def eager(batch: int) -> list[list[float]]:
    """The reference: both parts run eagerly."""
    with torch.no_grad():
        return Head()(TinyMLP()(inputs(batch))).tolist()


def head_inputs(batch: int) -> torch.Tensor:
    with torch.no_grad():
        return TinyMLP()(inputs(batch))


class TwoParts(CompiledRunner):
    compile_config = CompileConfig(dynamic=False)  # defaults for every part
    model_version = "tiny-parts-1"
    weights_dir = None
    encoder_config: dict = {"strategy": "export"}

    def load(self, weights=None):  # type: ignore[no-untyped-def]
        return {
            "encoder": Part(TinyMLP().eval(), examples=[Example((inputs(b),)) for b in BATCHES],
                            export_spec=ExportSpec((inputs(3),), {0: {0: Dim("batch", 1, EXPORT_MAX_BATCH)}}),
                            **self.encoder_config),
            "head": Part(Head().eval(), examples=[Example((head_inputs(b),)) for b in BATCHES], strategy="jit"),
        }

    def run(self, batch: int = Input(default=1, ge=1, le=64)) -> list[list[float]]:
        return self.parts["head"](self.parts.encoder(inputs(batch))).tolist()


class BrokenEncoder(TwoParts):
    # tiny_broken (registered by tests/tiny_predictor.py): torch.compile succeeds, the first compiled call raises
    encoder_config = {"strategy": "jit", "backend": "tiny_broken"}


class ConcurrentRunner(CompiledRunner):
    compile_config = CompileConfig(dynamic=False)
    model_version = "tiny-concurrent-1"
    weights_dir = None

    def load(self, weights=None):  # type: ignore[no-untyped-def]
        return TinyMLP().eval()

    def warmup_examples(self):  # type: ignore[no-untyped-def]
        return [Example((inputs(b),)) for b in BATCHES]

    async def run(self, batch: int = Input(default=1, ge=1, le=64), calls: int = Input(default=1, ge=1)
                  ) -> list[list[float]]:
        # A thread per prediction: with COG_MAX_CONCURRENCY > 1 the compiled model really is called concurrently.
        def many() -> torch.Tensor:
            for _ in range(calls - 1):
                self.model(inputs(batch))
            return self.model(inputs(batch))

        return (await asyncio.to_thread(many)).tolist()
