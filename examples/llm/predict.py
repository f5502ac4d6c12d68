"""Example: greedy text generation with a Llama-style decoder, prefill and decode compiled as two parts.

Inputs ``prompt`` and ``max_new_tokens``; output the generated text. The model (``model.py``) is transformers'
``LlamaForCausalLM`` with a static KV cache; ``prefill`` reads the prompt (1-256 tokens, one dynamic dim) and
``decode`` one token per step (one static shape for every step). Both parts use the ``export`` strategy: one
AOTInductor package each, restored from the store on a warm boot and loaded without Dynamo. If a part does not
export it falls back alone to ``jit`` (prefill compiled with a dynamic prompt length, decode static), then eager.

The weights are deterministic random ones, made in ``weights/`` on the first boot (``model.ensure_weights``, the code
``make_weights.py`` runs; see README.md): the text is noise, the compile path is real. Greedy tokens equal eager generation's (tests/test_llm_example.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from cog import Input

from compile_cache import CompileConfig, CompiledRunner, Dim, Example, ExportSpec, Part

# model.py sits beside this file; Cog imports this file by path, so its directory is not on sys.path by itself.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import (  # noqa: E402
    BOS,
    Bounds,
    ByteTokenizer,
    Decode,
    Prefill,
    ensure_weights,
    greedy,
    load_model,
    new_cache,
    prefill_inputs,
)

OWN_WEIGHTS = Path(__file__).resolve().parent / "weights"
WEIGHTS_DIR = Path(os.environ.get("LLM_WEIGHTS_DIR", OWN_WEIGHTS))
BOUNDS = Bounds(max_prompt=256, max_new=128)
EXAMPLE_PROMPT = 13  # tokens in the warm-up / export example: >= 2, and unlike any static size


class Runner(CompiledRunner):
    compile_config = CompileConfig(strategy="export", dynamic=False)
    # The weights served are part of the model version (the cache key): LLM_WEIGHTS_DIR's when it is set.
    weights_dir = str(WEIGHTS_DIR)

    def load(self, weights=None):  # type: ignore[no-untyped-def]
        weights_dir = Path(weights) if weights else WEIGHTS_DIR
        if weights_dir == OWN_WEIGHTS:  # the example's own random weights, made on first boot; never in a dir given
            ensure_weights(weights_dir)
        self.lm = load_model(weights_dir)
        self.tokenizer = ByteTokenizer()
        config = self.lm.config
        prompt = prefill_inputs([BOS] * EXAMPLE_PROMPT, BOUNDS, bucketed=False)
        prefill_args = (*prompt, *new_cache(config, BOUNDS.max_len))
        decode_args = (torch.zeros(1, 1, dtype=torch.long), torch.tensor([EXAMPLE_PROMPT]),
                       *new_cache(config, BOUNDS.max_len))
        return {
            # One dynamic dim, the prompt length: one package (or, on the jit fallback, one dynamic graph) serves
            # every prompt. Measured against one static graph per bucket in README.md.
            "prefill": Part(
                Prefill(self.lm),
                examples=[Example(prefill_args, label=f"prompt={EXAMPLE_PROMPT} (dynamic)")],
                export_spec=ExportSpec(prefill_args, {0: {1: Dim("prompt", 2, BOUNDS.max_prompt)}}),
                dynamic=True,
            ),
            "decode": Part(
                Decode(self.lm),
                examples=[Example(decode_args, label="one token")],
                export_spec=ExportSpec(decode_args),
            ),
        }

    def run(
        self,
        prompt: str = Input(description="text to continue", default="Once upon a time"),
        max_new_tokens: int = Input(description="tokens to generate", default=32, ge=1, le=BOUNDS.max_new),
    ) -> str:
        ids = self.tokenizer.encode(prompt)
        if len(ids) > BOUNDS.max_prompt:
            raise ValueError(f"the prompt is {len(ids) - 1} bytes; this model takes at most {BOUNDS.max_prompt - 1}")
        out = greedy(self.parts["prefill"], self.parts["decode"], ids, max_new_tokens, self.lm.config, BOUNDS,
                     bucketed=False)
        return self.tokenizer.decode(out)
