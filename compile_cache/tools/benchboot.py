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

A runner with several parts (``load()`` returned ``{name: Part}``: prefill and decode, denoiser and VAE) has no one
callable and no batch sizes of its own: what users get is a ``run()`` request. So requests and latency go through
``run()`` with its default inputs (the schema's defaults: what a request with no inputs gets), eager paired with
compiled by swapping ``self.parts`` for the uncompiled parts in the same wrappers; and each part is timed alone on
the arguments ``run()`` gave it in its first call there (latency tag ``part_<name>``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["example_batch", "select_example", "run_defaults", "main"]

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


def _eager_twin(compiled: Any) -> Any:
    """The same wrapper as a served part (inference mode, attention kernel, memory format), without compiling."""
    from ..compiler import CompiledModel

    return CompiledModel(compiled.eager, compiled.eager, compiled.cfg)


def _paired(compiled: Callable[[], Any], eager: Callable[[], Any], iters: int) -> dict[str, list[float]]:
    """Milliseconds per call, compiled and eager, paired: each iteration times one call of each back to back (the
    order alternating), so both see the same machine load. On a shared machine, eager measured in its own process
    minutes earlier or later drifted by more than the difference being measured. One uncounted warm-up call each
    (compile time is reported apart, as gpt-fast does)."""
    out: dict[str, list[float]] = {"compiled": [], "eager": []}
    for fn in (compiled, eager):
        fn()
    _sync()
    for i in range(iters):
        order = (("compiled", compiled), ("eager", eager)) if i % 2 == 0 else (("eager", eager), ("compiled", compiled))
        for name, fn in order:
            t = time.perf_counter()
            fn()
            _sync()
            out[name].append((time.perf_counter() - t) * 1e3)
    return out


def _latency(p: Any, ex: Any, iters: int) -> dict[str, list[float]]:
    """One part (``p.model``) on a declared example, compiled vs eager (:func:`_paired`)."""
    compiled, eager = p.model, _eager_twin(p.model)
    args, kwargs = _fresh(ex)
    return _paired(lambda: compiled(*args, **kwargs), lambda: eager(*args, **kwargs), iters)


# -- runners with several parts: through run() ------------------------------------------------------------------------
def is_multi_part(p: Any) -> bool:
    """``load()`` returned ``{name: Part}`` (one module is served as the single part ``"model"``)."""
    from ..parts import SINGLE_PART

    return set(p.parts) != {SINGLE_PART}


def run_defaults(p: Any) -> dict[str, Any]:
    """``run()``'s inputs at their declared defaults (``Input(default=...)`` or a plain default), as a request that
    names no input gets them. An input without a default cannot be guessed: a clear error."""
    fn = p.run if callable(getattr(type(p), "run", None)) else p.predict
    out: dict[str, Any] = {}
    for name, param in inspect.signature(fn).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        default = param.default
        if default is not inspect.Parameter.empty and hasattr(default, "default") and hasattr(default, "description"):
            default = default.default  # cog's Input(...): a FieldInfo
        if default is inspect.Parameter.empty or default is None:
            raise ValueError(f"{type(p).__name__}.{fn.__name__}() input {name!r} has no default: the bench calls "
                             "it with its defaults; give every input a default")
        out[name] = default
    return out


def _call_run(p: Any, inputs: dict[str, Any], parts: Any = None) -> Any:
    """One request through ``run()`` (or ``predict()``); with ``parts``, served by those instead of ``p.parts``."""
    fn = p.run if callable(getattr(type(p), "run", None)) else p.predict
    if parts is None:
        return fn(**inputs)
    saved, p.parts = p.parts, parts
    try:
        return fn(**inputs)
    finally:
        p.parts = saved


def _request_path_run(p: Any, inputs: dict[str, Any], n: int) -> dict[str, Any]:
    """``n`` requests through ``run()`` with its default inputs; compiles counted as :func:`_request_path` does."""
    from ..compiler import counts

    fw0, dyn0 = p.metrics.request_path_compiles, counts().compiles
    t = time.monotonic()
    for _ in range(n):
        _call_run(p, inputs)
    _sync()
    return {
        "requests": n,
        "via": "run() with its default inputs",
        "seconds": round(time.monotonic() - t, 3),
        "framework": p.metrics.request_path_compiles - fw0,
        "dynamo_graphs": counts().compiles - dyn0,
    }


def _first_calls(p: Any, inputs: dict[str, Any]) -> dict[str, tuple[tuple[Any, ...], dict[str, Any]]]:
    """Each part's first call in one ``run()`` request: copies of its arguments, taken before the call (a part may
    write into them, as a KV cache is written)."""
    from ..parts import Parts

    seen: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    def recorder(name: str, part: Any) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if name not in seen:
                seen[name] = _fresh(_Call(args, kwargs))
            return part(*args, **kwargs)

        return call

    _call_run(p, inputs, Parts({name: recorder(name, part) for name, part in p.parts.items()}))
    return seen


class _Call:
    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.args, self.kwargs = args, kwargs


def _latency_multi_part(p: Any, inputs: dict[str, Any], iters: int) -> dict[str, Any]:
    """``run`` (one request, compiled parts vs eager parts) and ``part_<name>`` (each part alone, on the arguments
    ``run()`` first gave it), each paired compiled vs eager."""
    from ..compiler import describe_args
    from ..parts import Parts

    eager_parts = Parts({name: _eager_twin(part) for name, part in p.parts.items()})
    lat: dict[str, Any] = {
        "run": {"batch": None, "example": f"run({', '.join(f'{k}={v!r}' for k, v in inputs.items())})"[:120],
                **_paired(lambda: _call_run(p, inputs), lambda: _call_run(p, inputs, eager_parts), iters)},
    }
    for name, (args, kwargs) in _first_calls(p, inputs).items():
        compiled, eager = p.parts[name], eager_parts[name]
        lat[f"part_{name}"] = {
            "batch": None, "example": f"{name} {describe_args(args, kwargs)}",
            **_paired(lambda c=compiled, a=args, k=kwargs: c(*a, **k),
                      lambda e=eager, a=args, k=kwargs: e(*a, **k), iters),
        }
    return lat


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m compile_cache.tools.benchboot")
    ap.add_argument("--predictor", required=True)
    ap.add_argument("--spawned-at", type=float, required=True, help="the parent's time.monotonic() at spawn")
    ap.add_argument("--requests", type=int, default=0, help="request-path run after setup (0: none)")
    ap.add_argument("--latency-iters", type=int, default=0, help="timed calls per batch size (0: no latency)")
    ap.add_argument("--batches", default="1,16", help="batch sizes to time")
    ap.add_argument("--upload-timeout", type=float, default=600.0)
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

    multi = is_multi_part(p)
    out: dict[str, Any] = {
        "process_ready_s": round(ready_s, 3),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "compiled": all(bool(getattr(part, "is_compiled", True)) for part in p.parts.values()),
        "parts": sorted(p.parts) if multi else None,
    }
    # The upload compresses in the background: let it finish so it neither steals CPU from the timings below nor
    # leaves the store half-seeded for the next boot.
    t = time.monotonic()
    p.wait_for_upload(args.upload_timeout)
    out["upload_wait_s"] = round(time.monotonic() - t, 3)
    if multi:
        inputs = run_defaults(p)
        if args.requests > 0:
            out["request_path"] = _request_path_run(p, inputs, args.requests)
        if args.latency_iters > 0:
            out["latency"] = _latency_multi_part(p, inputs, args.latency_iters)
    else:
        examples = list(p.warmup_examples())
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
