"""Replay of Table 1 of "Studying the Overhead of torch.compile() in LLM Inference" on the LLM example, as users run it.

The study compiled Llama-3.2-1B on fresh instances with every cache off and found compiling *loses* to eager at
batch 1 and 4 and wins from batch 32. Here every cell boots the LLM example's own runner (examples/llm/predict.py:
``Runner``, its parts ``prefill`` and ``decode``) through the framework's lifecycle, ``setup()`` with or without the
store, exactly as a container does, then generates with those parts. The runner is booted as
examples/llm/table1_runner.py:``Table1Runner``: the same ``load()``, the parts warmed up at the cell's batch, and the
part a mode leaves eager turned off by a per-part override. Every cell is a fresh process with an empty
``TORCHINDUCTOR_CACHE_DIR`` and ``COMPILE_CACHE_STRATEGY=jit``:

    eager   COMPILE_CACHE_COMPILE=0, store off
    cold    compiled, TORCHINDUCTOR_FORCE_DISABLE_CACHES=1, store off (the study's setting)
    seed    compiled, a fresh local store of its own (mode, batch) that this boot fills; it generates a few tokens
            only and waits for the upload (not a cell of the table: "the previous container")
    warm    compiled, that store: setup() restores from it first (a new container)

Modes: ``eager``; ``compile-decode`` (prefill eager); ``compile-prefill+decode``. A cell generates ``--requests``
times: each a batch of ``--batch`` prompts of ``--prompt`` tokens, ``--tokens`` new tokens (greedy, no stop at EOS).
Total = ``setup()`` (load the weights, key, restore, compile + warm-up) + every generation, inside the process
(imports excluded, the same for every cell). ``compile_s`` is Dynamo's own compile time inside it. Then prefill's
request-path recompiles over three prompt lengths with ``COMPILE_CACHE_DYNAMIC`` false / auto / true.

    python scripts/table1.py --out table1-out                   # the full run (see docs/table1.md for its time)
    python scripts/table1.py --out /tmp/t1 --quick              # tiny weights, batch 1, eager vs compile-decode,
                                                                # seed and warm (no cold cell: a compile less)

Writes ``<out>/table1.json``, ``<out>/table1.md`` and each boot's log under ``<out>/logs``. See docs/table1.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LLM = ROOT / "examples" / "llm"
sys.path.insert(0, str(ROOT))
MARKER = "TABLE1-CELL "
MODES = ("eager", "compile-decode", "compile-prefill+decode")
COMPILED = {"eager": "", "compile-decode": "decode", "compile-prefill+decode": "prefill,decode"}
# The runner as a container in the example's dir names it (its cog.yaml's form), loaded by cog's own loader.
PREDICTOR = "table1_runner.py:Table1Runner"
RECOMPILE_LENGTHS = (16, 24, 40)
SEED_TOKENS = 3  # the seed only has to compile and upload; its parts are warmed up in setup() either way
# Variables of ours or Torch's that would blur the cells if inherited from the caller's shell.
_OURS = ("TORCHINDUCTOR_", "TORCH_COMPILE", "COMPILE_CACHE_", "TABLE1_", "LLM_WEIGHTS_DIR", "TRITON_CACHE_DIR")


# -- one cell (worker side) ---------------------------------------------------------------------------------------
def _compile_s() -> float:
    """Dynamo's own total compile time in this process (compile + load of the cached artifacts when warm)."""
    from torch._dynamo.utils import compile_times

    names, values = compile_times(repr="csv", aggregate=True)
    return float(values[names.index("_compile.compile_inner")]) if "_compile.compile_inner" in names else 0.0


def _counts() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {
        "fxgraph_hits": counters["inductor"]["fxgraph_cache_hit"],
        "fxgraph_misses": counters["inductor"]["fxgraph_cache_miss"],
        "aotautograd_hits": counters["aot_autograd"]["autograd_cache_hit"],
        "aotautograd_misses": counters["aot_autograd"]["autograd_cache_miss"],
        "unique_graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
    }


def _boot(spec: dict[str, Any]) -> tuple[Any, float]:
    """The runner, set up as the Cog runtime does (its own loader, then ``setup()``); and setup's wall time."""
    import torch

    from compile_cache.predictors import load_predictor

    torch.set_num_threads(spec["threads"])
    p = load_predictor(PREDICTOR)  # imports transformers and the example: outside the timed part
    t = time.monotonic()
    p.setup()
    return p, time.monotonic() - t


def _timed(fn: Any, into: list[float]) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        into.append(time.perf_counter() - t)
        return out

    return call


def _metrics(p: Any) -> dict[str, Any]:
    m = p.metrics
    return {
        "setup_load_s": round(m.load_s, 3), "setup_key_s": round(m.key_s, 3),
        "setup_compile_s": round(m.compile_s, 3),  # the framework's: every part's compile + warm-up
        "request_path_compiles": m.request_path_compiles, "request_path_eager_calls": m.request_path_eager_calls,
        "parts": {n: {k: v for k, v in d.items() if k in ("strategy", "compile_s", "fxgraph_hits", "fxgraph_misses",
                                                           "eager_fallback", "precompiled")}
                  for n, d in m.parts.items()},
    }


def run_cell(spec: dict[str, Any]) -> dict[str, Any]:
    """One cell, in this fresh process: setup() [restore] -> compile/warm-up -> ``requests`` generations
    [-> upload]."""
    import torch

    batch, kind = spec["batch"], spec["kind"]
    out: dict[str, Any] = {k: spec[k] for k in ("mode", "batch", "kind", "prompt", "tokens")}
    p, setup_s = _boot(spec)
    m = p.metrics
    if kind in ("seed", "warm"):
        out.update(restore=m.cache, restore_s=round(m.restore_s, 3), restored_bytes=m.bytes_downloaded,
                   restored_files=m.files_restored)
    if kind == "warm":
        # The background upload (nothing new on a warm boot) is not on a request's path: let it end before timing.
        t = time.monotonic()
        p.wait_for_upload(600)
        out["upload_wait_s"] = round(time.monotonic() - t, 3)
    model, predict = sys.modules["model"], sys.modules["predict"]  # the example's, as the runner imported them
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(0, 256, (batch, spec["prompt"] - 1), generator=g).tolist()
    prompts = [[model.BOS, *r] for r in rows]
    tokens = SEED_TOKENS if kind == "seed" else spec["tokens"]
    requests = 1 if kind == "seed" else spec["requests"]
    pre_s: list[float] = []
    dec_s: list[float] = []
    pre, dec = _timed(p.parts["prefill"], pre_s), _timed(p.parts["decode"], dec_s)
    req_s, outs = [], []
    for _ in range(requests):
        t = time.perf_counter()
        outs.append(model.greedy_batch(pre, dec, prompts, tokens, p.lm.config, predict.BOUNDS, bucketed=False,
                                       stop_at_eos=False))
        req_s.append(time.perf_counter() - t)
    steady = sorted(dec_s[1:]) or dec_s or [0.0]  # the first decode call apart, as gpt-fast reports compile apart
    out.update(
        total_s=round(setup_s + sum(req_s), 3),
        setup_s=round(setup_s, 3),
        requests=requests,
        request_s=round(sum(req_s) / len(req_s), 3),
        first_request_s=round(req_s[0], 3),
        prefill_s=round(sum(pre_s) / len(pre_s), 3),
        decode_s=round(sum(dec_s), 3),
        first_decode_s=round(dec_s[0], 3) if dec_s else 0.0,
        decode_ms_per_token=round(1000 * sum(steady) / len(steady), 3),
        decode_ms_p50=round(1000 * steady[len(steady) // 2], 3),
        compile_s=round(_compile_s(), 3),
        tokens_sha=hashlib.sha256(json.dumps(outs[0]).encode()).hexdigest()[:12],
        same_tokens_every_request=all(o == outs[0] for o in outs),
        **_counts(),
        **_metrics(p),
    )
    if kind == "seed":
        p.wait_for_upload(600)
        p.finish_uploads()  # anything the first upload did not take: the store is complete for the warm cell
        out.update(upload_state=m.upload_state, upload_s=round(m.upload_s, 3), uploaded_bytes=m.bytes_uploaded,
                   uploaded_files=m.files_uploaded)
    return out


def run_recompiles(spec: dict[str, Any]) -> dict[str, Any]:
    """Prefill alone compiled (COMPILE_CACHE_ON_NEW_SHAPE=compile), then called with three prompt lengths after
    setup: how many graphs does a request compile?"""
    import torch

    p, setup_s = _boot(spec)
    model, predict = sys.modules["model"], sys.modules["predict"]
    per_call = []
    t0 = time.monotonic()
    for n in spec["lengths"]:
        ids = torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(n))
        with torch.inference_mode(False):
            k, v = model.new_cache(p.lm.config, predict.BOUNDS.max_len)
        before, fw = _counts()["unique_graphs"], p.metrics.request_path_compiles
        t = time.monotonic()
        p.parts["prefill"](ids, torch.tensor([n]), k, v)
        per_call.append({"prompt": n, "new_graphs": _counts()["unique_graphs"] - before,
                         "request_path_compiles": p.metrics.request_path_compiles - fw,
                         "s": round(time.monotonic() - t, 3)})
    return {"dynamic": spec["dynamic"], "lengths": spec["lengths"], "calls": per_call, "setup_s": round(setup_s, 3),
            "total_s": round(time.monotonic() - t0, 3), "compile_s": round(_compile_s(), 3),
            "request_path_compiles": p.metrics.request_path_compiles, **_counts()}


# -- the driver (parent side) ---------------------------------------------------------------------------------------
def spawn(spec: dict[str, Any], env_extra: dict[str, str], cell_dir: Path, log: Path) -> dict[str, Any]:
    """Run one cell in a fresh process in the example's dir, with an empty Inductor cache dir; the result plus the
    process's wall time."""
    shutil.rmtree(cell_dir, ignore_errors=True)
    cell_dir.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(_OURS)}
    env.update(TORCHINDUCTOR_CACHE_DIR=str(cell_dir / "inductor"), OMP_NUM_THREADS=str(spec["threads"]),
               PYTHONPATH=str(ROOT), LLM_WEIGHTS_DIR=spec["weights"], COMPILE_CACHE_STRATEGY="jit",
               COMPILE_CACHE_PROGRESS="0", COMPILE_CACHE_LOG_FILE=str(cell_dir / "compile_cache.log"), **env_extra)
    t = time.monotonic()
    with open(log, "w") as err:
        cp = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)], env=env,
                            cwd=LLM, stdout=subprocess.PIPE, stderr=err, text=True, timeout=3600)
    wall = time.monotonic() - t
    line = next((ln for ln in reversed(cp.stdout.splitlines()) if ln.startswith(MARKER)), None)
    if cp.returncode != 0 or line is None:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"cell {spec} failed (exit {cp.returncode}); the end of {log}:\n{tail}")
    return {**json.loads(line[len(MARKER):]), "process_wall_s": round(wall, 3)}


def cell_env(mode: str, batch: int, kind: str, store: Path) -> dict[str, str]:
    env = {"TABLE1_BATCH": str(batch), "TABLE1_COMPILE": COMPILED[mode]}
    if kind == "eager":
        env.update(COMPILE_CACHE_COMPILE="0", COMPILE_CACHE_DISABLE="1")
    elif kind == "cold":
        env.update(COMPILE_CACHE_DISABLE="1", TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")
    else:  # seed and warm: one store per (mode, batch), so a warm boot restores only what its own seed compiled
        env["COMPILE_CACHE_URL"] = f"file://{store / f'{mode}-b{batch}'}"
    return env


def _machine() -> dict[str, Any]:
    import torch
    import transformers

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cpu_isa": torch.backends.cpu.get_cpu_capability(),
            "loadavg_start": os.getloadavg()[0]}


def summarise(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (batch, mode): eager / cold / warm totals side by side, and when the warm compiled server has
    caught up with an eager one (its extra setup over its per-request gain; null: never), in requests of the cell's
    shape and in decode tokens."""
    rows = []
    by = {(c["batch"], c["mode"], c["kind"]): c for c in cells}
    for batch in sorted({c["batch"] for c in cells}):
        eager = by.get((batch, "eager", "eager"))
        for mode in MODES:
            if mode == "eager":
                if eager:
                    rows.append({"batch": batch, "mode": mode, "cold_total_s": eager["total_s"],
                                 "warm_total_s": eager["total_s"], "eager_setup_s": eager["setup_s"],
                                 "request_s": eager["request_s"], "ms_per_token": eager["decode_ms_per_token"]})
                continue
            cold, warm = by.get((batch, mode, "cold")), by.get((batch, mode, "warm"))
            if not warm:
                continue
            served = [c for c in (cold, warm) if c]  # no cold cell: --no-cold (the quick run)
            row = {"batch": batch, "mode": mode, "cold_total_s": cold and cold["total_s"],
                   "cold_compile_s": cold and cold["compile_s"], "cold_setup_s": cold and cold["setup_s"],
                   "warm_total_s": warm["total_s"], "warm_setup_s": warm["setup_s"],
                   "warm_restore_s": warm.get("restore_s", 0.0), "warm_compile_s": warm["compile_s"],
                   "request_s": warm["request_s"], "ms_per_token": warm["decode_ms_per_token"],
                   "warm_fxgraph_hits": warm["fxgraph_hits"], "warm_fxgraph_misses": warm["fxgraph_misses"],
                   "request_path_compiles": sum(c["request_path_compiles"] for c in served),
                   "request_path_eager_calls": sum(c["request_path_eager_calls"] for c in served)}
            if eager:
                row["same_tokens_as_eager"] = all(c["tokens_sha"] == eager["tokens_sha"] for c in served)
                row["cold_vs_eager"] = cold and round(cold["total_s"] / eager["total_s"], 3)
                row["warm_vs_eager"] = round(warm["total_s"] / eager["total_s"], 3)
                extra = warm["setup_s"] - eager["setup_s"]
                per_request = eager["request_s"] - warm["request_s"]
                per_token = (eager["decode_ms_per_token"] - warm["decode_ms_per_token"]) / 1000
                row["warm_break_even_requests"] = _break_even(extra, per_request)
                row["warm_break_even_tokens"] = _break_even(extra, per_token)
            rows.append(row)
    return rows


def _break_even(extra_s: float, gain_s: float) -> int | None:
    if extra_s <= 0:
        return 0
    return math.ceil(extra_s / gain_s) if gain_s > 0 else None


def markdown(result: dict[str, Any]) -> str:
    def f(v: Any) -> str:
        return "—" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))

    c = result["config"]
    lines = [
        f"The LLM example's runner, {c['requests']} request(s) per cell, each a batch of prompts of {c['prompt']} "
        f"tokens + {c['tokens']} new tokens; weights `{c['weights']}`, {c['threads']} thread(s). Times in seconds, "
        "inside the process (setup + generation).",
        "",
        "| batch | mode | cold total | cold compile | warm total | warm setup | warm restore | warm compile "
        "| s/request | ms/token | cold ÷ eager | warm ÷ eager | warm break-even (requests) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["summary"]:
        lines.append(
            f"| {r['batch']} | {r['mode']} | {f(r['cold_total_s'])} | {f(r.get('cold_compile_s'))} | "
            f"{f(r['warm_total_s'])} | {f(r.get('warm_setup_s', r.get('eager_setup_s')))} | "
            f"{f(r.get('warm_restore_s'))} | {f(r.get('warm_compile_s'))} | {f(r['request_s'])} | "
            f"{f(r['ms_per_token'])} | {f(r.get('cold_vs_eager'))} | {f(r.get('warm_vs_eager'))} | "
            f"{f(r.get('warm_break_even_requests'))} |"
        )
    if result.get("recompiles"):
        lines += ["", f"Prefill request-path compiles over prompt lengths {list(RECOMPILE_LENGTHS)} (batch 1, caches "
                  "off, COMPILE_CACHE_ON_NEW_SHAPE=compile):", "",
                  "| COMPILE_CACHE_DYNAMIC | graphs | new graphs per call | compile s |", "|---|---:|---|---:|"]
        for r in result["recompiles"]:
            per = ", ".join(f"{x['prompt']}→{x['new_graphs']}" for x in r["calls"])
            lines.append(f"| {r['dynamic']} | {r['unique_graphs']} | {per} | {f(r['compile_s'])} |")
    return "\n".join(lines) + "\n"


def make_weights(config: str, out: Path) -> None:
    """The example's own deterministic random weights (examples/llm/make_weights.py) at ``config``'s size."""
    cp = subprocess.run([sys.executable, str(LLM / "make_weights.py"), "--config", config, "--out", str(out)],
                        capture_output=True, text=True, timeout=600)
    if cp.returncode != 0:
        raise RuntimeError(f"make_weights.py --config {config} failed:\n{cp.stderr[-3000:]}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="table1-", dir=out))
    weights = work / "weights"
    make_weights(args.weights, weights)
    base = {"prompt": args.prompt, "tokens": args.tokens, "requests": args.requests, "threads": args.threads,
            "weights": str(weights)}
    result: dict[str, Any] = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "config": {**{k: v for k, v in base.items() if k != "weights"}, "weights": args.weights,
                   "batches": args.batches, "modes": args.modes, "cold": not args.no_cold,
                   "predictor": f"examples/llm/{PREDICTOR}",
                   "strategy": "jit"},
        "machine": _machine(),
        "cells": [],
        "recompiles": [],
    }

    def save() -> None:
        result["summary"] = summarise(result["cells"])
        (out / "table1.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "table1.md").write_text(markdown(result))

    def cell(mode: str, batch: int, kind: str) -> None:
        spec = {**base, "mode": mode, "batch": batch, "kind": kind}
        name = f"b{batch}-{mode}-{kind}"
        r = spawn(spec, cell_env(mode, batch, kind, work / "store"), work / "cell", logs / f"{name}.log")
        print(f"batch {batch:>3} {mode:<24} {kind:<5} total {r['total_s']:8.2f}s  setup {r['setup_s']:7.2f}s  "
              f"compile {r['compile_s']:7.2f}s  {r['decode_ms_per_token']:7.2f} ms/token", flush=True)
        result["cells"].append(r)
        save()

    try:
        for batch in args.batches:
            for mode in args.modes:
                if mode == "eager":
                    cell(mode, batch, "eager")
                    continue
                for kind in ("seed", "warm") if args.no_cold else ("cold", "seed", "warm"):
                    cell(mode, batch, kind)
        if args.recompiles:
            for dyn, env_value in ((False, "false"), (None, "auto"), (True, "true")):
                spec = {**base, "kind": "recompiles", "dynamic": dyn, "lengths": list(RECOMPILE_LENGTHS)}
                env = {"TABLE1_BATCH": "1", "TABLE1_COMPILE": "prefill", "COMPILE_CACHE_DISABLE": "1",
                       "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1", "COMPILE_CACHE_DYNAMIC": env_value,
                       "COMPILE_CACHE_ON_NEW_SHAPE": "compile"}
                r = spawn(spec, env, work / "cell", logs / f"recompiles-{env_value}.log")
                print(f"recompiles COMPILE_CACHE_DYNAMIC={env_value}: {r['unique_graphs']} graph(s), compile "
                      f"{r['compile_s']:.1f}s", flush=True)
                result["recompiles"].append(r)
                save()
    finally:
        result["machine"]["loadavg_end"] = os.getloadavg()[0]
        save()
        shutil.rmtree(work, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="table1-out", help="directory for table1.json, table1.md and logs/")
    ap.add_argument("--quick", action="store_true",
                    help="tiny weights, batch 1, eager vs compile-decode (seed and warm, no cold cell), 2 requests\n"
                         "of 8 tokens, no recompile study (tests)")
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=None, help="e.g. 1,4,32")
    ap.add_argument("--tokens", type=int, default=None,
                    help="new tokens per request, 1-128: the example's bound (default 128; quick 8)")
    ap.add_argument("--requests", type=int, default=None, help="generations per cell (default 4; quick 2)")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens, BOS included, 2-256 (default 32; quick 8)")
    ap.add_argument("--modes", type=lambda s: s.split(","), default=None, help=",".join(MODES))
    ap.add_argument("--weights", choices=["example", "small", "tiny"], default=None,
                    help="examples/llm/make_weights.py --config (default example; quick tiny)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per cell (default 1: on a shared 2-core machine, 2 OpenMP threads that\n"
                         "get descheduled made eager decode 15x slower)")
    ap.add_argument("--no-recompiles", dest="recompiles", action="store_false", default=None,
                    help="skip the COMPILE_CACHE_DYNAMIC=false/auto/true recompile count")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold cells (quick: they cost a compile each)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        r = run_recompiles(spec) if spec["kind"] == "recompiles" else run_cell(spec)
        sys.stdout.write(MARKER + json.dumps(r) + "\n")
        sys.stdout.flush()
        return
    q = args.quick
    args.batches = args.batches or ([1] if q else [1, 4, 32])
    args.tokens = args.tokens or (8 if q else 128)
    args.requests = args.requests or (2 if q else 4)
    args.prompt = args.prompt or (8 if q else 32)
    args.modes = args.modes or (["eager", "compile-decode"] if q else list(MODES))
    args.weights = args.weights or ("tiny" if q else "example")
    args.recompiles = (not q) if args.recompiles is None else args.recompiles
    args.no_cold = args.no_cold or q
    bad = set(args.modes) - set(MODES)
    if bad:
        ap.error(f"unknown mode(s) {sorted(bad)}; accepted: {', '.join(MODES)}")
    if not 1 <= args.tokens <= 128 or not 2 <= args.prompt <= 256 or args.requests < 1 or min(args.batches) < 1:
        ap.error("--tokens takes 1-128 and --prompt 2-256 (the example's bounds); --requests and batches >= 1")
    result = run(args)
    sys.stdout.write(markdown(result))


if __name__ == "__main__":
    main()
