"""Restore strategies for the jit path, side by side: which artifact gives the fastest warm boot?

On the example model (predict.py, all-MiniLM-L6-v2, ``strategy="jit"``, its warm-up examples), every boot in a
fresh process with an empty ``TORCHINDUCTOR_CACHE_DIR``:

    eager               load + the warm-up calls, no compile (the floor)
    seed-jit            compile + warm-up from nothing (caches on); then publishes the cache dir to a local store
                        with compile_cache.upload.Uploader and Mega-Cache bytes (torch.compiler.save_cache_artifacts)
    seed-precompile     torch.compile(m, fullgraph=True).forward.aot_compile per warm-up shape, each saved with
                        save_compiled_function; its cache dir published too (for precompile+dir)
    warm-dir            restore the dir snapshot (what compile_cache does), then compile + warm-up
    warm-megacache      read the Mega-Cache bytes, load_cache_artifacts, then compile + warm-up
    warm-precompile     read the saved functions, load_compiled_function, call each on its example
    warm-precompile+dir restore the precompile seed's dir snapshot, then as warm-precompile

Every artifact is read from the same local store (compile_cache.stores.LocalStore), so "restore" is comparable.
Times are inside the process: restore (store read + unpack/load) and compile + warm-up, their sum is ``boot_s``
(model load is the same for all and reported apart). Prints the table and each warm strategy's ratio to warm-dir.

    python scripts/restore_strategies.py --out rs-out [--repeat 2]

Writes ``<out>/restore_strategies.json``. docs/restore-strategies.md has the numbers and the decision.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MARKER = "RESTORE-STRATEGY "
WARM = ("warm-dir", "warm-megacache", "warm-precompile", "warm-precompile+dir")
MEGA_OBJECT = "restore-strategies/megacache.bin"


def _precompile_object(i: int) -> str:
    return f"restore-strategies/precompiled-{i}.bin"


# -- worker side ----------------------------------------------------------------------------------------------------
def _key(store_dir: str, which: str) -> tuple[Any, Any]:
    from compile_cache.factors import environment_factors
    from compile_cache.key import CacheKey
    from compile_cache.stores import open_store

    return open_store(store_dir), CacheKey("restore-strategies", environment_factors({"rs.seed": which}))


def _counts() -> dict[str, int]:
    from compile_cache.compiler import counts

    return {k: v for k, v in counts().__dict__.items()}


def run(kind: str, store_dir: str, threads: int) -> dict[str, Any]:
    """One boot of ``kind`` in this fresh process."""
    import torch

    from compile_cache.compiler import CompiledModel, cache_roots, compile_model
    from compile_cache.entry import Entry
    from compile_cache.precompile import aot_compile_enabled
    from compile_cache.restore import restore
    from compile_cache.trust import TrustPolicy
    from compile_cache.upload import Uploader
    from predict import Runner

    torch.set_num_threads(threads)
    out: dict[str, Any] = {"kind": kind}
    p = Runner()
    cfg = p.compile_config.model_copy(update={"strategy": "jit"})
    t = time.monotonic()
    eager = p.load(None)
    examples = p.warmup_examples()
    out["load_s"] = round(time.monotonic() - t, 3)
    store, key = _key(store_dir, "precompile" if "precompile" in kind else "jit")
    entry = Entry(store, key.name, cache_roots(), key.factors, TrustPolicy())  # a local store of its own: unsigned

    # 1. restore: the artifact from the store into this process / the empty cache dir
    t0 = time.monotonic()
    loaded: list[Any] = []
    if kind in ("warm-dir", "warm-precompile+dir"):
        r = restore(entry)
        assert r.status == "hit", r
        out["artifact_bytes"] = r.bytes_downloaded
    if kind == "warm-megacache":
        data = store.read(MEGA_OBJECT)
        torch.compiler.load_cache_artifacts(data)
        out["artifact_bytes"] = len(data)
    if kind in ("warm-precompile", "warm-precompile+dir"):
        import io

        for i in range(len(examples)):
            data = store.read(_precompile_object(i))
            out["artifact_bytes"] = out.get("artifact_bytes", 0) + len(data)
            loaded.append(torch.compiler.load_compiled_function(io.BytesIO(data), external_data={"model": eager}))
    out["restore_s"] = round(time.monotonic() - t0, 3)

    # 2. compile + warm-up (the calls that requests will make)
    t1 = time.monotonic()
    if kind == "eager":
        m = CompiledModel(eager, eager, cfg)
        out["warmup"], why = m.warm_up(examples)
    elif kind in ("seed-jit", "warm-dir", "warm-megacache"):
        fn, why = compile_model(eager, cfg)
        m = CompiledModel(fn, eager, cfg)
        out["warmup"], why = m.warm_up(examples)
        assert not why, why
    else:
        # A precompiled function keeps the grad mode it was built under in its guards, and inference_mode fails
        # them even when it was built under inference_mode too (measured); no_grad passes, so both sides use it.
        with torch.no_grad():
            if kind == "seed-precompile":
                # transformers' BERT leaves ID_MATCH guards (on torch's gelu, on code objects it inspects) that
                # cannot be serialized (PackageError); keep the portable ones (tensor shapes and dtypes).
                for ex in examples:
                    # a new dict each time: torch.compile pops guard_filter_fn out of the options it is given
                    opts = {"guard_filter_fn": torch.compiler.keep_portable_guards_unsafe}
                    with aot_compile_enabled():
                        compiled = torch.compile(eager.forward, fullgraph=True, dynamic=False, options=opts)
                    loaded.append(compiled.aot_compile((ex.args, {})))
            for fn, ex in zip(loaded, examples, strict=True):
                fn(eager, *ex.args)  # compiled from the bound method: the module is the first argument
    out["compile_warmup_s"] = round(time.monotonic() - t1, 3)
    out["boot_s"] = round(out["restore_s"] + out["compile_warmup_s"], 3)
    out.update(_counts())

    # 3. the seeds publish their artifacts (not timed in boot_s)
    t2 = time.monotonic()
    if kind.startswith("seed-"):
        up = Uploader(entry, "restore-strategies").upload()
        assert up is not None and not up.error, up
        out["dir_bytes"] = up.bytes_uploaded
    if kind == "seed-jit":
        saved = torch.compiler.save_cache_artifacts()
        assert saved is not None, "Mega-Cache recorded nothing"
        _put(store, MEGA_OBJECT, saved[0])
        out["megacache_bytes"] = len(saved[0])
    if kind == "seed-precompile":
        for i, fn in enumerate(loaded):
            with tempfile.NamedTemporaryFile() as f:
                fn.save_compiled_function(f.name, external_data={"model": eager})
                out["precompile_bytes"] = out.get("precompile_bytes", 0) + Path(f.name).stat().st_size
                store.put_immutable(_precompile_object(i), Path(f.name))
    out["publish_s"] = round(time.monotonic() - t2, 3)
    return out


def _put(store: Any, name: str, data: bytes) -> None:
    with tempfile.NamedTemporaryFile() as f:
        f.write(data)
        f.flush()
        store.put_immutable(name, Path(f.name))


# -- driver side ----------------------------------------------------------------------------------------------------
def spawn(kind: str, work: Path, threads: int) -> dict[str, Any]:
    cache_dir = work / "inductor"
    shutil.rmtree(cache_dir, ignore_errors=True)
    cache_dir.mkdir(parents=True)
    ours = ("TORCHINDUCTOR_", "TORCH_COMPILE", "COMPILE_CACHE")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    env.update(TORCHINDUCTOR_CACHE_DIR=str(cache_dir), OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT),
               HF_HUB_OFFLINE="1")
    t = time.monotonic()
    cp = subprocess.run([sys.executable, __file__, "--worker", kind, "--store", str(work / "store"),
                         "--threads", str(threads)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    wall = time.monotonic() - t
    line = next((ln for ln in reversed(cp.stdout.splitlines()) if ln.startswith(MARKER)), None)
    if cp.returncode != 0 or line is None:
        last = cp.stderr.strip().splitlines()[-1] if cp.stderr.strip() else f"exit {cp.returncode}"
        return {"kind": kind, "error": last, "process_wall_s": round(wall, 3)}
    return {**json.loads(line[len(MARKER):]), "process_wall_s": round(wall, 3)}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per kind: every boot_s and the median; each warm strategy's ratio to warm-dir and the compile overhead it
    removes, 1 - (warm - eager) / (seed-jit - eager)."""
    med: dict[str, float] = {}
    rows: dict[str, Any] = {}
    for kind in dict.fromkeys(r["kind"] for r in runs):
        ok = [r for r in runs if r["kind"] == kind and "error" not in r]
        if not ok:
            rows[kind] = {"error": next(r["error"] for r in runs if r["kind"] == kind)}
            continue
        med[kind] = statistics.median(r["boot_s"] for r in ok)
        rows[kind] = {"boot_s": [r["boot_s"] for r in ok], "median_boot_s": round(med[kind], 3),
                      "median_restore_s": round(statistics.median(r["restore_s"] for r in ok), 3),
                      "median_compile_warmup_s": round(statistics.median(r["compile_warmup_s"] for r in ok), 3),
                      "artifact_bytes": ok[0].get("artifact_bytes"),
                      "fxgraph_hits": ok[0]["fxgraph_hits"], "fxgraph_misses": ok[0]["fxgraph_misses"]}
    eager, cold, base = med.get("eager"), med.get("seed-jit"), med.get("warm-dir")
    for kind in WARM:
        if kind in med:
            if base:
                rows[kind]["vs_dir"] = round(med[kind] / base, 3)
            if eager is not None and cold is not None and cold > eager:
                rows[kind]["overhead_removed"] = round(1 - (med[kind] - eager) / (cold - eager), 3)
    return rows


def table(rows: dict[str, Any]) -> str:
    lines = ["| boot | boot s (median) | restore s | compile + warm-up s | artifact MB | fxgraph hit/miss "
             "| ÷ warm-dir | overhead removed |", "|---|---:|---:|---:|---:|---|---:|---:|"]
    for kind, r in rows.items():
        if "error" in r:
            lines.append(f"| {kind} | failed: {r['error'][:80]} | | | | | | |")
            continue
        mb = f"{r['artifact_bytes'] / 1e6:.2f}" if r.get("artifact_bytes") else "—"
        lines.append(f"| {kind} | {r['median_boot_s']:.2f} | {r['median_restore_s']:.2f} | "
                     f"{r['median_compile_warmup_s']:.2f} | {mb} | {r['fxgraph_hits']}/{r['fxgraph_misses']} | "
                     f"{r.get('vs_dir', '—')} | {r.get('overhead_removed', '—')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="restore-strategies-out", help="directory for restore_strategies.json")
    ap.add_argument("--repeat", type=int, default=2, help="boots per warm strategy (medians reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per boot (see scripts/table1.py)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(MARKER + json.dumps(run(args.worker, args.store, args.threads)), flush=True)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="rs-", dir=out))
    import torch

    result: dict[str, Any] = {"command": shlex.join([Path(sys.executable).name, *sys.argv]),
                              "torch": torch.__version__, "threads": args.threads, "runs": []}
    try:
        plan = ["eager", "seed-jit", "seed-precompile"] + [k for _ in range(args.repeat) for k in WARM]
        for kind in plan:
            r = spawn(kind, work, args.threads)
            result["runs"].append(r)
            shown = r.get("error") or f"boot {r['boot_s']:.2f}s (restore {r['restore_s']:.2f}s)"
            print(f"{kind:<20} {shown}", flush=True)
            result["summary"] = summarise(result["runs"])
            (out / "restore_strategies.json").write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(result["summary"]))


if __name__ == "__main__":
    main()
