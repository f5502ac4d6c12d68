"""Compiled vs eager decode step of the example's model, paired in one process, and where the compiled step's time
goes (the Inductor kernels of a profile). For docs/table1.md: why compiled decode is slower than eager on CPU.

    python examples/llm/bench_decode.py [--batches 1,4,32] [--iters 20] [--profile-batch 32]

Set ``TRANSFORMERS_SDPA_FORCE_GQA=1`` to make transformers' attention use SDPA's own grouped-query support in both
(no ``repeat_kv`` under Dynamo). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,4,32")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--profile-batch", type=int, default=0, help="profile the compiled step at this batch (0: no)")
    args = ap.parse_args()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bench-decode-"))

    import torch

    sys.path.insert(0, str(HERE))
    from model import Bounds, Decode, example_config, part_examples, random_model

    torch.set_num_threads(1)
    lm = random_model(example_config())
    eager, compiled = Decode(lm), torch.compile(Decode(lm), dynamic=False)
    out: dict[str, object] = {"force_gqa": os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA", "0")}
    with torch.inference_mode():
        for b in (int(x) for x in args.batches.split(",")):
            _, inputs = part_examples(lm.config, Bounds(), 32, b)
            compiled(*inputs)  # compiles this batch's graph: not timed
            ms: dict[str, list[float]] = {"eager": [], "compiled": []}
            for i in range(args.iters):  # paired, order alternating: both see the same machine load
                for name, fn in (("eager", eager), ("compiled", compiled))[:: 1 if i % 2 == 0 else -1]:
                    t = time.perf_counter()
                    fn(*inputs)
                    ms[name].append(1e3 * (time.perf_counter() - t))
            out[str(b)] = {k: round(sorted(v)[len(v) // 2], 2) for k, v in ms.items()}
        if args.profile_batch:
            from torch.profiler import profile

            _, inputs = part_examples(lm.config, Bounds(), 32, args.profile_batch)
            compiled(*inputs)
            with profile() as prof:
                for _ in range(3):
                    compiled(*inputs)
            top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
            out["profile_ms_per_step"] = {e.key: round(e.self_cpu_time_total / 3e3, 1) for e in top}
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
