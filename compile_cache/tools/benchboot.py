"""One boot of the benchmark in this (fresh) process: setup, request path, latency; prints one JSON line.

    python -m compile_cache.tools.benchboot --predictor FILE.py:CLASS --spawned-at T [--requests N] [--latency-iters N]
        [--check-outputs] [--counters] [--table1-iters N]

Run by :mod:`compile_cache.tools.bench` and :mod:`compile_cache.tools.gpucheck` once per boot, so Dynamo/Inductor
state never leaks between boots; the environment (``COMPILE_CACHE_*``, ``TORCHINDUCTOR_*``) chooses the mode. The
last stdout line starting with ``BENCH-BOOT `` is the result.

Requests and latency call each served part (``runner.model`` for one part, ``runner.parts[name]`` for several) on
fresh copies of the part's own declared examples (``warmup_examples()``, or the ``Part(examples=...)`` that
``load()`` returned; an export part without examples: its spec's example): the exact callables ``run()`` uses, on the
declared shapes (no tokenizer or output conversion timed). Exception: a runner with several parts is measured as
a request by default (``make bench``): requests and latency go through ``run()`` with its default inputs, and each
part is timed alone on the arguments ``run()`` gave it; ``--per-part`` (the GPU check) times the parts instead. Eager latency is timed in the same process, paired with the
compiled calls, through the same wrapper around each part's uncompiled module. The example for "batch B" is the
first whose label says ``batch=B``, else whose first tensor argument has B rows; when no example has B rows, the one
with the nearest batch is used and the result says which. With several parts, one latency sample is one call of
every part at that batch (the sum), and each part's own samples are kept beside it.

``--check-outputs`` compares every part's compiled output with its eager output on every declared example;
``--counters`` counts what a warm boot should not do (autotune benchmarks, Triton kernels the FX-graph cache's
bundle wrote vs compiled, CUDA graphs skipped); ``--table1-iters`` times the runner's own ``generate(parts, batch)``
for each of its ``table1_modes()`` (which parts run compiled), at each of ``--batches``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ToolError

__all__ = ["example_batch", "select_example", "served_parts", "main"]

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


def served_parts(p: Any, declared: dict[str, list[Any]]) -> dict[str, tuple[Any, list[Any]]]:
    """``{part name: (served callable, its examples)}``: ``runner.model`` and ``warmup_examples()`` for a runner of
    one module, ``runner.parts`` and the examples ``load()`` declared (captured by :func:`_capture_declared`)."""
    parts = getattr(p, "parts", None)
    if parts is None or getattr(p, "_single", True):
        return {"model": (p.model, list(p.warmup_examples()))}
    return {name: (parts[name], declared.get(name, [])) for name in parts}


def _capture_declared(p: Any) -> dict[str, list[Any]]:
    """Wrap ``p.load`` so the parts it returns leave their examples here (the runner keeps only the served
    callables). An export part declared without examples: its spec's example args."""
    from collections.abc import Mapping

    from ..compiler import Example

    declared: dict[str, list[Any]] = {}
    load = p.load

    def capture(*args: Any, **kwargs: Any) -> Any:
        out = load(*args, **kwargs)
        if isinstance(out, Mapping):
            for name, part in out.items():
                ex = list(getattr(part, "examples", []))
                spec = getattr(part, "export_spec", None)
                if not ex and spec is not None:
                    ex = [Example(tuple(spec.example_args), label="export spec example")]
                declared[name] = ex
        return out

    p.load = capture
    return declared


def _request_path(p: Any, served: dict[str, tuple[Any, list[Any]]], n: int) -> dict[str, Any]:
    """``n`` requests round-robin over every part's declared shapes; compiles counted by the framework's own
    counter (``metrics.request_path_compiles``, fed by CompiledModel) and, as a cross-check, Dynamo's
    ``unique_graphs``."""
    from ..compiler import counts

    calls = [(model, ex) for model, examples in served.values() for ex in examples]
    fw0, dyn0 = p.metrics.request_path_compiles, counts().compiles
    t = time.monotonic()
    for i in range(n):
        model, ex = calls[i % len(calls)]
        args, kwargs = _fresh(ex)
        model(*args, **kwargs)
    _sync()
    return {
        "requests": n,
        "seconds": round(time.monotonic() - t, 3),
        "framework": p.metrics.request_path_compiles - fw0,
        "dynamo_graphs": counts().compiles - dyn0,
    }


def _eager_twin(compiled: Any) -> Any:
    """The same wrapper as the served part (inference mode, attention kernel, memory format), without compiling."""
    from ..compiler import CompiledModel

    return CompiledModel(compiled.eager, compiled.eager, compiled.cfg, name=compiled.name)


def _latency(calls: dict[str, tuple[Any, Any]], iters: int) -> dict[str, Any]:
    """Milliseconds per call, compiled and eager, paired: each iteration times one call of each back to back (the
    order alternating), so both see the same machine load. On a shared machine, eager measured in its own process
    minutes earlier or later drifted by more than the difference being measured. One uncounted warm-up call each
    (compile time is reported apart, as gpt-fast does). ``calls``: ``{part: (served callable, example)}``; a sample
    is one call of every part (the sum), each part's own samples under ``parts``."""
    runs = {}
    for name, (compiled, ex) in calls.items():
        args, kwargs = _fresh(ex)
        runs[name] = (compiled, _eager_twin(compiled), args, kwargs)
        for fn in runs[name][:2]:
            fn(*args, **kwargs)
    _sync()
    out: dict[str, Any] = {"compiled": [], "eager": []}
    per: dict[str, dict[str, list[float]]] = {n: {"compiled": [], "eager": []} for n in runs}
    for i in range(iters):
        total = {"compiled": 0.0, "eager": 0.0}
        for name, (compiled, eager, args, kwargs) in runs.items():
            order = (("compiled", compiled), ("eager", eager))
            for who, fn in order if i % 2 == 0 else order[::-1]:
                t = time.perf_counter()
                fn(*args, **kwargs)
                _sync()
                ms = (time.perf_counter() - t) * 1e3
                per[name][who].append(ms)
                total[who] += ms
        for who in total:
            out[who].append(total[who])
    if len(runs) > 1:
        out["parts"] = per
    return out


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


def _outputs(served: dict[str, tuple[Any, list[Any]]], rtol: float, atol: float) -> dict[str, Any]:
    """Each part's compiled output vs its eager output on every declared example (fresh inputs for both: parts may
    write into their inputs, e.g. a KV cache). Outputs are copied at once: a CUDA-graph output is overwritten by
    the next replay."""
    import torch
    from torch.utils._pytree import tree_flatten

    def flat(x: Any) -> list[Any]:
        return [t.detach().clone() if isinstance(t, torch.Tensor) else t for t in tree_flatten(x)[0]]

    res: dict[str, Any] = {}
    for name, (compiled, examples) in served.items():
        eager = _eager_twin(compiled)
        worst, ok = 0.0, True
        for ex in examples:
            a, k = _fresh(ex)
            got = flat(compiled(*a, **k))
            a, k = _fresh(ex)
            want = flat(eager(*a, **k))
            if len(got) != len(want):
                ok = False
                continue
            for g, w in zip(got, want, strict=True):
                if isinstance(g, torch.Tensor) and isinstance(w, torch.Tensor):
                    same = g.shape == w.shape and g.dtype == w.dtype
                    if same and g.numel():
                        diff = (g.double() - w.double()).abs().max().item()
                        worst = max(worst, diff)
                        same = bool(torch.allclose(g.double(), w.double(), rtol=rtol, atol=atol))
                    ok = ok and same
                else:
                    ok = ok and g == w
        res[name] = {"match": ok, "max_abs_diff": worst, "examples": len(examples)}
    return {"match": all(r["match"] for r in res.values()), "rtol": rtol, "atol": atol, "parts": res}


class _Counters:
    """What a warm boot should not do, counted in this process. ``select_algorithm_autotune``: Inductor's
    benchmarks of GEMM/conv choices (``max-autotune``) while lowering; ``runtime_autotunes``: Triton kernels whose
    launch configs were benchmarked at their first call (``CachingAutotuner.benchmark_all_configs``);
    ``triton_emitted``: Triton kernel dirs the FX-graph cache's bundle wrote on a hit (restored, not compiled);
    ``cudagraph_skips``: graphs that ``reduce-overhead`` ran without CUDA graphs (Inductor logs why)."""

    def __init__(self) -> None:
        self.runtime_autotunes = 0
        self.emitted: set[str] = set()
        self.notes: list[str] = []

    def install(self) -> _Counters:
        try:
            from torch._inductor.runtime.triton_heuristics import CachingAutotuner

            bench = CachingAutotuner.benchmark_all_configs

            def benchmark_all_configs(this: Any, *a: Any, **k: Any) -> Any:
                self.runtime_autotunes += 1
                return bench(this, *a, **k)

            CachingAutotuner.benchmark_all_configs = benchmark_all_configs  # type: ignore[method-assign]
        except (ImportError, AttributeError) as e:
            self.notes.append(f"runtime autotunes not counted: {e}")
        try:
            from torch._inductor.triton_bundler import TritonBundler

            try:
                from torch._inductor.runtime.cache_dir_utils import triton_cache_dir
            except ImportError:  # where older torch keeps it
                from torch._inductor.runtime.runtime_utils import triton_cache_dir

            emit = TritonBundler.read_and_emit

            def read_and_emit(bundle: Any) -> Any:
                fresh = []
                try:  # what the bundle will write: its kernel dirs not on disk yet
                    for art in bundle.kernel_artifacts:
                        d = os.path.join(triton_cache_dir(art.device), art.kernel_hash)
                        if not (os.path.isdir(d) and os.listdir(d)):
                            fresh.append((art.kernel_hash, d))
                except Exception as e:  # another torch's bundle: never break the cache load over a count
                    self.notes.append(f"Triton bundle not inspected: {type(e).__name__}: {e}")
                r = emit(bundle)
                self.emitted.update(h for h, d in fresh if os.path.isdir(d))
                return r

            TritonBundler.read_and_emit = staticmethod(read_and_emit)  # type: ignore[method-assign]
        except (ImportError, AttributeError) as e:
            self.notes.append(f"Triton kernels written by the FX-graph bundle not told apart: {e}")
        return self

    def result(self) -> dict[str, Any]:
        from torch._dynamo.utils import counters

        ind = counters["inductor"]
        return {
            "select_algorithm_autotune": ind["select_algorithm_autotune"],
            "select_algorithm_precompile": ind["select_algorithm_precompile"],
            "runtime_autotunes": self.runtime_autotunes,
            "triton_emitted": sorted(self.emitted),
            "cudagraph_skips": ind["cudagraph_skips"],
            "notes": self.notes,
        }


def _table1(p: Any, served: dict[str, tuple[Any, list[Any]]], batches: Sequence[int], iters: int) -> dict[str, Any]:
    """The runner's ``generate(parts, batch)`` per Table 1 mode (``table1_modes()``: which parts run compiled, the
    others through their eager twin), ``iters`` timed runs after one untimed, and whether every mode generated the
    eager mode's tokens."""
    import torch

    modes = dict(p.table1_modes())
    eager = {name: _eager_twin(m) for name, (m, _) in served.items()}
    rows = []
    for b in batches:
        ref = None
        for mode, compiled_parts in modes.items():
            fns = {name: (m if name in compiled_parts else eager[name]) for name, (m, _) in served.items()}
            tokens = p.generate(fns, b)
            _sync()
            samples = []
            for _ in range(iters):
                t = time.perf_counter()
                p.generate(fns, b)
                _sync()
                samples.append((time.perf_counter() - t) * 1e3)
            ref = tokens if ref is None else ref
            rows.append({"batch": b, "mode": mode, "compiled_parts": list(compiled_parts),
                         "generate_ms": sorted(samples)[len(samples) // 2], "samples_ms": samples,
                         "tokens": int(tokens.shape[-1]), "same_tokens_as_eager": bool(torch.equal(tokens, ref))})
    return {"rows": rows, "iters": iters}


def _device() -> dict[str, Any]:
    import platform

    import torch

    d: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": None}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        d["device"] = f"{torch.cuda.get_device_name()} (sm_{major}{minor})"
        try:
            import triton

            d["triton"] = triton.__version__
        except ImportError:
            pass
    else:
        d["device"] = f"cpu ({platform.machine()}, {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores)"
    return d


class BootFailed(ToolError):
    """A boot timed out, exited non-zero or printed no result; the message carries the end of its log."""


def spawn(args: Sequence[str], *, env: Mapping[str, str], log: Path, timeout: float, cwd: Path | None = None,
          tail_lines: int = 15) -> dict[str, Any]:
    """One boot: this module in a new process with ``args`` (``--spawned-at`` added), stderr to ``log``. Returns
    its result line, parsed, with ``wall_s``; BootFailed if it timed out, failed or printed no result."""
    with open(log, "w") as err:
        spawned = time.monotonic()
        cmd = [sys.executable, "-m", "compile_cache.tools.benchboot", *args, "--spawned-at", repr(spawned)]
        try:
            cp = subprocess.run(cmd, cwd=cwd, env=dict(env), stdout=subprocess.PIPE, stderr=err, text=True,
                                timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise BootFailed(f"timed out after {timeout:.0f}s; its log: {log}") from e
    line = next((ln for ln in reversed(cp.stdout.splitlines()) if ln.startswith(MARKER)), None)
    if cp.returncode != 0 or line is None:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-tail_lines:])
        raise BootFailed(f"failed (exit {cp.returncode}); the end of {log}:\n{tail}")
    r: dict[str, Any] = json.loads(line[len(MARKER):])
    r["wall_s"] = round(time.monotonic() - spawned, 3)
    return r


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
    ap.add_argument("--check-outputs", action="store_true", help="compare every part's outputs with eager's")
    ap.add_argument("--rtol", type=float, default=1e-3)
    ap.add_argument("--atol", type=float, default=1e-3)
    ap.add_argument("--counters", action="store_true", help="count autotunes, Triton kernels emitted, CUDA graph skips")
    ap.add_argument("--table1-iters", type=int, default=0, help="timed generate() runs per Table 1 cell (0: none)")
    ap.add_argument("--table1-batches", default="1,4,32")
    ap.add_argument("--per-part", action="store_true",
                    help="several parts: requests and latency per part on its declared examples (default: through "
                         "run() with its default inputs, as a request)")
    args = ap.parse_args(argv)

    from ..predictors import load_predictor  # the Cog runtime's own loader: same module name, same FX-graph cache keys

    p = load_predictor(args.predictor)
    declared = _capture_declared(p)
    watch = _Counters().install() if args.counters else None
    weights = os.environ.get("COG_WEIGHTS")
    if weights:  # what Cog passes to setup()
        p.setup(weights)
    else:
        p.setup()
    ready_s = time.monotonic() - args.spawned_at  # CLOCK_MONOTONIC is system-wide: comparable across processes

    import torch

    served = served_parts(p, declared)
    multi = is_multi_part(p)
    via_run = multi and not args.per_part
    out: dict[str, Any] = {
        "process_ready_s": round(ready_s, 3),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "compiled": any(bool(getattr(m, "is_compiled", True)) for m, _ in served.values()),
        "parts": sorted(served) if multi else None,
        **_device(),
    }
    # The upload compresses in the background: let it finish so it neither steals CPU from the timings below nor
    # leaves the store half-seeded for the next boot.
    t = time.monotonic()
    p.wait_for_upload(args.upload_timeout)
    out["upload_wait_s"] = round(time.monotonic() - t, 3)
    if args.check_eager:  # every part against its own eager model (the weights this process loaded)
        out["max_abs_diff"] = max(r["max_abs_diff"] for r in _outputs(served, 0.0, 0.0)["parts"].values())
    inputs = run_defaults(p) if via_run else {}
    if args.requests > 0:
        out["request_path"] = (_request_path_run(p, inputs, args.requests) if via_run
                               else _request_path(p, served, args.requests))
    if args.check_outputs:
        out["outputs"] = _outputs(served, args.rtol, args.atol)
    if args.latency_iters > 0 and via_run:
        out["latency"] = _latency_multi_part(p, inputs, args.latency_iters)
    elif args.latency_iters > 0:
        lat = {}
        for want in (int(b) for b in args.batches.split(",")):
            calls, got, described = {}, set(), []
            for name, (model, examples) in served.items():
                ex, b = select_example(examples, want)
                calls[name] = (model, ex)
                got.add(b)
                described.append(ex.describe() if len(served) == 1 else f"{name}: {ex.describe()}")
            lat[str(want)] = {"batch": max(got, key=lambda b: (b == want, b)), "example": "; ".join(described),
                              **_latency(calls, args.latency_iters)}
        out["latency"] = lat
    if args.table1_iters > 0:
        if not hasattr(p, "generate") or not hasattr(p, "table1_modes"):
            raise SystemExit(f"{args.predictor} has no generate()/table1_modes(): no Table 1 to time")
        out["table1"] = _table1(p, served, [int(b) for b in args.table1_batches.split(",")], args.table1_iters)
    if watch is not None:
        out["counters"] = watch.result()
    out["metrics"] = p.metrics.to_dict()  # after the upload and requests: upload state and request compiles final
    sys.stdout.write(MARKER + json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
