"""The tiny model with its weights in a safetensors file (TINY_WEIGHTS_DIR): versions that change only weight
values, only code, or the model, for tests/test_versions.py. Copies of this file with other post-processing stand
for code-only versions (keep the file name: the predictor module's name is part of Inductor's graph keys)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from cog import Input

from compile_cache import CompileConfig, CompiledPredictor
from compile_cache.compiler import Example
from compile_cache.export import Dim, ExportSpec
from tests.tiny_predictor import BATCHES, EXPORT_MAX_BATCH, TinyMLP, inputs

WEIGHTS_DIR = Path(os.environ.get("TINY_WEIGHTS_DIR", "tiny-weights"))
SCALE = 1.0  # post-processing: a code-only version changes this


class Predictor(CompiledPredictor):
    compile_config = CompileConfig(dynamic=False)
    weights_dir = str(WEIGHTS_DIR)

    def load(self, weights=None):  # type: ignore[no-untyped-def]
        return load_model(WEIGHTS_DIR)

    def warmup_examples(self):  # type: ignore[no-untyped-def]
        return [Example((inputs(b),)) for b in BATCHES]

    def export_spec(self) -> ExportSpec:
        return ExportSpec((inputs(3),), {0: {0: Dim("batch", 1, EXPORT_MAX_BATCH)}})

    def predict(self, batch: int = Input(default=1, ge=1, le=64)) -> list[list[float]]:
        return (self.model(inputs(batch)) * SCALE).tolist()


def load_model(d: Path) -> torch.nn.Module:
    from safetensors.torch import load_file

    m = TinyMLP()
    m.load_state_dict(load_file(d / "model.safetensors"))
    return m.eval()


def write_weights(d: Path, perturb: float = 0.0) -> Path:
    """TinyMLP's weights (plus a config file) in ``d``; ``perturb`` shifts every value deterministically (a
    fine-tune: same names, shapes and dtypes)."""
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone() for k, v in TinyMLP().state_dict().items()}
    for i, (k, v) in enumerate(sorted(state.items())):
        state[k] = v + perturb * torch.sin(torch.arange(v.numel(), dtype=v.dtype) + i).reshape(v.shape)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text('{"features": 16}\n')
    return d


def eager(d: Path, batch: int) -> list[list[float]]:
    with torch.no_grad():
        return load_model(d)(inputs(batch)).tolist()
