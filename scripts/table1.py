"""Replay of Table 1 of "Studying the Overhead of torch.compile() in LLM Inference", at a size this machine runs.

The study compiled Llama-3.2-1B on fresh instances with every cache off and found compiling *loses* to eager at
batch 1 and 4 and wins from batch 32. Here: a small Llama-architecture decoder from ``transformers`` (random weights,
fixed seed), a static KV cache, prefill + N greedy decode tokens, in the gpt-fast style: the compiled units are the
two tiny functions ``prefill`` and ``decode_one_token``. Every cell runs in a fresh process:

    eager   no compile
    cold    compiled, TORCHINDUCTOR_FORCE_DISABLE_CACHES=1, empty cache dir (the study's setting)
    seed    compiled, empty cache dir, then uploaded with compile_cache.sync.Uploader to a local store (not a cell
            of the table: "the previous container")
    warm    compiled, empty cache dir restored first with compile_cache.sync.restore from that store (a new
            container); the restore is inside the total

Total = time inside the process from the start of the restore (warm) or the model build (others) to the last token;
``compile_s`` is Dynamo's own compile time (``_compile.compile_inner``) inside it. Then prefill recompiles over three
prompt lengths with ``dynamic=False``, the default (``None``: automatic dynamic) and ``dynamic=True``.

    python scripts/table1.py --out table1-out                   # the full run (about 20 min on 2 shared cores)
    python scripts/table1.py --out /tmp/t1 --quick              # a tiny model, batch 1, eager vs compile-decode

Writes ``<out>/table1.json`` and ``<out>/table1.md``. See docs/table1.md for the numbers and their reading.
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
sys.path.insert(0, str(ROOT))
MARKER = "TABLE1-CELL "
MODES = ("eager", "compile-decode", "compile-prefill+decode")
# Presets as a plain dict (gpt-fast's transformer_configs); tied embeddings as in Llama-3.2. "small" has as many KV
# heads as query heads: with GQA ("small-gqa"), transformers 5.23 decodes eager through `pack_gqa` but falls back to
# `repeat_kv` under Dynamo, which copies the whole static KV cache every step (compiled decode measured 4.5x slower
# than eager at batch 32) — a difference of code path, not of compiling (docs/table1.md).
PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=32000),
    "small-gqa": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, vocab_size=1000),
}
RECOMPILE_LENGTHS = (16, 24, 40)
SEED_TOKENS = 3  # the seed only has to compile both units; it stops early (same cache shape, same graphs)


# -- the model and the two compiled units (worker side) -------------------------------------------------------------
def build(preset: str, batch: int, max_len: int) -> tuple[Any, Any]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

    torch.manual_seed(0)
    cfg = LlamaConfig(**PRESETS[preset], max_position_embeddings=max(4096, max_len), tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    cache = StaticCache(config=cfg, max_cache_len=max_len)
    # Allocated now, not lazily inside the first (compiled) call: transformers asks for this when prefill compiles.
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    cache.early_initialization(batch, cfg.num_key_value_heads, head_dim, torch.float32, torch.device("cpu"))
    return model, cache


def prefill(model: Any, ids: Any, cache: Any, pos: Any) -> Any:
    return model(input_ids=ids, past_key_values=cache, cache_position=pos, use_cache=True).logits[:, -1].argmax(
        -1, keepdim=True
    )


def decode_one_token(model: Any, tok: Any, cache: Any, pos: Any) -> Any:
    return model(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True).logits[:, -1].argmax(
        -1, keepdim=True
    )


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


def _store_key(spec: dict[str, Any]) -> tuple[Any, Any]:
    from compile_cache.key import CacheKey, environment_factors
    from compile_cache.stores import open_store

    factors = {f"table1.{k}": str(spec[k]) for k in ("preset", "mode", "batch", "prompt", "tokens", "dynamic")}
    return open_store(spec["store"]), CacheKey("table1", environment_factors(factors))


def run_cell(spec: dict[str, Any]) -> dict[str, Any]:
    """One cell, in this fresh process: [restore] → build → prefill → N decode tokens [→ upload]."""
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401 - imports are outside the timed part

    from compile_cache.compiler import cache_roots
    from compile_cache.sync import Uploader, restore

    torch.set_num_threads(spec["threads"])
    mode, batch, prompt, tokens, kind = spec["mode"], spec["batch"], spec["prompt"], spec["tokens"], spec["kind"]
    out: dict[str, Any] = {k: spec[k] for k in ("mode", "batch", "kind", "prompt", "tokens")}
    t0 = time.monotonic()
    if kind == "warm":  # what a new container does first: key, then restore into the empty cache dir
        store, key = _store_key(spec)
        r = restore(store, key.name, cache_roots(), factors=key.factors)
        out.update(restore=r.status, restore_s=round(time.monotonic() - t0, 3), restored_bytes=r.bytes_downloaded,
                   restored_files=r.files)
    t_build = time.monotonic()
    model, cache = build(spec["preset"], batch, prompt + tokens)
    dyn = spec["dynamic"]
    pre, dec = prefill, decode_one_token
    if mode != "eager":
        dec = torch.compile(decode_one_token, fullgraph=True, dynamic=dyn)
    if mode == "compile-prefill+decode":
        pre = torch.compile(prefill, fullgraph=True, dynamic=dyn)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=g)
    n = SEED_TOKENS if kind == "seed" else tokens
    steps: list[float] = []
    generated = []
    with torch.inference_mode():
        t_pre = time.monotonic()
        tok = pre(model, ids, cache, torch.arange(prompt))
        t_dec = time.monotonic()
        for i in range(n):
            t = time.monotonic()
            generated.append(tok)
            tok = dec(model, tok, cache, torch.tensor([prompt + i]))
            steps.append(time.monotonic() - t)
    t_end = time.monotonic()
    steady = sorted(steps[1:]) or steps
    out.update(
        total_s=round(t_end - t0, 3),
        build_s=round(t_pre - t_build, 3),
        prefill_s=round(t_dec - t_pre, 3),
        decode_s=round(t_end - t_dec, 3),
        first_decode_s=round(steps[0], 3),
        # steady state without the first (compiling) step: gpt-fast reports compile apart from speed
        decode_ms_per_token=round(1000 * sum(steady) / len(steady), 3),
        decode_ms_p50=round(1000 * steady[len(steady) // 2], 3),
        compile_s=round(_compile_s(), 3),
        tokens_sha=hashlib.sha256(torch.cat(generated, 1).numpy().tobytes()).hexdigest()[:12],
        **_counts(),
    )
    if kind == "seed":
        store, key = _store_key(spec)
        up = Uploader(store, key.name, cache_roots(), "table1", key.factors).upload()
        assert up is not None and not up.error, up
        out.update(upload_s=round(up.seconds, 3), uploaded_bytes=up.bytes_uploaded, uploaded_files=up.files)
    return out


def run_recompiles(spec: dict[str, Any]) -> dict[str, Any]:
    """Prefill compiled once, called with three prompt lengths: how many graphs does Dynamo make?"""
    import torch

    torch.set_num_threads(spec["threads"])
    lengths = spec["lengths"]
    model, cache = build(spec["preset"], 1, max(lengths) + 8)
    pre = torch.compile(prefill, fullgraph=True, dynamic=spec["dynamic"])
    per_call = []
    t0 = time.monotonic()
    with torch.inference_mode():
        for n in lengths:
            ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
            cache.reset()  # a new request: the static cache writes at its own running length
            before = _counts()["unique_graphs"]
            t = time.monotonic()
            pre(model, ids, cache, torch.arange(n))
            per_call.append({"prompt": n, "new_graphs": _counts()["unique_graphs"] - before,
                             "s": round(time.monotonic() - t, 3)})
    return {"dynamic": spec["dynamic"], "lengths": lengths, "calls": per_call,
            "total_s": round(time.monotonic() - t0, 3), "compile_s": round(_compile_s(), 3), **_counts()}


# -- the driver (parent side) ---------------------------------------------------------------------------------------
def spawn(spec: dict[str, Any], cache_dir: Path, *, force_disable: bool) -> dict[str, Any]:
    """Run one cell in a fresh process with an empty Inductor cache dir; the result plus the process's wall time."""
    shutil.rmtree(cache_dir, ignore_errors=True)
    cache_dir.mkdir(parents=True)
    ours = ("TORCHINDUCTOR_", "TORCH_COMPILE", "COMPILE_CACHE")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    env.update(TORCHINDUCTOR_CACHE_DIR=str(cache_dir), OMP_NUM_THREADS=str(spec["threads"]), PYTHONPATH=str(ROOT))
    if force_disable:
        env["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"
    t = time.monotonic()
    cp = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=3600)
    wall = time.monotonic() - t
    line = next((ln for ln in reversed(cp.stdout.splitlines()) if ln.startswith(MARKER)), None)
    if cp.returncode != 0 or line is None:
        raise RuntimeError(f"cell {spec} failed (exit {cp.returncode}):\n{cp.stderr[-3000:]}")
    return {**json.loads(line[len(MARKER):]), "process_wall_s": round(wall, 3)}


def _machine() -> dict[str, Any]:
    import torch
    import transformers

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cpu_isa": torch.backends.cpu.get_cpu_capability(),
            "loadavg_start": os.getloadavg()[0]}


def summarise(cells: list[dict[str, Any]], tokens: int) -> list[dict[str, Any]]:
    """One row per (batch, mode): eager / cold / warm totals side by side, and the decode tokens after which the
    warm compiled run has caught up with eager (its fixed cost over its per-token gain; null: never)."""
    rows = []
    by = {(c["batch"], c["mode"], c["kind"]): c for c in cells}
    for batch in sorted({c["batch"] for c in cells}):
        eager = by.get((batch, "eager", "eager"))
        for mode in MODES:
            if mode == "eager":
                if eager:
                    rows.append({"batch": batch, "mode": mode, "cold_total_s": eager["total_s"],
                                 "warm_total_s": eager["total_s"], "ms_per_token": eager["decode_ms_per_token"]})
                continue
            cold, warm = by.get((batch, mode, "cold")), by.get((batch, mode, "warm"))
            if not (cold and warm):
                continue
            row = {"batch": batch, "mode": mode, "cold_total_s": cold["total_s"], "cold_compile_s": cold["compile_s"],
                   "warm_total_s": warm["total_s"], "warm_restore_s": warm.get("restore_s", 0.0),
                   "warm_compile_s": warm["compile_s"], "ms_per_token": warm["decode_ms_per_token"],
                   "warm_fxgraph_hits": warm["fxgraph_hits"], "warm_fxgraph_misses": warm["fxgraph_misses"]}
            if eager:
                row["same_tokens_as_eager"] = cold["tokens_sha"] == warm["tokens_sha"] == eager["tokens_sha"]
                row["cold_vs_eager"] = round(cold["total_s"] / eager["total_s"], 3)
                row["warm_vs_eager"] = round(warm["total_s"] / eager["total_s"], 3)
                # fixed cost = everything but the steady decode steps
                fixed = warm["total_s"] - (tokens - 1) * warm["decode_ms_per_token"] / 1000
                efixed = eager["total_s"] - (tokens - 1) * eager["decode_ms_per_token"] / 1000
                gain = (eager["decode_ms_per_token"] - warm["decode_ms_per_token"]) / 1000
                row["warm_break_even_tokens"] = (
                    max(0, math.ceil((fixed - efixed) / gain)) if gain > 0 else (0 if fixed <= efixed else None)
                )
            rows.append(row)
    return rows


def markdown(result: dict[str, Any]) -> str:
    def f(v: Any) -> str:
        return "—" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))

    lines = [
        f"Prefill {result['config']['prompt']} tokens + {result['config']['tokens']} decode tokens, preset "
        f"`{result['config']['preset']}`, {result['config']['threads']} thread(s). Times in seconds, inside the "
        "process.",
        "",
        "| batch | mode | cold total | cold compile | warm total | warm restore | warm compile | ms/token "
        "| cold ÷ eager | warm ÷ eager | warm break-even (tokens) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["summary"]:
        lines.append(
            f"| {r['batch']} | {r['mode']} | {f(r['cold_total_s'])} | {f(r.get('cold_compile_s'))} | "
            f"{f(r['warm_total_s'])} | {f(r.get('warm_restore_s'))} | {f(r.get('warm_compile_s'))} | "
            f"{f(r['ms_per_token'])} | {f(r.get('cold_vs_eager'))} | {f(r.get('warm_vs_eager'))} | "
            f"{f(r.get('warm_break_even_tokens'))} |"
        )
    if result.get("recompiles"):
        lines += ["", f"Prefill recompiles over prompt lengths {list(RECOMPILE_LENGTHS)} (batch 1, caches off):", "",
                  "| dynamic | graphs | new graphs per call | compile s |", "|---|---:|---|---:|"]
        for r in result["recompiles"]:
            per = ", ".join(f"{c['prompt']}→{c['new_graphs']}" for c in r["calls"])
            lines.append(f"| {r['dynamic']} | {r['unique_graphs']} | {per} | {f(r['compile_s'])} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="table1-", dir=out))
    store = work / "store"
    base = {"preset": args.preset, "prompt": args.prompt, "tokens": args.tokens, "threads": args.threads,
            "dynamic": None, "store": str(store)}
    result: dict[str, Any] = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "config": {**{k: v for k, v in base.items() if k != "store"}, "batches": args.batches, "modes": args.modes,
                   "model": PRESETS[args.preset]},
        "machine": _machine(),
        "cells": [],
        "recompiles": [],
    }

    def save() -> None:
        result["summary"] = summarise(result["cells"], args.tokens)
        (out / "table1.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "table1.md").write_text(markdown(result))

    def cell(mode: str, batch: int, kind: str) -> None:
        spec = {**base, "mode": mode, "batch": batch, "kind": kind}
        r = spawn(spec, work / "inductor", force_disable=kind in ("cold", "eager"))
        print(f"batch {batch:>3} {mode:<24} {kind:<5} total {r['total_s']:8.2f}s  compile {r['compile_s']:7.2f}s  "
              f"{r['decode_ms_per_token']:7.2f} ms/token", flush=True)
        result["cells"].append(r)
        save()

    try:
        for batch in args.batches:
            for mode in args.modes:
                if mode == "eager":
                    cell(mode, batch, "eager")
                    continue
                for kind in ("cold", "seed", "warm"):
                    cell(mode, batch, kind)
        if args.recompiles:
            for dyn in (False, None, True):
                spec = {**base, "kind": "recompiles", "dynamic": dyn, "lengths": list(RECOMPILE_LENGTHS)}
                r = spawn(spec, work / "inductor", force_disable=True)
                print(f"recompiles dynamic={dyn}: {r['unique_graphs']} graph(s), compile {r['compile_s']:.1f}s",
                      flush=True)
                result["recompiles"].append(r)
                save()
    finally:
        result["machine"]["loadavg_end"] = os.getloadavg()[0]
        save()
        shutil.rmtree(work, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="table1-out", help="directory for table1.json and table1.md")
    ap.add_argument("--quick", action="store_true",
                    help="a tiny model, batch 1, eager vs compile-decode, 8 tokens, no recompile study (tests)")
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=None, help="e.g. 1,4,32")
    ap.add_argument("--tokens", type=int, default=None, help="decode tokens per run (default 1500; quick 8)")
    ap.add_argument("--prompt", type=int, default=None, help="prompt (prefill) length (default 32; quick 8)")
    ap.add_argument("--modes", type=lambda s: s.split(","), default=None, help=",".join(MODES))
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="model size (default small; quick tiny)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per cell (default 1: on a shared 2-core machine, 2 OpenMP threads that\n"
                         "get descheduled made eager decode 15x slower)")
    ap.add_argument("--no-recompiles", dest="recompiles", action="store_false", default=None,
                    help="skip the dynamic=False/None/True recompile count")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        r = run_recompiles(spec) if spec["kind"] == "recompiles" else run_cell(spec)
        print(MARKER + json.dumps(r), flush=True)
        return
    q = args.quick
    args.batches = args.batches or ([1] if q else [1, 4, 32])
    args.tokens = args.tokens or (8 if q else 1500)
    args.prompt = args.prompt or (8 if q else 32)
    args.modes = args.modes or (["eager", "compile-decode"] if q else list(MODES))
    args.preset = args.preset or ("tiny" if q else "small")
    args.recompiles = (not q) if args.recompiles is None else args.recompiles
    bad = set(args.modes) - set(MODES)
    if bad:
        ap.error(f"unknown mode(s) {sorted(bad)}; accepted: {', '.join(MODES)}")
    result = run(args)
    print(markdown(result))


if __name__ == "__main__":
    main()
