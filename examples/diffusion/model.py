"""A tiny Stable-Diffusion-style text-to-image pipeline built from diffusers pieces (no hub, no downloads).

* denoiser: a ``UNet2DConditionModel`` (cross-attention to the text embedding) with classifier-free guidance folded
  into one call: ``denoise_step(latents, t, cond) -> guided noise prediction``.
* decoder: the decoder half of an ``AutoencoderKL`` (GroupNorm, no BatchNorm): ``decode(latents) -> image in [0, 1]``.
* text conditioning: NOT a real text encoder. The prompt's UTF-8 bytes index a fixed embedding table (plus a
  position table); the empty prompt is the unconditional embedding. Deterministic, tiny, and enough to make
  different prompts give different images.
* scheduler: diffusers' ``EulerDiscreteScheduler`` with Stable Diffusion's beta schedule; its ``step()`` runs in
  plain Python between the compiled denoiser calls.

The weights are random, drawn from a fixed seed by code (:func:`make_state`), and written once to
``weights/diffusion.safetensors`` beside this file (:func:`ensure_weights`; ``python examples/diffusion/model.py``
writes them ahead of time). The images are noise-like: this example shows the compile path, not image quality.

:func:`generate` is the whole pipeline; it takes the two units as arguments, so the eager pipeline and the compiled
one run the very same loop and differ only in the callables passed in.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
WEIGHTS_DIR = HERE / "weights"
LATENT_CHANNELS = 4


@dataclass(frozen=True)
class TinyConfig:
    """Every size of the pipeline. ``EXAMPLE`` is what the runner serves; tests use ``TINY``."""

    unet_channels: tuple[int, ...] = (32, 64)  # one down block and one up block per entry
    vae_channels: tuple[int, ...] = (32, 64)  # the image is latent_size * 2 ** (len(vae_channels) - 1) pixels wide
    layers_per_block: int = 1
    norm_groups: int = 8
    latent_size: int = 32
    cross_dim: int = 32
    head_dim: int = 8
    text_len: int = 16  # prompt bytes beyond this are dropped
    guidance_scale: float = 5.0
    seed: int = 0  # the weights' seed (the image's seed is run()'s input)
    scheduler: dict = field(default_factory=lambda: dict(  # Stable Diffusion's schedule
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"))

    @property
    def image_size(self) -> int:
        return self.latent_size * 2 ** (len(self.vae_channels) - 1)

    def weights_file(self, weights_dir: Path = WEIGHTS_DIR) -> Path:
        """One file per config, so a test's tiny weights never stand in for the example's."""
        tag = "" if self == EXAMPLE else "-" + hashlib.sha256(repr(asdict(self)).encode()).hexdigest()[:8]
        return weights_dir / f"diffusion{tag}.safetensors"


EXAMPLE = TinyConfig()
TINY = TinyConfig(unet_channels=(16,), vae_channels=(16,), latent_size=8, text_len=8)
CONFIGS = {"example": EXAMPLE, "tiny": TINY}  # the names ``python model.py --config NAME`` knows


# --------------------------------------------------------------------------------------------------------------------
# The pieces
# --------------------------------------------------------------------------------------------------------------------
class TextEmbedding(torch.nn.Module):
    """Prompt bytes -> a [1, text_len, cross_dim] embedding: a byte table plus a position table (0 = padding)."""

    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.text_len = cfg.text_len
        self.tokens = torch.nn.Embedding(257, cfg.cross_dim)  # byte b -> id b + 1; id 0 pads
        self.positions = torch.nn.Embedding(cfg.text_len, cfg.cross_dim)

    def ids(self, prompt: str) -> torch.Tensor:
        raw = list(prompt.encode("utf-8")[: self.text_len])
        return torch.tensor([[b + 1 for b in raw] + [0] * (self.text_len - len(raw))])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tokens(ids) + self.positions.weight[None]


class Denoiser(torch.nn.Module):
    """One denoising step's model call: the UNet on the unconditional and the conditional half, guided."""

    def __init__(self, unet: torch.nn.Module, guidance_scale: float) -> None:
        super().__init__()
        self.unet = unet
        self.guidance_scale = guidance_scale

    def forward(self, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """latents [1, 4, h, w] (already scaled by the scheduler), t [1] float, cond [2, text_len, cross_dim]
        (unconditional first) -> the guided noise prediction [1, 4, h, w]."""
        x = torch.cat([latents, latents])
        eps = self.unet(x, t.expand(2), encoder_hidden_states=cond, return_dict=False)[0]
        uncond, text = eps.chunk(2)
        return uncond + self.guidance_scale * (text - uncond)


class Decoder(torch.nn.Module):
    """The VAE's decoding half only (its encoder's weights would be unused constants of an exported package)."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [1, 4, h, w] -> image [1, 3, H, W] in [0, 1]."""
        image = self.decoder(self.post_quant_conv(latents / self.scaling_factor))
        return (image / 2 + 0.5).clamp(0, 1)


def build_modules(cfg: TinyConfig) -> dict[str, torch.nn.Module]:
    """The three modules with diffusers' default (random) initialisation."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    n = len(cfg.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=cfg.latent_size,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D",) * (n - 1) + ("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
        block_out_channels=cfg.unet_channels,
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_groups,
        cross_attention_dim=cfg.cross_dim,
        attention_head_dim=cfg.head_dim,
    )
    m = len(cfg.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * m,
        up_block_types=("UpDecoderBlock2D",) * m,
        block_out_channels=cfg.vae_channels,
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_groups,
        latent_channels=LATENT_CHANNELS,
        sample_size=cfg.image_size,
    )
    return {"unet": unet, "vae": vae, "text": TextEmbedding(cfg)}


def make_state(cfg: TinyConfig) -> dict[str, torch.Tensor]:
    """The weights: the modules' default initialisation drawn from ``cfg.seed`` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        modules = build_modules(cfg)
    return {f"{name}.{k}": v.contiguous() for name, mod in modules.items() for k, v in mod.state_dict().items()}


def ensure_weights(cfg: TinyConfig = EXAMPLE, weights_dir: Path = WEIGHTS_DIR) -> Path:
    """Write the config's weights file once (atomically); later calls only return its path.

    The file records the config it was drawn for; one drawn for another config (model.py's sizes changed) is drawn
    again. A file without that record (weights of your own) is left alone."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = cfg.weights_file(weights_dir)
    stale = False
    if path.exists():
        with safe_open(str(path), "pt") as f:
            made_for = (f.metadata() or {}).get("config")
        stale = made_for is not None and made_for != repr(asdict(cfg))
    if stale or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")  # two processes writing at once each finish their own file
        save_file(make_state(cfg), str(tmp), metadata={"config": repr(asdict(cfg))})
        tmp.chmod(0o644)  # readable by the serving user when written at image build time
        tmp.replace(path)
    return path


def load_config(weights_dir: Path) -> TinyConfig:
    """The config the one weights file in ``weights_dir`` was drawn for (as :func:`ensure_weights` recorded it)."""
    import ast

    from safetensors import safe_open

    files = sorted(Path(weights_dir).glob("diffusion*.safetensors"))
    if len(files) != 1:
        raise FileNotFoundError(f"{weights_dir}: expected one diffusion*.safetensors (python model.py --config NAME "
                                f"--out DIR writes it), found {[f.name for f in files]}")
    with safe_open(str(files[0]), "pt") as f:
        made_for = (f.metadata() or {}).get("config")
    if made_for is None:
        raise ValueError(f"{files[0]}: no config recorded in its metadata (not written by ensure_weights)")
    fields = ast.literal_eval(made_for)
    return TinyConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


# --------------------------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------------------------
class Pipeline:
    """The pieces, loaded from the weights file: ``denoiser`` and ``decoder`` are the two compile units."""

    def __init__(self, cfg: TinyConfig = EXAMPLE, weights_dir: Path = WEIGHTS_DIR) -> None:
        from diffusers import EulerDiscreteScheduler
        from safetensors.torch import load_file

        self.cfg = cfg
        state = load_file(str(ensure_weights(cfg, weights_dir)))
        modules = build_modules(cfg)
        for name, mod in modules.items():
            mod.load_state_dict({k.removeprefix(name + "."): v for k, v in state.items() if k.startswith(name + ".")})
            mod.eval().requires_grad_(False)
        self.text = modules["text"]
        self.denoiser = Denoiser(modules["unet"], cfg.guidance_scale).eval()
        self.decoder = Decoder(modules["vae"]).eval()
        self.scheduler = EulerDiscreteScheduler(**cfg.scheduler)

    # -- example inputs of the two units (the shapes every request brings) -------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return (1, LATENT_CHANNELS, self.cfg.latent_size, self.cfg.latent_size)

    def latents_example(self) -> torch.Tensor:
        return torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(0))

    def denoise_example(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.latents_example(), torch.tensor([500.0]), self.cond("warm up")

    def cond(self, prompt: str) -> torch.Tensor:
        """[2, text_len, cross_dim]: the empty prompt's embedding, then the prompt's."""
        with torch.no_grad():
            return self.text(torch.cat([self.text.ids(""), self.text.ids(prompt)]))


def generate(
    pipe: Pipeline,
    prompt: str,
    steps: int,
    seed: int,
    denoise_step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Text -> image [1, 3, H, W] in [0, 1]. ``denoise_step``/``decode`` default to the eager units."""
    denoise_step = pipe.denoiser if denoise_step is None else denoise_step
    decode = pipe.decoder if decode is None else decode
    # A scheduler per call: set_timesteps/step keep state (step index), so concurrent calls must not share one.
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    cond = pipe.cond(prompt)
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(pipe.latent_shape, generator=g) * scheduler.init_noise_sigma
    # no_grad, not inference_mode: a tensor made in inference mode is an "inference tensor", and Dynamo's guards
    # tell it from the ordinary tensors warm-up compiled for (the call would run uncompiled, or compile again).
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(latents, t)
            eps = denoise_step(x, t.reshape(1).to(torch.float32), cond)
            latents = scheduler.step(eps, t, latents, return_dict=False)[0]
        return decode(latents)


def to_png(image: torch.Tensor) -> bytes:
    """[1, 3, H, W] in [0, 1] -> PNG bytes (8-bit RGB; the same pixels always give the same bytes)."""
    from PIL import Image

    pixels = to_uint8(image)
    buf = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buf, format="PNG")
    return buf.getvalue()


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """[1, 3, H, W] in [0, 1] -> [H, W, 3] uint8."""
    return (image[0].permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8)


def main(argv: list[str] | None = None) -> int:
    """Write a config's weights ahead of time (load() writes the example's too when missing); print their path.

    python examples/diffusion/model.py [--config example|tiny] [--out DIR]   (default: the example's, in weights/)
    """
    import argparse
    import sys

    ap = argparse.ArgumentParser(description=main.__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="example")
    ap.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    args = ap.parse_args(argv)
    sys.stdout.write(f"{ensure_weights(CONFIGS[args.config], args.out)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
