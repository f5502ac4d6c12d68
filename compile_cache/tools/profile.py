"""``python -m compile_cache profile``: the predictor's model eager and compiled under ``torch.profiler``.

Loads the predictor as Cog does (``FILE.py:CLASS``), calls its ``load()``, picks one of its warm-up examples
(``--batch``/``--seq`` match the first tensor's leading dimensions), and for each mode: a few unprofiled calls
(compile happens in the first compiled one, timed apart), then ``--iters`` timed calls, then ``--iters`` calls under
the profiler. Prints the top operators by self CPU time side by side, and writes ``<out>/eager.json`` and
``<out>/compiled.json`` (Chrome traces: open in https://ui.perfetto.dev or chrome://tracing).

The compile config is the predictor's, with the environment's overrides (``COMPILE_CACHE_SDPA_BACKEND=math`` ...),
as in a container. Inductor's C++ kernels are compiled with ``cpp.enable_kernel_profile`` so each fused kernel
shows up by name (``cpp_fused_...``): that adds one profiler scope per kernel call and is a separate entry in
the Inductor cache, so the compiled numbers here are for reading, not for the benchmark report.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "pick_example", "top_ops", "side_by_side"]

DEFAULT_OUT = "profile-out"
DEFAULT_ROWS = 15
DEFAULT_ITERS = 10
_WARM_CALLS = 2  # after the compiling call: allocator and caches settle before anything is measured
_NAME_W = 44


def pick_example(examples: Sequence[Any], batch: int | None, seq: int | None) -> Any:
    """The first warm-up example whose first tensor argument has ``batch`` rows and ``seq`` columns (either
    None: any). Raises ValueError naming the shapes there are."""
    import torch

    def dims(ex: Any) -> tuple[int, ...]:
        t = next((a for a in (*ex.args, *(ex.kwargs or {}).values()) if isinstance(a, torch.Tensor)), None)
        return tuple(t.shape) if t is not None else ()

    for ex in examples:
        d = dims(ex)
        if (batch is None or (len(d) > 0 and d[0] == batch)) and (seq is None or (len(d) > 1 and d[1] == seq)):
            return ex
    shown = ", ".join(ex.describe() for ex in examples) or "none"
    raise ValueError(f"no warm-up example with batch={batch} seq={seq}; the predictor declares: {shown}")


def top_ops(prof: Any, rows: int, device: bool = False) -> list[tuple[str, float, int, float]]:
    """(name, self CPU ms, calls, self device ms) of the top ``rows`` operators, by self device time when
    ``device`` (GPU) else self CPU time."""
    avgs = list(prof.key_averages())
    key = "self_device_time_total" if device else "self_cpu_time_total"
    avgs.sort(key=lambda e: getattr(e, key), reverse=True)
    return [(e.key, e.self_cpu_time_total / 1e3, e.count, e.self_device_time_total / 1e3) for e in avgs[:rows]]


def _cell(row: tuple[str, float, int, float] | None, device: bool) -> str:
    if row is None:
        return " " * (_NAME_W + 18 + (11 if device else 0))
    name, cpu, calls, dev = row
    name = name if len(name) <= _NAME_W else name[: _NAME_W - 1] + "…"
    return f"{name:<{_NAME_W}} {cpu:>9.3f} {calls:>7d}" + (f" {dev:>10.3f}" if device else "")


def side_by_side(
    left: list[tuple[str, float, int, float]], right: list[tuple[str, float, int, float]], device: bool = False
) -> str:
    head = f"{'operator':<{_NAME_W}} {'self ms':>9} {'calls':>7}" + (f" {'device ms':>10}" if device else "")
    width = len(head)
    lines = [f"{'EAGER':<{width}} | COMPILED", f"{head} | {head}", f"{'-' * width} | {'-' * width}"]
    for i in range(max(len(left), len(right))):
        a = left[i] if i < len(left) else None
        b = right[i] if i < len(right) else None
        lines.append(f"{_cell(a, device)} | {_cell(b, device)}".rstrip())
    return "\n".join(lines)


def _profile_mode(model: Any, ex: Any, iters: int, trace: Path, device: bool) -> tuple[Any, list[float]]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    def call() -> None:
        model(*ex.args, **(ex.kwargs or {}))
        if device:
            torch.cuda.synchronize()

    for _ in range(_WARM_CALLS):
        call()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        call()
        times.append((time.perf_counter() - t) * 1e3)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device else [])
    with profile(activities=activities) as prof:
        for _ in range(iters):
            call()
    prof.export_chrome_trace(str(trace))
    return prof, times


def build_parser() -> argparse.ArgumentParser:
    from ..predictors import DEFAULT_PREDICTOR

    p = argparse.ArgumentParser(
        prog="python -m compile_cache profile",
        description="Profile the predictor's model eager and compiled: top operators side by side, a Chrome trace "
        "per mode.",
        epilog="example:\n  python -m compile_cache profile --batch 1 --seq 64\n"
        "  COMPILE_CACHE_SDPA_BACKEND=math python -m compile_cache profile --rows 25",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--predictor",
        default=DEFAULT_PREDICTOR,
        metavar="FILE.py:CLASS",
        help=f"the predictor, as in cog.yaml's `predict:` (default {DEFAULT_PREDICTOR})",
    )
    p.add_argument("--batch", type=int, default=None, help="pick the warm-up example with this batch size")
    p.add_argument("--seq", type=int, default=None, help="pick the warm-up example with this sequence length")
    p.add_argument("--rows", type=int, default=DEFAULT_ROWS, help=f"operators per table (default {DEFAULT_ROWS})")
    p.add_argument(
        "--iters", type=int, default=DEFAULT_ITERS, help=f"timed and profiled calls per mode (default {DEFAULT_ITERS})"
    )
    p.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help=f"trace directory (default {DEFAULT_OUT}/)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rows < 1 or args.iters < 1:
        print("error: --rows and --iters must be >= 1", file=sys.stderr)
        return 2
    from ..config import CompileConfig, Settings
    from ..errors import ConfigError
    from ..predictors import load_predictor

    try:
        p = load_predictor(args.predictor)
        cfg = getattr(p, "compile_config", CompileConfig()).with_overrides(Settings.from_env())
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import torch
    import torch._inductor.config as inductor_config

    from ..compiler import CompiledModel, compile_model

    model = p.load(None)
    try:
        ex = pick_example(p.warmup_examples(), args.batch, args.seq)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fn, why = compile_model(model, cfg)  # applies memory_format to the module: eager runs with it too
    if why:
        print(f"error: not compiled: {why}", file=sys.stderr)
        return 1
    eager, compiled = CompiledModel(model, model, cfg), CompiledModel(fn, model, cfg)
    device = torch.cuda.is_available()
    args.out.mkdir(parents=True, exist_ok=True)

    t = time.perf_counter()
    with inductor_config.patch({"cpp.enable_kernel_profile": True}):
        _, why = compiled.warm_up([ex])
    compile_s = time.perf_counter() - t
    if why:
        print(f"error: the compiled model failed: {why}", file=sys.stderr)
        return 1

    knobs = {k: v for k, v in cfg.model_dump().items() if k in ("backend", "mode", "memory_format", "sdpa_backend")}
    print(f"predictor {args.predictor}  input {ex.describe()}  config {knobs}")
    print(f"compile + first call: {compile_s:.1f}s (not counted below)")
    tables, medians = {}, {}
    for name, m in (("eager", eager), ("compiled", compiled)):
        prof, times = _profile_mode(m, ex, args.iters, args.out / f"{name}.json", device)
        tables[name], medians[name] = top_ops(prof, args.rows, device), statistics.median(times)
    print(
        f"median per call, {args.iters} unprofiled calls: eager {medians['eager']:.2f} ms, "
        f"compiled {medians['compiled']:.2f} ms"
    )
    if compiled.request_path_compiles:  # the numbers then include compile time: say so
        print(f"warning: {compiled.request_path_compiles} recompile(s) after the first call", file=sys.stderr)
    print(f"\ntop {args.rows} operators by self {'device' if device else 'CPU'} time, totals over {args.iters} calls\n")
    print(side_by_side(tables["eager"], tables["compiled"], device))
    print(f"\ntraces: {args.out / 'eager.json'}  {args.out / 'compiled.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
