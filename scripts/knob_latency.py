"""Steady-state latency of the example: eager vs compiled vs compiled with math SDPA (docs/benchmarks.md).

    python scripts/knob_latency.py [--predictor predict.py:Runner] [--batch 1] [--seq 64] [--rounds 10] [--calls 20]
        [--threads N]

The compile config is the predictor's with the environment's overrides, as in a container; the third variant adds
sdpa_backend="math". Each variant compiles first (time printed apart, not counted), then the three are timed in
interleaved rounds so that load from other processes on a shared machine spreads over all of them. Prints p50/p90
of rounds x calls calls each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compile_cache.compiler import CompiledModel, compile_model  # noqa: E402
from compile_cache.config import CompileConfig, Settings  # noqa: E402
from compile_cache.predictors import DEFAULT_PREDICTOR, load_predictor  # noqa: E402
from compile_cache.tools.profile import pick_example  # noqa: E402


def entry_point(model: Any, name: str) -> Any:
    """``model(...)`` behind a code object of its own. Dynamo keeps compiled graphs on the code object and does not
    guard on the SDPA choice (tests/test_knobs.py), so two variants compiling ``model.forward`` itself in one
    process would share the first one's graph."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        return model(*args, **kwargs)

    code = forward.__code__.replace(co_name=f"forward_{name}")
    return types.FunctionType(code, forward.__globals__, code.co_name, None, forward.__closure__)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--predictor", default=DEFAULT_PREDICTOR)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    a = ap.parse_args()

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)  # 1 is steadier on a shared machine: no OpenMP barrier waits on busy cores

    p = load_predictor(a.predictor)
    model = p.load(None)
    ex = pick_example(p.warmup_examples(), a.batch, a.seq)
    cfg = getattr(p, "compile_config", CompileConfig()).with_overrides(Settings.from_env())
    variants = {
        "eager": cfg.model_copy(update={"enable": False, "sdpa_backend": None}),
        "compiled": cfg,
        "compiled+math": cfg.model_copy(update={"sdpa_backend": "math"}),
    }
    models: dict[str, CompiledModel] = {}
    for name, vcfg in variants.items():
        fn, why = compile_model(entry_point(model, name.replace("+", "_")), vcfg)
        m = models[name] = CompiledModel(fn, model, vcfg)
        t = time.perf_counter()
        _, why2 = m.warm_up([ex])
        if vcfg.enable and (why or why2):
            print(f"{name}: not compiled: {why or why2}", file=sys.stderr)
            return 1
        print(f"{name:14s} first call {time.perf_counter() - t:5.1f}s (not counted)")
    outs = {n: m(*ex.args, **(ex.kwargs or {})) for n, m in models.items()}
    for n in ("compiled", "compiled+math"):
        print(f"max |{n} - eager| {(outs[n] - outs['eager']).abs().max().item():.1e}")
    times: dict[str, list[float]] = {n: [] for n in models}
    for _ in range(a.rounds):
        for name, m in models.items():
            for _ in range(a.calls):
                t = time.perf_counter()
                m(*ex.args, **(ex.kwargs or {}))
                times[name].append((time.perf_counter() - t) * 1e3)
    if any(m.request_path_compiles for m in models.values()):
        print("warning: a variant recompiled while timed", file=sys.stderr)
    knobs = {k: v for k, v in cfg.model_dump().items() if k in ("mode", "memory_format", "sdpa_backend", "options")}
    print(f"\n{ex.describe()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{a.rounds}x{a.calls} calls each, interleaved; base config {knobs}")
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=10)
        print(f"{name:14s} p50 {statistics.median(ts):7.2f} ms   p90 {q[8]:7.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
