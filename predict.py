"""Example: all-MiniLM-L6-v2 sentence embeddings, compiled, booting warm from the compile cache.

Input: ``text``, one sentence per line. Output: one 384-float, unit-norm embedding per line (mean pooling over the
attention mask, then L2 normalisation, as sentence-transformers does).

Default strategy: ``export`` — one AOTInductor package serves every batch (1-64) and sequence length (2-256), loads
without Dynamo, and lives in the store (code only: the weights come from ``weights/``). With
``COMPILE_CACHE_STRATEGY=jit`` requests are padded to a small set of (batch, sequence) buckets instead, and warm-up
runs every bucket, so no request ever compiles (``torch.compile`` specialises on shapes).

``BatchedRunner`` serves the same model with an async ``run()`` whose concurrent predictions are joined into one model
call (``COG_MAX_CONCURRENCY`` > 1, e.g. ``COG_PREDICT_TYPE_STUB=predict.py:BatchedRunner``; docs/runner.md, Batching).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from cog import Input

from compile_cache import Batch, CompileConfig, CompiledRunner, Dim, Example, ExportSpec

WEIGHTS_DIR = Path(os.environ.get("MODEL_WEIGHTS_DIR", "weights/all-MiniLM-L6-v2"))
MAX_BATCH = 64  # export: the package's batch dim is 1..MAX_BATCH
BATCH_BUCKETS = (1, 16)
SEQ_BUCKETS = (64, 256)  # 256 = the model's max_seq_length (sentence_bert_config.json)
DEFAULT_TEXT = "A man is eating food.\nA man is eating a piece of bread.\nThe new movie is awesome."


class SentenceEncoder(torch.nn.Module):
    """BERT encoder + mean pooling + L2 norm in one module, so the whole thing compiles into one graph."""

    def __init__(self, bert: torch.nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)


def bucket(n: int, buckets: tuple[int, ...]) -> int:
    return next(b for b in buckets if b >= n)


class Runner(CompiledRunner):
    # export measured best on this model (docs/benchmarks.md); jit stays one env var away.
    compile_config = CompileConfig(strategy="export", dynamic=False)
    weights_dir = str(WEIGHTS_DIR)

    def load(self, weights=None):  # type: ignore[no-untyped-def]
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # its load report lists the pooler we leave out on purpose

        path = Path(weights) if weights else WEIGHTS_DIR
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"no model in {path}: run `make weights` (scripts/fetch_weights.py)")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        # No pooler: sentence embeddings mean-pool the hidden states (and an unused layer's weights would be
        # folded into an exported package's code instead of being loaded from weights/).
        bert = AutoModel.from_pretrained(path, attn_implementation="sdpa", add_pooling_layer=False)
        return SentenceEncoder(bert).eval()

    def _batch(self, sentences: list[str], batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(sentences, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        if len(sentences) < batch:  # pad the batch with empty rows (mask 0); their outputs are dropped
            pad = batch - len(sentences)
            ids = torch.cat([ids, torch.zeros(pad, seq, dtype=ids.dtype)])
            mask = torch.cat([mask, torch.zeros(pad, seq, dtype=mask.dtype)])
        return ids, mask

    def warmup_examples(self) -> list[Example]:
        return [
            Example(self._batch(["warm up"], b, s), label=f"batch={b} seq={s}")
            for b in BATCH_BUCKETS
            for s in SEQ_BUCKETS
        ]

    def export_spec(self) -> ExportSpec:
        batch, seq = Dim("batch", 1, MAX_BATCH), Dim("seq", 2, SEQ_BUCKETS[-1])
        example = torch.ones(4, 16, dtype=torch.int64)  # sizes inside the dims, distinct per dim (see export.py)
        return ExportSpec((example, example.clone()), {0: {0: batch, 1: seq}, 1: {0: batch, 1: seq}})

    def exact_shapes(self) -> bool:
        """One package (export) or the eager model (compile off, or a build still pending) serves every shape: no
        padding to buckets, which only a compiled jit model needs."""
        return self.model.strategy == "export" or not self.model.is_compiled

    def embed(self, sentences: list[str]) -> list[list[float]]:
        exact = self.exact_shapes()
        out: list[list[float]] = []
        step = MAX_BATCH if exact else BATCH_BUCKETS[-1]
        for i in range(0, len(sentences), step):
            chunk = sentences[i : i + step]
            ids = self.tokenizer(chunk, truncation=True, max_length=SEQ_BUCKETS[-1])["input_ids"]
            longest = max(len(t) for t in ids)
            if exact:
                shape = (len(chunk), max(longest, 2))
            else:
                shape = (bucket(len(chunk), BATCH_BUCKETS), bucket(longest, SEQ_BUCKETS))
            out += self.model(*self._batch(chunk, *shape))[: len(chunk)].tolist()
        return out

    def run(self, text: str = Input(description="One sentence per line", default=DEFAULT_TEXT)) -> list[list[float]]:
        sentences = [s.strip() for s in text.splitlines() if s.strip()]
        if not sentences:
            raise ValueError("text is empty: give at least one non-blank line")
        return self.embed(sentences)


class BatchedRunner(Runner):
    """``Runner`` with an async ``run()``: each prediction's sentences ride in one model call with those of the
    predictions that arrive within 5 ms, up to 16 rows."""

    compile_config = Runner.compile_config.model_copy(update={"batch": Batch(max_size=16, max_delay_ms=5)})

    def setup(self, weights: object = None) -> None:
        # The collate reads what serves (exact_shapes), so it is this runner's own method, bound here.
        batch = self.compile_config.batch.model_copy(update={"collate": self.collate})  # type: ignore[union-attr]
        self.compile_config = self.compile_config.model_copy(update={"batch": batch})
        super().setup(weights)

    def collate(self, calls: list[tuple[tuple[torch.Tensor, torch.Tensor], dict]]) -> tuple[tuple, dict, list[int]]:
        """Joins requests' (token ids, mask), each padded (id 0, mask 0) to the longest: to its length where one
        package or the eager model serves every shape, else to its length bucket (a jit warm-up length); the batcher
        then pads or splits the rows to declared batch sizes."""
        longest = max(ids.shape[1] for (ids, _), _ in calls)
        seq = max(longest, 2) if self.exact_shapes() else bucket(longest, SEQ_BUCKETS)

        def pad(t: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, seq - t.shape[1]))

        joined = tuple(torch.cat([pad(args[i]) for args, _ in calls]) for i in (0, 1))
        return joined, {}, [args[0].shape[0] for args, _ in calls]

    async def run(  # type: ignore[override]
        self, text: str = Input(description="One sentence per line", default=DEFAULT_TEXT)
    ) -> list[list[float]]:
        sentences = [s.strip() for s in text.splitlines() if s.strip()]
        if not sentences:
            raise ValueError("text is empty: give at least one non-blank line")
        enc = self.tokenizer(sentences, padding=True, truncation=True, max_length=SEQ_BUCKETS[-1], return_tensors="pt")
        out = await self.model.batched(enc["input_ids"], enc["attention_mask"])
        return out.tolist()
