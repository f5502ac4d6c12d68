"""Buckets or a dynamic dim for prefill? Boot cost and serving latency of each way, on this machine.

    python examples/llm/bench_prefill.py MODE --cache DIR [--config example|tiny]

MODE: ``buckets`` (jit, one static graph per prompt bucket), ``dynamic`` (jit, one graph with the prompt length
symbolic: ``mark_dynamic`` on the warm-up input), ``export`` (torch.export with a prompt Dim, one AOTInductor
package). Run each twice against the same ``--cache`` dir (a fresh process each time): the first run is the cold
boot, the second the warm one (FX-graph cache hits, or the package loaded). Prints one JSON line: ``boot_s`` (what
a boot spends making prefill ready: compile + warm-up, or build/load), the Dynamo/Inductor counters, and
``prefill_ms`` (median of 7 calls) per prompt length. Decode is the same either way and is not measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["buckets", "dynamic", "export"])
    ap.add_argument("--cache", required=True, type=Path, help="TORCHINDUCTOR_CACHE_DIR (reuse it for a warm run)")
    ap.add_argument("--config", choices=["example", "tiny"], default="example")
    ap.add_argument("--lengths", default="10,60,120,250", help="prompt lengths to time (tokens)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default); 1 gives steadier timings on a machine others load")
    args = ap.parse_args()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(args.cache.resolve())

    import torch
    from torch._dynamo.utils import counters

    if args.threads:
        torch.set_num_threads(args.threads)

    sys.path.insert(0, str(HERE))
    from model import Bounds, Prefill, example_config, new_cache, prefill_inputs, random_model, tiny_config

    config = example_config() if args.config == "example" else tiny_config()
    bounds = Bounds()
    prefill = Prefill(random_model(config))
    lengths = [int(x) for x in args.lengths.split(",")]
    bucketed = args.mode == "buckets"

    def inputs(n: int) -> tuple[torch.Tensor, ...]:
        ids, length = prefill_inputs(list(range(n)), bounds, bucketed=bucketed)
        return (ids, length, *new_cache(config, bounds.max_len))

    t0 = time.perf_counter()
    with torch.inference_mode():
        if args.mode == "export":
            from compile_cache.export import Dim, ExportedModel, ExportSpec, build_package

            ex = inputs(bounds.buckets[0] + 3)
            spec = ExportSpec(ex, {0: {1: Dim("prompt", 2, bounds.max_prompt)}})
            pkg = args.cache / "bench_prefill.pt2"
            built = not pkg.exists()
            if built:
                build_package(prefill, spec, pkg, keep_weights_out=True)
            fn = ExportedModel.load(spec, pkg, prefill, keep_weights_out=True)
            fn(*ex)
        else:
            fn = torch.compile(prefill, dynamic=False)
            if bucketed:
                for b in bounds.buckets:
                    fn(*inputs(b))
            else:
                ex = inputs(bounds.buckets[0] + 3)
                torch._dynamo.mark_dynamic(ex[0], 1, min=2, max=bounds.max_prompt)
                fn(*ex)
        boot_s = time.perf_counter() - t0
        graphs_at_boot = counters["stats"]["unique_graphs"]
        ms: dict[int, float] = {}
        for n in lengths:
            x = inputs(n)
            times = []
            for _ in range(7):
                t = time.perf_counter()
                fn(*x)
                times.append((time.perf_counter() - t) * 1000)
            ms[n] = round(statistics.median(times), 2)
    print(json.dumps({
        "mode": args.mode, "config": args.config, "boot_s": round(boot_s, 2),
        "graphs_at_boot": graphs_at_boot, "graphs_after_requests": counters["stats"]["unique_graphs"],
        "fxgraph_hits": counters["inductor"]["fxgraph_cache_hit"],
        "fxgraph_misses": counters["inductor"]["fxgraph_cache_miss"],
        "prefill_ms": ms, "torch": torch.__version__, "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
