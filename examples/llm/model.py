"""The LLM example's model: a Llama-style decoder (transformers ``LlamaForCausalLM``) served as two compilable parts.

* ``Prefill`` reads the whole prompt once, fills the KV cache, and returns the logits of the next token.
* ``Decode`` reads one token at one position, writes its keys/values into the cache, and returns the next logits.

Both are ``nn.Module``s whose every input is a tensor, and whose only state besides the weights is the KV cache,
passed in explicitly (``k_cache``/``v_cache``: ``[layers, batch, kv heads, max_len, head dim]``, written in place at
the given positions). The cache is static: its shape never changes, so ``Decode`` has one shape for a whole
generation (the position is a tensor, not a Python int: no recompile per step), and ``Prefill`` has one shape per
prompt length bucket (or one dynamic dim). Attention always spans the whole cache, masked to the positions written
so far; cache slots past the current position hold zeros or stale values that the mask hides, and are overwritten
before they become visible.

The decoder layers, rotary embedding, norms and heads are transformers' own (``LlamaDecoderLayer`` etc.); only the
cache (a duck-typed ``Cache`` that writes into the given tensors) and the mask are ours. ``greedy`` drives the two
parts; ``tests/test_llm_example.py`` checks it gives the same tokens as ``LlamaForCausalLM.generate``.

The tokenizer is bytes: UTF-8 bytes are ids 0-255, then BOS, EOS and PAD. No tokenizer files, nothing from a hub.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

BOS, EOS, PAD = 256, 257, 258
VOCAB = 259


# -- configs and weights ------------------------------------------------------------------------------------------------
def example_config() -> LlamaConfig:
    """The example's model: 6 layers, hidden 512, 8 query / 4 key-value heads (GQA), ~19 M parameters (76 MB fp32)."""
    return _config(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
                   num_key_value_heads=4, max_position_embeddings=1024)


def small_config() -> LlamaConfig:
    """For ``scripts/gpu_check`` on a GPU: the example's widths with 4 layers (~14 M parameters): big enough that
    kernels matter, few enough layers that a cold compile fits the check's time budget."""
    return _config(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=4, max_position_embeddings=1024)


def tiny_config() -> LlamaConfig:
    """For tests: 2 layers, hidden 64."""
    return _config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256)


def _config(**kw: Any) -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                       tie_word_embeddings=False, attn_implementation="sdpa", torch_dtype="float32",
                       initializer_range=0.05, **kw)


def random_model(config: LlamaConfig, seed: int = 0) -> LlamaForCausalLM:
    """Deterministic random weights (transformers' own init under a fixed seed)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


CONFIGS: dict[str, Callable[[], LlamaConfig]] = {"example": example_config, "small": small_config, "tiny": tiny_config}


def save_weights(out: str | Path, config: str = "example", seed: int = 0) -> LlamaForCausalLM:
    """Write ``config``'s deterministic random weights to ``out`` as ``config.json`` + ``model.safetensors``.

    The same bytes on every machine with the same torch and transformers, so the cache key (which hashes the weights
    dir) is the same whoever makes them. The files are written into a dot-dir inside ``out`` (the key skips dot-files)
    and renamed into place, ``config.json`` last: a reader that finds ``config.json`` finds the whole model."""
    model = random_model(CONFIGS[config](), seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".incomplete-", dir=out))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):
            f.chmod(0o644)  # readable by the serving user when written at image build time
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model


def ensure_weights(path: str | Path, config: str = "example", seed: int = 0) -> bool:
    """Make the random weights in ``path`` unless a model is there already; True if this call made them.

    Under a file lock, so processes booting at once make them once; correctness comes from ``save_weights``' renames,
    the lock only saves duplicate work."""
    from filelock import FileLock

    path = Path(path)
    if (path / "config.json").exists():
        return False
    path.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path / ".make_weights.lock")):
        if (path / "config.json").exists():
            return False
        logging.getLogger("compile_cache").info("no model in %s: writing the example's random weights (seed %d)",
                                                path, seed)
        save_weights(path, config, seed)
    return True


def load_model(path: str | Path) -> LlamaForCausalLM:
    """The model saved in ``path`` (``config.json`` + ``model.safetensors``), from local files only."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no model in {path}: run `python examples/llm/make_weights.py` first")
    return LlamaForCausalLM.from_pretrained(path, local_files_only=True, attn_implementation="sdpa",
                                            dtype=torch.float32).eval()


# -- tokenizer ------------------------------------------------------------------------------------------------------
class ByteTokenizer:
    """UTF-8 bytes as token ids; BOS first. Ids that are not bytes (EOS, PAD) decode to nothing."""

    def encode(self, text: str) -> list[int]:
        return [BOS, *text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


# -- bounds ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Bounds:
    """What requests may ask: prompts of ``1..max_prompt`` tokens (BOS included), ``1..max_new`` new tokens.
    ``buckets``: the prompt lengths prefill is compiled for (a prompt is padded up to the next one)."""

    max_prompt: int = 256
    max_new: int = 128
    buckets: tuple[int, ...] = (32, 64, 128, 256)

    def __post_init__(self) -> None:
        if not self.buckets or list(self.buckets) != sorted(set(self.buckets)) or self.buckets[-1] != self.max_prompt:
            raise ValueError(f"buckets must be increasing and end at max_prompt={self.max_prompt}: {self.buckets}")

    @property
    def max_len(self) -> int:
        """The KV cache's length: the longest prompt plus the most new tokens."""
        return self.max_prompt + self.max_new

    def bucket(self, n: int) -> int:
        if not 1 <= n <= self.max_prompt:
            raise ValueError(f"the prompt is {n} tokens; this model takes 1 to {self.max_prompt}")
        return next(b for b in self.buckets if b >= n)


def new_cache(config: LlamaConfig, max_len: int, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed static KV cache tensors ``(k, v)``, each ``[layers, batch, kv heads, max_len, head dim]``."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len, head_dim)
    return torch.zeros(shape), torch.zeros(shape)


# -- the two parts --------------------------------------------------------------------------------------------------
class _TensorCache:
    """What ``LlamaAttention`` needs of a ``Cache``: ``update`` writes this step's keys/values at ``positions`` into
    the static tensors (in place) and returns the layer's whole cache."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        self.k, self.v, self.positions = k, v, positions

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.k[layer_idx], self.v[layer_idx]
        k.index_copy_(2, self.positions, key_states)
        v.index_copy_(2, self.positions, value_states)
        return k, v


def _decoder(lm: LlamaForCausalLM, input_ids: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
             v_cache: torch.Tensor) -> torch.Tensor:
    """Hidden states ``[batch, T, hidden]`` of ``input_ids`` ``[batch, T]`` at ``positions`` ``[T]`` (the same for
    every row), attending to every cache slot at or before each query's position."""
    model = lm.model
    batch, t = input_ids.shape
    hidden = model.embed_tokens(input_ids)
    position_ids = positions.unsqueeze(0).expand(batch, t)
    cos_sin = model.rotary_emb(hidden, position_ids)
    slots = torch.arange(k_cache.shape[3], device=input_ids.device)
    mask = (slots.unsqueeze(0) <= positions.unsqueeze(1)).view(1, 1, t, -1)  # True: attend
    cache = _TensorCache(k_cache, v_cache, positions)
    for layer in model.layers:
        hidden = layer(hidden, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                       position_embeddings=cos_sin)
    return model.norm(hidden)


class Prefill(torch.nn.Module):
    """``(input_ids [B, S], length [B], k_cache, v_cache) -> logits [B, vocab]`` of the token after position
    ``length - 1``. ``input_ids`` may be padded on the right past ``length`` (a bucket); all rows share the same
    positions ``0..S-1``."""

    def __init__(self, lm: LlamaForCausalLM) -> None:
        super().__init__()
        self.lm = lm
        self.train(lm.training)

    def forward(self, input_ids: torch.Tensor, length: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden = _decoder(self.lm, input_ids, positions, k_cache, v_cache)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), length - 1]  # [B, hidden]
        return self.lm.lm_head(last)


class Decode(torch.nn.Module):
    """``(token [B, 1], position [1], k_cache, v_cache) -> logits [B, vocab]`` of the token after ``token``, which
    sits at ``position`` (the same for every row)."""

    def __init__(self, lm: LlamaForCausalLM) -> None:
        super().__init__()
        self.lm = lm
        self.train(lm.training)

    def forward(self, token: torch.Tensor, position: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor) -> torch.Tensor:
        return self.lm.lm_head(_decoder(self.lm, token, position, k_cache, v_cache)[:, -1])


# -- generation -----------------------------------------------------------------------------------------------------
Fn = Callable[..., torch.Tensor]


def prefill_inputs(prompt_ids: Sequence[int], bounds: Bounds, *, bucketed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [1, S], length [1])`` for a prompt: padded with PAD up to its bucket when ``bucketed``, else
    exactly the prompt (at least 2 long: torch.export and dynamic shapes treat a size of 1 as a constant)."""
    n = len(prompt_ids)
    size = bounds.bucket(n) if bucketed else max(n, 2)  # bucket() also refuses a prompt out of bounds
    if not bucketed:
        bounds.bucket(n)
    ids = list(prompt_ids) + [PAD] * (size - n)
    return torch.tensor([ids], dtype=torch.long), torch.tensor([n], dtype=torch.long)


def part_examples(config: LlamaConfig, bounds: Bounds, prompt_len: int,
                  batch: int = 1) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Warm-up inputs of both parts at ``batch`` rows, each with its own zeroed cache: prefill of a prompt of
    ``prompt_len`` BOS tokens (unpadded), and decode of one token at position ``prompt_len``. Every tensor is its own
    (``repeat``, not ``expand(...).contiguous()``, which at one row returns a view): Dynamo guards on a view's base,
    so a graph warmed up on a view misses every request's ordinary tensor (measured: batch-1 prefill served eager)."""
    ids, length = prefill_inputs([BOS] * prompt_len, bounds, bucketed=False)
    prefill_args = (ids.repeat(batch, 1), length.repeat(batch), *new_cache(config, bounds.max_len, batch))
    decode_args = (torch.zeros(batch, 1, dtype=torch.long), torch.tensor([prompt_len]),
                   *new_cache(config, bounds.max_len, batch))
    return prefill_args, decode_args

def greedy(prefill: Fn, decode: Fn, prompt_ids: Sequence[int], max_new_tokens: int, config: LlamaConfig,
           bounds: Bounds, *, bucketed: bool = True, stop_at_eos: bool = True) -> list[int]:
    """Greedy generation: up to ``max_new_tokens`` new token ids (stopping after EOS when ``stop_at_eos``).

    ``prefill`` and ``decode`` are the parts as called (eager modules, compiled ones, or exported packages)."""
    return greedy_batch(prefill, decode, [prompt_ids], max_new_tokens, config, bounds, bucketed=bucketed,
                        stop_at_eos=stop_at_eos)[0]


@torch.inference_mode()
def greedy_batch(prefill: Fn, decode: Fn, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 config: LlamaConfig, bounds: Bounds, *, bucketed: bool = True,
                 stop_at_eos: bool = True) -> list[list[int]]:
    """Greedy generation for a batch of prompts of one length (the parts share one position per step across rows):
    up to ``max_new_tokens`` new ids per prompt. With ``stop_at_eos`` a row ends after its EOS, and generation stops
    once every row has ended. One prompt: exactly :func:`greedy`."""
    if not prompts or len({len(p) for p in prompts}) != 1:
        lengths = [len(p) for p in prompts]
        raise ValueError(f"greedy_batch takes one or more prompts of one length, got lengths {lengths}")
    if not 1 <= max_new_tokens <= bounds.max_new:
        raise ValueError(f"max_new_tokens is {max_new_tokens}; this model takes 1 to {bounds.max_new}")
    rows = [prefill_inputs(p, bounds, bucketed=bucketed) for p in prompts]
    ids, length = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
    # The cache is made outside inference mode, as the parts' warm-up examples are: a served jit/eager part copies an
    # inference-tensor input to an ordinary one before the call (Dynamo guards on the difference), and the parts'
    # writes would then go into that copy, not into this cache.
    with torch.inference_mode(False):
        k, v = new_cache(config, bounds.max_len, len(prompts))
    token = prefill(ids, length, k, v).argmax(-1, keepdim=True)  # [B, 1]
    steps, ended = [token], token[:, 0] == EOS
    n = len(prompts[0])
    for i in range(max_new_tokens - 1):
        if stop_at_eos and bool(ended.all()):
            break
        position = torch.tensor([n + i], dtype=torch.long)
        token = decode(token, position, k, v).argmax(-1, keepdim=True)
        steps.append(token)
        ended |= token[:, 0] == EOS
    out = torch.cat(steps, 1).tolist()
    if stop_at_eos:
        out = [row[: row.index(EOS) + 1] if EOS in row else row for row in out]
    return out
