"""The example's runner as ``scripts/gpu_check`` measures it: the same two units (``model.py``), declared at several
batch sizes and one latent size.

The served example (``predict.py:Runner``) draws one image at a time; a GPU earns its keep on batches, so here each
part is declared at every batch size of ``GPU_CHECK_BATCHES`` (``jit``: one static graph per batch; ``export``: one
package per part with a dynamic batch dim). A batch is B images of the same prompt: the denoiser takes the prompt's
``[2, text_len, cross_dim]`` conditioning once and spreads it over the batch. No Table 1 cells: a diffusion
pipeline has no prefill/decode split. Environment (set by ``scripts/gpu_check`` per boot):

    DIFFUSION_WEIGHTS_DIR  the weights (``python model.py --config NAME --out DIR``; the config is read from them)
    GPU_CHECK_BATCHES      batch sizes, e.g. ``1,8`` (default ``1,2``)
    GPU_CHECK_LATENT       latent height and width (default: the config's ``latent_size``); the image is
                           ``2 ** (len(vae_channels) - 1)`` times that
    GPU_CHECK_DEVICE       ``cuda`` or ``cpu`` (default: ``cuda`` when there is one)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from compile_cache import CompileConfig, Dim, Example, ExportSpec, Part
from compile_cache.tools.gpucheck_models import env_ints

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import LATENT_CHANNELS, Denoiser, Pipeline, load_config  # noqa: E402

from predict import Runner  # noqa: E402


class BatchDenoiser(Denoiser):
    """``Denoiser`` over a batch of B images of one prompt: latents ``[B, 4, h, w]``, t ``[1]``, cond
    ``[2, text_len, cross_dim]`` (unconditional first) -> the guided noise ``[B, 4, h, w]``. The conditioning is
    expanded to the UNet's ``2B`` rows inside, with views only, so B can be a dynamic dim of an export."""

    def forward(self, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        b = latents.shape[0]
        x = torch.cat([latents, latents])  # B unconditional rows, then B conditional ones
        c = cond[:, None].expand(-1, b, -1, -1).flatten(0, 1)  # [2B, text_len, cross_dim] in the same order
        eps = self.unet(x, t.expand(x.shape[0]), encoder_hidden_states=c, return_dict=False)[0]
        uncond, text = eps.chunk(2)
        return uncond + self.guidance_scale * (text - uncond)


class CheckRunner(Runner):
    # jit by default (the check sets COMPILE_CACHE_STRATEGY=export for the export runs); static shapes: one graph
    # per declared batch size, so the warm boot has a fixed list of graphs to find.
    compile_config = CompileConfig(strategy="jit", dynamic=False)

    def load(self, weights=None):  # type: ignore[no-untyped-def]
        self.batches = sorted(set(env_ints("GPU_CHECK_BATCHES", "1,2")))
        want = os.environ.get("GPU_CHECK_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(want)
        weights_dir = Path(weights) if weights else Path(os.environ.get("DIFFUSION_WEIGHTS_DIR", "weights"))
        cfg = load_config(weights_dir)
        (self.latent,) = env_ints("GPU_CHECK_LATENT", str(cfg.latent_size))
        self.pipe = pipe = Pipeline(cfg, weights_dir)
        denoiser = BatchDenoiser(pipe.denoiser.unet, cfg.guidance_scale).eval().to(self.device)
        decoder = pipe.decoder.to(self.device)
        cond = pipe.cond("a lighthouse at dusk").to(self.device)
        t = torch.tensor([500.0], device=self.device)
        lat = {b: self.latents(b) for b in self.batches}
        # Export: one package per part; the batch dim dynamic when several batches are declared, the example at the
        # largest (torch.export specializes a size of 1, so the example must be >= 2).
        top = self.batches[-1]
        batch = Dim("batch", self.batches[0], top) if len(self.batches) > 1 and top >= 2 else None
        dims = {0: {0: batch}} if batch else {}
        size = f"latent={self.latent}x{self.latent}"
        return {
            "denoiser": Part(denoiser, examples=[Example((lat[b], t, cond), label=f"batch={b} {size} one step")
                                                 for b in self.batches],
                             export_spec=ExportSpec((lat[top], t, cond), dims)),
            "decoder": Part(decoder, examples=[Example((lat[b],), label=f"batch={b} {size}") for b in self.batches],
                            export_spec=ExportSpec((lat[top],), dims)),
        }

    def latents(self, batch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(batch)
        return torch.randn(batch, LATENT_CHANNELS, self.latent, self.latent, generator=g).to(self.device)
