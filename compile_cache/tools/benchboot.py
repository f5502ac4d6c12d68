"""One boot of the benchmark in this (fresh) process: setup, request path, latency; prints one JSON line.

    python -m compile_cache.tools.benchboot --predictor FILE.py:CLASS --spawned-at T [--requests N] [--latency-iters N]

Run by :mod:`compile_cache.tools.bench` once per mode, so Dynamo/Inductor state never leaks between modes; the
environment (``COMPILE_CACHE_*``, ``TORCHINDUCTOR_*``) chooses the mode. The last stdout line starting with
``BENCH-BOOT `` is the result.

Requests and latency call ``predictor.model(*example.args, **example.kwargs)`` on fresh copies of the predictor's own
``warmup_examples()``: the exact callable ``predict()`` uses, on the declared shapes, for any CompiledPredictor (no
tokenizer or output conversion timed). Eager latency is timed in the same process, paired with the compiled calls,
through the same wrapper around ``predictor.model.eager`` (the uncompiled model). The example for "batch B" is the
first whose label says ``batch=B``, else whose first tensor argument has B rows; when no example has B rows, the one
with the nearest batch is used and the result says which.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["example_batch", "select_example", "main"]

_BATCH = re.compile(r"\bbatch\s*=\s*(\d+)")
MARKER = "BENCH-BOOT "


def example_batch(ex: Any) -> int | None:
    """The batch size of a warm-up example: ``batch=N`` in its label, else the first tensor argument's dim 0."""
    import torch

    m = _BATCH.search(getattr(ex, "label", "") or "")
    if m:
        return int(m.group(1))
    for a in (*ex.args, *(ex.kwargs or {}).values()):
        if isinstance(a, torch.Tensor) and a.dim() > 0:
            return int(a.shape[0])
    return None


def select_example(examples: Sequence[Any], batch: int) -> tuple[Any, int]:
    """(example, its batch): the first with exactly ``batch`` rows, else the one with the nearest batch."""
    sized = [(ex, b) for ex in examples if (b := example_batch(ex)) is not None]
    if not sized:
        raise ValueError("no warm-up example has a tensor argument: cannot pick a batch size")
    exact = [p for p in sized if p[1] == batch]
    return exact[0] if exact else min(sized, key=lambda p: (abs(p[1] - batch), -p[1]))


def _fresh(ex: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """New tensors with the same shapes and strides, as a request would bring (not the warm-up's own objects)."""
    import torch

    def one(x: Any) -> Any:
        return x.clone() if isinstance(x, torch.Tensor) else x

    return tuple(one(a) for a in ex.args), {k: one(v) for k, v in (ex.kwargs or {}).items()}


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _request_path(p: Any, examples: Sequence[Any], n: int) -> dict[str, Any]:
    """``n`` requests round-robin over the declared shapes; compiles counted by the framework's own counter
    (``metrics.request_path_compiles``, fed by CompiledModel) and, as a cross-check, Dynamo's ``unique_graphs``."""
    from ..compiler import counts

    fw0, dyn0 = p.metrics.request_path_compiles, counts().compiles
    t = time.monotonic()
    for i in range(n):
        args, kwargs = _fresh(examples[i % len(examples)])
        p.model(*args, **kwargs)
    _sync()
    return {
        "requests": n,
        "seconds": round(time.monotonic() - t, 3),
        "framework": p.metrics.request_path_compiles - fw0,
        "dynamo_graphs": counts().compiles - dyn0,
    }


def _latency(p: Any, ex: Any, iters: int) -> dict[str, list[float]]:
    """Milliseconds per call, compiled and eager, paired: each iteration times one call of each back to back (the
    order alternating), so both see the same machine load. On a shared machine, eager measured in its own process
    minutes earlier or later drifted by more than the difference being measured. One uncounted warm-up call each
    (compile time is reported apart, as gpt-fast does)."""
    from ..compiler import CompiledModel

    compiled = p.model
    # The same wrapper as the served model (inference mode, attention kernel, memory format), without compiling.
    eager = CompiledModel(compiled.eager, compiled.eager, compiled.cfg)
    args, kwargs = _fresh(ex)
    out: dict[str, list[float]] = {"compiled": [], "eager": []}
    for fn in (compiled, eager):
        fn(*args, **kwargs)
    _sync()
    for i in range(iters):
        order = (("compiled", compiled), ("eager", eager)) if i % 2 == 0 else (("eager", eager), ("compiled", compiled))
        for name, fn in order:
            t = time.perf_counter()
            fn(*args, **kwargs)
            _sync()
            out[name].append((time.perf_counter() - t) * 1e3)
    return out


def _max_abs_diff(p: Any, examples: Sequence[Any]) -> float:
    """The largest absolute difference between the served model's outputs and its eager model's (the same wrapper,
    uncompiled: the weights this process loaded) over every warm-up example."""
    import torch
    from torch.utils import _pytree as pytree

    from .compiler import CompiledModel

    eager = CompiledModel(p.model.eager, p.model.eager, p.model.cfg)
    worst = 0.0
    for ex in examples:
        args, kwargs = _fresh(ex)
        got, want = pytree.tree_leaves(p.model(*args, **kwargs)), pytree.tree_leaves(eager(*args, **kwargs))
        if len(got) != len(want):
            return float("inf")
        for a, b in zip(got, want, strict=True):
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                worst = max(worst, float((a.double() - b.double()).abs().max()) if a.numel() else 0.0)
    return worst


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m compile_cache.tools.benchboot")
    ap.add_argument("--predictor", required=True)
    ap.add_argument("--spawned-at", type=float, required=True, help="the parent's time.monotonic() at spawn")
    ap.add_argument("--requests", type=int, default=0, help="request-path run after setup (0: none)")
    ap.add_argument("--latency-iters", type=int, default=0, help="timed calls per batch size (0: no latency)")
    ap.add_argument("--batches", default="1,16", help="batch sizes to time")
    ap.add_argument("--upload-timeout", type=float, default=600.0)
    ap.add_argument("--check-eager", action="store_true",
                    help="compare the served model with its eager model on every warm-up example (max_abs_diff)")
    args = ap.parse_args(argv)

    from ..cli import load_predictor  # the Cog runtime's own loader: same module name, same FX-graph cache keys

    p = load_predictor(args.predictor)
    weights = os.environ.get("COG_WEIGHTS")
    if weights:  # what Cog passes to setup()
        p.setup(weights)
    else:
        p.setup()
    ready_s = time.monotonic() - args.spawned_at  # CLOCK_MONOTONIC is system-wide: comparable across processes

    import torch

    out: dict[str, Any] = {
        "process_ready_s": round(ready_s, 3),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "compiled": bool(getattr(p.model, "is_compiled", True)),
    }
    # The upload compresses in the background: let it finish so it neither steals CPU from the timings below nor
    # leaves the store half-seeded for the next boot.
    t = time.monotonic()
    p.wait_for_upload(args.upload_timeout)
    out["upload_wait_s"] = round(time.monotonic() - t, 3)
    examples = list(p.warmup_examples())
    if args.check_eager:
        out["max_abs_diff"] = _max_abs_diff(p, examples)
    if args.requests > 0:
        out["request_path"] = _request_path(p, examples, args.requests)
    if args.latency_iters > 0:
        lat = {}
        for want in (int(b) for b in args.batches.split(",")):
            ex, got = select_example(examples, want)
            lat[str(want)] = {"batch": got, "example": ex.describe(), **_latency(p, ex, args.latency_iters)}
        out["latency"] = lat
    out["metrics"] = p.metrics.to_dict()  # after the upload and requests: upload state and request compiles final
    sys.stdout.write(MARKER + json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
