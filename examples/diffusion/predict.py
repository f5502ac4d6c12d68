"""Example: a tiny Stable-Diffusion-style pipeline (diffusers), its denoiser and VAE decoder compiled as two parts.

Inputs: ``prompt``, ``steps`` (denoising steps), ``seed`` (the initial noise). Output: a PNG.

Both parts use the ``export`` strategy: one AOTInductor package each, code only (the weights come from
``weights/``), loaded at boot without Dynamo or Inductor. A part whose export fails falls back alone to ``jit``.
Every request has the same shapes (one image, fixed size; the number of steps only changes how often the denoiser
runs), so one example per part covers all requests. The pipeline itself, its random weights and its stand-in text
conditioning are in model.py.

Weights: the example's own (``weights/`` beside this file, drawn on first load), or ``DIFFUSION_WEIGHTS_DIR``'s when
it is set: a directory with one ``diffusion*.safetensors`` written by ``python model.py --config NAME --out DIR``,
served at the config recorded in it (the tests serve the tiny config this way).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from cog import Input
from cog import Path as CogPath

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # model.py sits beside this file, wherever the runtime is started from
    sys.path.insert(0, str(HERE))

from model import EXAMPLE, WEIGHTS_DIR, Pipeline, generate, load_config, to_png  # noqa: E402

from compile_cache import CompileConfig, CompiledRunner, Example, ExportSpec, Part  # noqa: E402

MAX_STEPS = 50
WEIGHTS_ENV = os.environ.get("DIFFUSION_WEIGHTS_DIR") or None


class Runner(CompiledRunner):
    # Both units export with their weights kept out (tests/test_diffusion_example.py); jit stays one env var away
    # (COMPILE_CACHE_STRATEGY=jit). Static shapes: every request brings the same ones.
    compile_config = CompileConfig(strategy="export", dynamic=False)
    # The weights served are part of the model version (the cache key): DIFFUSION_WEIGHTS_DIR's when it is set.
    weights_dir = WEIGHTS_ENV or "weights"

    def load(self, weights=None):  # type: ignore[no-untyped-def]
        if WEIGHTS_ENV and not weights:  # another config's weights: its sizes are read from the file
            d = Path(WEIGHTS_ENV)
            self.pipe = pipe = Pipeline(load_config(d), d)
        else:
            self.pipe = pipe = Pipeline(EXAMPLE, Path(weights) if weights else WEIGHTS_DIR)
        latents, t, cond = pipe.denoise_example()
        return {
            "denoiser": Part(pipe.denoiser, examples=[Example((latents, t, cond), label="one step")],
                             export_spec=ExportSpec((latents, t, cond))),
            "decoder": Part(pipe.decoder, examples=[Example((latents,), label="one image")],
                            export_spec=ExportSpec((latents,))),
        }

    def run(
        self,
        prompt: str = Input(description="What to draw (only its first bytes condition the image)",
                            default="a lighthouse at dusk"),
        steps: int = Input(description="Denoising steps", default=8, ge=1, le=MAX_STEPS),
        seed: int = Input(description="Seed of the initial noise", default=0, ge=0),
    ) -> CogPath:
        image = generate(self.pipe, prompt, steps, seed, self.parts["denoiser"], self.parts["decoder"])
        out = Path(tempfile.mkdtemp(prefix="diffusion-")) / "image.png"
        out.write_bytes(to_png(image))
        return CogPath(out)
