"""The models ``scripts/gpu_check`` measures: a small registry, one entry per example.

An entry names the example's check runner (a ``CompiledRunner`` whose parts are declared at the check's batch
sizes), how to make random weights at a size, and the sizes: ``gpu`` (big enough that kernels matter, small enough
that every boot of the check fits its time budget) and ``cpu`` (the smallest that runs the same code paths). A
runner that also has ``generate(parts, batch)`` and ``table1_modes()`` gets the Table 1 cells.

To add a model: write its check runner, then ``register(CheckModel(...))`` below. An entry whose files are not in
this tree yet, or whose ``needs`` are not installed, is listed as unavailable, not an error.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Size", "CheckModel", "MODELS", "register", "ROOT", "env_ints"]

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Size:
    """One size of a model in the check."""

    weights: str  # the example's own name for a weight config (its make_weights.py --config)
    batches: tuple[int, ...]  # batch sizes every part is declared (and compiled) at in the Table 1 run
    # the two latency is reported at (the first alone with --quick); the only ones the other runs declare
    latency_batches: tuple[int, ...]
    table1_batches: tuple[int, ...] = ()  # Table 1 cells (only for the first jit run; empty: none)
    env: dict[str, str] = field(default_factory=dict)  # the runner's own size settings


@dataclass(frozen=True)
class CheckModel:
    name: str
    runner: str  # FILE.py:CLASS, relative to the repository root
    weights_env: str  # the variable the runner reads its weights directory from
    make_weights: Callable[[Path, str], None]  # (directory, Size.weights) -> random weights written there
    sizes: dict[str, Size]  # "gpu" and "cpu"
    needs: tuple[str, ...] = ()  # modules the runner imports beyond the framework's (e.g. "diffusers")
    cpu_default: bool = True  # in ``--cpu``'s default --models (False: too slow there; named with --models)

    def unavailable(self) -> str:
        """Why this model cannot run here ("" when it can)."""
        path = ROOT / self.runner.partition(":")[0]
        if not path.is_file():
            return f"{path.relative_to(ROOT)} is not in this tree"
        import importlib.util

        missing = [m for m in self.needs if importlib.util.find_spec(m) is None]
        return f"not installed: {', '.join(missing)}" if missing else ""


def env_ints(name: str, default: str) -> list[int]:
    """A check runner's size setting: ``name`` from the environment (``default`` if unset) as positive integers."""
    raw = os.environ.get(name, default)
    try:
        out = [int(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected comma-separated positive integers") from None
    if not out or min(out) < 1:
        raise ValueError(f"{name}={raw!r}: expected comma-separated positive integers")
    return out


MODELS: dict[str, CheckModel] = {}


def register(model: CheckModel) -> CheckModel:
    if model.name in MODELS:
        raise ValueError(f"a check model named {model.name!r} is registered already")
    if set(model.sizes) != {"gpu", "cpu"}:
        raise ValueError(f"check model {model.name!r}: sizes must be 'gpu' and 'cpu', got {sorted(model.sizes)}")
    MODELS[model.name] = model
    return model


def _example_weights(script: str) -> Callable[[Path, str], None]:
    """Weights made by the example's own ``make_weights.py --config NAME --out DIR`` (a subprocess: the check's
    driver imports no torch)."""

    def make(dest: Path, config: str) -> None:
        cmd = [sys.executable, str(ROOT / script), "--config", config, "--out", str(dest)]
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if cp.returncode != 0:
            raise RuntimeError(f"{script} --config {config} failed (exit {cp.returncode}):\n{cp.stderr[-2000:]}")

    return make


# The LLM example: prefill and decode over a static KV cache. On the GPU, batches 1/4/32 are Table 1's: the jit
# default run declares every part at each (static shapes: 6 graphs), the other runs at 1 and 32 (4 graphs, to fit
# the budget). On CPU, batches 1 and 2 only: a CPU graph is slow to compile cold (docs/gpu.md has the boots), and
# the code paths are the same.
register(CheckModel(
    name="llm",
    runner="examples/llm/check.py:CheckRunner",
    weights_env="LLM_WEIGHTS_DIR",
    make_weights=_example_weights("examples/llm/make_weights.py"),
    sizes={
        "gpu": Size("small", batches=(1, 4, 32), latency_batches=(1, 32), table1_batches=(1, 4, 32),
                    env={"GPU_CHECK_PROMPT": "32", "GPU_CHECK_TOKENS": "64"}),
        "cpu": Size("tiny", batches=(1, 2), latency_batches=(1, 2), table1_batches=(1, 2),
                    env={"GPU_CHECK_PROMPT": "4", "GPU_CHECK_TOKENS": "3"}),
    },
))


# The diffusion example: the UNet denoiser (one guided step) and the VAE decoder, B images of one prompt. On the GPU,
# the example's own config (UNet and VAE blocks 32/64, 32x32 latents) at batch 1 and 8: 4 static graphs under jit,
# 2 packages with a dynamic batch dim under export; it runs after the LLM, in what is left of the budget. On CPU,
# the tiny config (blocks 16, 8x8 latents) at batch 1 and 2, and not in --cpu's default models (`make test` runs
# those): `scripts/gpu_check --cpu --models diffusion` takes longer than the whole LLM check (its cold boots compile
# the UNet and the VAE decoder); docs/gpu.md has the figures.
register(CheckModel(
    name="diffusion",
    runner="examples/diffusion/check.py:CheckRunner",
    weights_env="DIFFUSION_WEIGHTS_DIR",
    make_weights=_example_weights("examples/diffusion/model.py"),
    sizes={
        "gpu": Size("example", batches=(1, 8), latency_batches=(1, 8), env={"GPU_CHECK_LATENT": "32"}),
        "cpu": Size("tiny", batches=(1, 2), latency_batches=(1, 2), env={"GPU_CHECK_LATENT": "8"}),
    },
    needs=("diffusers",),
    cpu_default=False,
))
