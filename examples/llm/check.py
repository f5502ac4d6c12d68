"""The example's runner as ``scripts/gpu_check`` measures it: the same model and parts (``model.py``), declared at
several batch sizes and one prompt length, and a batched greedy generation for the Table 1 modes.

The served example (``predict.py:Runner``) takes one prompt at a time; a GPU earns its keep on batches, so here each
part is declared at every batch size of ``GPU_CHECK_BATCHES`` (``jit``: one static graph per batch; ``export``: one
package per part with a dynamic batch dim). Environment (set by ``scripts/gpu_check`` per boot):

    LLM_WEIGHTS_DIR      the weights (``make_weights.py``; random ones at the check's size)
    GPU_CHECK_BATCHES    batch sizes, e.g. ``1,4,32`` (default ``1,2``)
    GPU_CHECK_PROMPT     prompt tokens of every example (default 8; >= 2)
    GPU_CHECK_TOKENS     tokens one generation decodes (default 4): the KV cache holds prompt + tokens
    GPU_CHECK_DEVICE     ``cuda`` or ``cpu`` (default: ``cuda`` when there is one)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from compile_cache import CompileConfig, Dim, Example, ExportSpec, Part
from compile_cache.tools.gpucheck_models import env_ints

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import Decode, Prefill, load_model, new_cache  # noqa: E402

from predict import Runner  # noqa: E402

# The Table 1 modes of "Studying the Overhead of torch.compile() in LLM Inference": which parts run compiled.
TABLE1_MODES: dict[str, tuple[str, ...]] = {
    "eager": (),
    "compile-decode": ("decode",),
    "compile-prefill+decode": ("prefill", "decode"),
}


class CheckRunner(Runner):
    # jit by default (the check sets COMPILE_CACHE_STRATEGY=export for the export runs); static shapes: one graph
    # per declared batch size, so the warm boot has a fixed list of graphs to find.
    compile_config = CompileConfig(strategy="jit", dynamic=False)

    def load(self, weights=None):  # type: ignore[no-untyped-def]
        self.batches = sorted(set(env_ints("GPU_CHECK_BATCHES", "1,2")))
        (self.prompt,) = env_ints("GPU_CHECK_PROMPT", "8")
        (self.tokens,) = env_ints("GPU_CHECK_TOKENS", "4")
        if self.prompt < 2:
            raise ValueError("GPU_CHECK_PROMPT must be >= 2 (torch.export specializes a size of 1)")
        want = os.environ.get("GPU_CHECK_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(want)
        weights_dir = Path(weights) if weights else Path(os.environ.get("LLM_WEIGHTS_DIR", "weights"))
        self.lm = load_model(weights_dir).to(self.device)
        self.config = self.lm.config
        prefill, decode = Prefill(self.lm), Decode(self.lm)
        pre = {b: self._prefill_args(b) for b in self.batches}
        dec = {b: self._decode_args(b) for b in self.batches}
        # Export: one package per part; the batch dim dynamic when several batches are declared, the example at the
        # largest (torch.export specializes a size of 1, so the example must be >= 2).
        top = self.batches[-1]
        batch = Dim("batch", self.batches[0], top) if len(self.batches) > 1 and top >= 2 else None

        def dims(*cache_args: int) -> dict[int, dict[int, Dim]]:
            if batch is None:
                return {}
            return {0: {0: batch}, **{i: {1: batch} for i in cache_args}}

        return {
            "prefill": Part(prefill, examples=[Example(pre[b], label=f"batch={b} prompt={self.prompt}")
                                               for b in self.batches],
                            export_spec=ExportSpec(pre[top], {**dims(2, 3), **({1: {0: batch}} if batch else {})})),
            "decode": Part(decode, examples=[Example(dec[b], label=f"batch={b} one token") for b in self.batches],
                           export_spec=ExportSpec(dec[top], dims(2, 3))),
        }

    # -- inputs ----------------------------------------------------------------------------------------------------
    def _cache(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = new_cache(self.config, self.prompt + self.tokens, batch)
        return k.to(self.device), v.to(self.device)

    def prompt_ids(self, batch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(batch)
        return torch.randint(0, 256, (batch, self.prompt), generator=g).to(self.device)

    def _prefill_args(self, batch: int) -> tuple[torch.Tensor, ...]:
        length = torch.full((batch,), self.prompt, dtype=torch.long, device=self.device)
        return (self.prompt_ids(batch), length, *self._cache(batch))

    def _decode_args(self, batch: int) -> tuple[torch.Tensor, ...]:
        token = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        position = torch.tensor([self.prompt], device=self.device)
        return (token, position, *self._cache(batch))

    # -- Table 1 ---------------------------------------------------------------------------------------------------
    def table1_modes(self) -> Mapping[str, tuple[str, ...]]:
        return TABLE1_MODES

    @torch.inference_mode()
    def generate(self, parts: Mapping[str, Callable[..., torch.Tensor]], batch: int) -> torch.Tensor:
        """Greedy: prefill the batch's prompt, then ``tokens - 1`` decode steps; the ``[batch, tokens]`` ids."""
        with torch.inference_mode(False):  # as model.greedy_batch does: a served part copies inference tensors
            k, v = self._cache(batch)
        length = torch.full((batch,), self.prompt, dtype=torch.long, device=self.device)
        token = parts["prefill"](self.prompt_ids(batch), length, k, v).argmax(-1, keepdim=True)
        out = [token]
        for i in range(self.tokens - 1):
            position = torch.tensor([self.prompt + i], device=self.device)
            token = parts["decode"](token, position, k, v).argmax(-1, keepdim=True)
            out.append(token)
        return torch.cat(out, 1)
