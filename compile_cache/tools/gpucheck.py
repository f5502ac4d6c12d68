"""``scripts/gpu_check``: the cache proven on one machine, GPU or CPU, in one budgeted command.

For each model of the registry (:mod:`compile_cache.tools.gpucheck_models`), with random weights made in a temp
dir, every boot a new process with fresh ``TORCHINDUCTOR_CACHE_DIR`` and ``TRITON_CACHE_DIR`` (a new "container",
:mod:`compile_cache.tools.benchboot`):

    eager   once per model: COMPILE_CACHE_COMPILE=0, no store
    cold    per run (jit default, jit reduce-overhead, jit max-autotune, export): an empty local store that it fills
    warm    the same run config against that store: restores, then serves; latency (paired with eager), outputs
            vs eager, autotune/Triton counters; the first jit run also times the Table 1 modes

then a foreign-GPU fault against one warm entry; with ``--batching``, last, the example served with batching off
and on under concurrent clients (:mod:`compile_cache.tools.bench_batch` in its quick mode). Results go to ``DIR/gpu_check.json`` (rewritten after every boot,
so a run stopped by its time limit still leaves what it measured) and ``DIR/gpu_check.png``.

``--cpu`` runs the same code paths on CPU at the smallest sizes. There, ``reduce-overhead`` compiles as the default
mode (CUDA graphs need a GPU: compile_model degrades it) and ``max-autotune`` benchmarks nothing (Inductor autotunes
GEMMs among GPU kernels; a cold CPU compile of the LLM check runner under max-autotune counted 0
``select_algorithm_autotune`` on torch 2.13), so both rows share the default row's boots and say so
(``shared_with``); ``--all-modes`` boots them anyway.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..entry import Entry
from ..errors import ToolError
from ..key import fingerprint_of
from ..manifest import Manifest, manifest_name
from ..metrics import write_json_atomic
from ..restore import read_manifest, restore
from ..stores import LocalStore
from ..trust import TrustPolicy
from .bench import overhead_removed, percentiles
from .benchboot import BootFailed, spawn
from .gpucheck_models import MODELS, ROOT, CheckModel, Size

__all__ = ["main", "RUN_KEYS", "TOP_KEYS", "RUNS", "batching_summary", "foreign_gpu_fault", "default_models"]

# gpu_check.json's keys: an interface (add keys, never rename one).
TOP_KEYS = ("device", "torch", "triton", "cuda", "runs", "table1")
RUN_KEYS = ("model", "strategy", "mode", "eager_setup_s", "cold_setup_s", "warm_setup_s", "overhead_removed",
            "warm_cache", "warm_fxgraph_misses", "warm_triton_compiles", "warm_autotune_runs", "outputs_match_eager",
            "eager_ms", "compiled_ms")
KEY_FACTORS = ("device", "gpu.arch", "gpu.name", "cuda", "triton", "cpu.isa", "torch")
# The GPU run must end within 8 minutes, and wheels, the CUDA probe and the chart need time besides the boots
# (docs/benchmarks.md, "Figures behind the code's comments").
GPU_BUDGET_S = 420.0
FIRST_RUN_NEED_S = 60.0  # a run (cold + warm boot) is not started with less left; later: 1.2x the slowest so far
# --batching: the last seconds of the budget, kept from the models (two boots of the example and eight short runs).
BATCHING_S = 180.0
LATENCY_ITERS = {"gpu": 20, "cpu": 5}
TABLE1_ITERS = {"gpu": 3, "cpu": 1}
# Variables a boot's mode is made of; inherited values would blur the modes.
_CONTROLLED = ("COMPILE_CACHE_", "TORCHINDUCTOR_", "TRITON_CACHE_DIR", "GPU_CHECK_")


@dataclass(frozen=True)
class Run:
    strategy: str
    mode: str
    # On CPU: the run whose boots this one reuses, and why (a mode that degrades to it there).
    cpu_shared_with: str = ""
    cpu_why: str = ""

    @property
    def name(self) -> str:
        return f"{self.strategy}/{self.mode}"

    def env(self) -> dict[str, str]:
        e = {"COMPILE_CACHE_STRATEGY": self.strategy}
        if self.mode != "default":
            e["COMPILE_CACHE_MODE"] = self.mode
        return e


# In order of priority: when the budget runs short, the last runs are skipped (and say so).
RUNS = (
    Run("jit", "default"),
    Run("export", "default"),
    Run("jit", "reduce-overhead", "jit/default",
        "reduce-overhead needs CUDA graphs; on CPU compile_model compiles it as the default mode"),
    Run("jit", "max-autotune", "jit/default",
        "on CPU max-autotune benchmarks no choices (0 select_algorithm_autotune measured in a cold CPU compile of "
        "this runner on torch 2.13): the same work as the default mode"),
)


class CheckError(ToolError):
    """A boot failed: its log tail says why."""


def _say(text: str) -> None:
    sys.stdout.write(f"[{datetime.now().strftime('%H:%M:%S')}] {text}\n")
    sys.stdout.flush()


# -- the boots -------------------------------------------------------------------------------------------------------
@dataclass
class Check:
    out: Path
    work: Path
    kind: str  # "gpu" | "cpu"
    deadline: float
    result: dict[str, Any] = field(default_factory=dict)
    quick: bool = False  # --quick: each size's first batch only
    started: float = field(default_factory=time.monotonic)

    def size(self, model: CheckModel) -> Size:
        """The model's size for this machine; with ``--quick`` cut to its first batch (half the cold compiles)."""
        s = model.sizes[self.kind]
        if not self.quick:
            return s
        return replace(s, batches=s.batches[:1], latency_batches=s.latency_batches[:1],
                       table1_batches=s.table1_batches[:1])

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def phase(self, label: str, seconds: float) -> None:
        """Where the time went: one entry per phase, in order, with the check's elapsed time at its end."""
        self.result.setdefault("phases", []).append(
            {"phase": label, "s": round(seconds, 2), "at_s": round(time.monotonic() - self.started, 1)})

    def save(self) -> None:
        self.result["elapsed_s"] = round(time.monotonic() - self.started, 1)
        write_json_atomic(self.out / "gpu_check.json", self.result)

    def boot(self, label: str, model: CheckModel, env: dict[str, str], flags: list[str]) -> dict[str, Any]:
        """One boot in a new process and a new "container" (its own empty cache dirs)."""
        d = self.work / label.replace("/", "-")
        d.mkdir(parents=True)
        base = {k: v for k, v in os.environ.items() if not k.startswith(_CONTROLLED)}
        base["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        if self.kind == "cpu":  # 1 thread: on a shared machine, OpenMP threads waiting for descheduled peers
            base["OMP_NUM_THREADS"] = base["MKL_NUM_THREADS"] = "1"
        full = {
            **base,
            "COMPILE_CACHE_MODEL_VERSION": f"gpu-check-{model.name}",
            "COMPILE_CACHE_PROGRESS": "0",
            "COMPILE_CACHE_METRICS_FILE": str(d / "metrics.json"),
            "COMPILE_CACHE_LOG_FILE": str(d / "log.txt"),
            "TORCHINDUCTOR_CACHE_DIR": str(d / "inductor"),
            "TRITON_CACHE_DIR": str(d / "triton"),
            **env,
        }
        timeout = max(1.0, self.left())
        _say(f"{label}: booting ({timeout:.0f}s left)")
        try:
            r = spawn(["--predictor", model.runner, "--per-part", *flags], env=full, log=d / "stderr.txt",
                      timeout=timeout, cwd=ROOT, tail_lines=25)
        except BootFailed as e:
            raise CheckError(f"{label}: boot {e}") from e
        r["wall_s"] = round(r["wall_s"], 2)
        self.phase(label, r["wall_s"])
        r["dir"] = d
        m = r["metrics"]
        _say(f"{label}: {r['wall_s']:.1f}s wall, setup {m['total_s']:.2f}s, cache {m['cache']}, strategy "
             f"{m['strategy']}, fx graph hits {m['fxgraph_hits']} misses {m['fxgraph_misses']}, precompiled "
             f"built {_precompiled(m, 'built')} loaded {_precompiled(m, 'loaded')}")
        return r


# -- counting --------------------------------------------------------------------------------------------------------
def _triton_kernels(d: Path) -> set[str]:
    """Triton kernel dirs under a TRITON_CACHE_DIR: each compiled kernel leaves its ``__grp__*.json`` group file."""
    if not d.is_dir():
        return set()
    return {p.parent.name for p in d.glob("*/__grp__*.json")}


def _restored(store: Path, key: str) -> tuple[set[str], dict[str, str]]:
    """(Triton kernel dirs the entry holds, the factors it was written with) as a warm boot will find them."""
    m, _ = read_manifest(LocalStore(store), key)
    if m is None:
        return set(), {}
    dirs = {p.split("/")[1] for p in m.files() if p.startswith("triton/") and "/__grp__" in p}
    return dirs, dict(m.factors)


def _p50(samples: list[float]) -> float:
    return round(percentiles(samples)["p50"], 3)


def _row(model: CheckModel, run: Run, eager: dict[str, Any], cold: dict[str, Any], warm: dict[str, Any],
         store: Path) -> dict[str, Any]:
    mc, mw, me = cold["metrics"], warm["metrics"], eager["metrics"]
    restored, factors = _restored(store, mw["key"])
    ctr = warm.get("counters", {})
    present = _triton_kernels(warm["dir"] / "triton")
    compiled_here = present - restored - set(ctr.get("triton_emitted", []))
    lat = warm.get("latency", {})
    outputs = [b["outputs"]["match"] for b in (cold, warm) if "outputs" in b]
    t1 = warm.get("table1", {}).get("rows", [])
    row: dict[str, Any] = {
        "model": model.name,
        "strategy": run.strategy,
        "mode": run.mode,
        "served": mw["strategy"],
        "eager_setup_s": me["total_s"],
        "cold_setup_s": mc["total_s"],
        "warm_setup_s": mw["total_s"],
        "overhead_removed": overhead_removed(me["total_s"], mc["total_s"], mw["total_s"]),
        "warm_cache": mw["cache"],
        "warm_cache_reason": mw["cache_reason"],
        "warm_restore_s": mw["restore_s"],
        "warm_bytes_downloaded": mw["bytes_downloaded"],
        "cold_fxgraph_misses": mc["fxgraph_misses"],
        "warm_fxgraph_hits": mw["fxgraph_hits"],
        "warm_fxgraph_misses": mw["fxgraph_misses"],
        # jit_restore="precompile" (the jit default): functions built cold, loaded warm (no Dynamo, no FX graphs)
        "cold_precompiled_built": _precompiled(mc, "built"),
        "warm_precompiled_loaded": _precompiled(mw, "loaded"),
        "warm_precompiled_fallback": "; ".join(p["precompiled"]["fallback"] for p in mw.get("parts", {}).values()
                                               if p.get("precompiled", {}).get("fallback")),
        "warm_triton_compiles": len(compiled_here),
        "warm_triton_kernels": {"present": len(present), "restored_from_store": len(present & restored),
                                "written_by_fx_bundle": len(ctr.get("triton_emitted", []))},
        "cold_autotune_runs": cold.get("counters", {}).get("select_algorithm_autotune"),
        "warm_autotune_runs": ctr.get("select_algorithm_autotune"),
        "cold_runtime_autotunes": cold.get("counters", {}).get("runtime_autotunes"),
        "warm_runtime_autotunes": ctr.get("runtime_autotunes"),
        "warm_cudagraph_skips": ctr.get("cudagraph_skips"),
        "outputs_match_eager": bool(outputs) and all(outputs) and all(r["same_tokens_as_eager"] for r in t1),
        "outputs_max_abs_diff": max((p["max_abs_diff"] for b in (cold, warm) if "outputs" in b
                                     for p in b["outputs"]["parts"].values()), default=None),
        "eager_ms": {b: _p50(x["eager"]) for b, x in lat.items()},
        "compiled_ms": {b: _p50(x["compiled"]) for b, x in lat.items()},
        "latency_what": "p50 ms of one call of every part (" + ", ".join(warm["parts"]) + ") at each batch, "
                        "compiled and eager paired in the warm process",
        "key": mw["key"],
        "key_factors": {k: factors.get(k) for k in KEY_FACTORS},
        "same_key_cold_warm": mc["key"] == mw["key"],
        "process_s": {"eager": eager["wall_s"], "cold": cold["wall_s"], "warm": warm["wall_s"]},
        "eager_fallback": mw["eager_fallback"],
        "cold_upload": mc["upload_state"],
        "counter_notes": ctr.get("notes", []),
    }
    return row


def _unmeasured(model: CheckModel, run: Run, **why: str) -> dict[str, Any]:
    """A run that was skipped or failed: every key of a row, null, and why."""
    return {**dict.fromkeys(RUN_KEYS), "model": model.name, "strategy": run.strategy, "mode": run.mode, **why}


def _table1(model: CheckModel, eager: dict[str, Any], warm: dict[str, Any]) -> list[dict[str, Any]]:
    """Table 1 cells from the warm jit boot: each mode's setup is the warm boot's, less the compile/warm-up time
    of the parts the mode leaves eager (per-part ``compile_s``, measured in the same boot); eager's is the eager
    boot's. ``total_s`` = setup + one generation (prefill + the runner's decode tokens)."""
    mw, parts = warm["metrics"], warm["metrics"]["parts"]
    rows = []
    for r in warm.get("table1", {}).get("rows", []):
        if not r["compiled_parts"]:
            setup = eager["metrics"]["total_s"]
        else:
            setup = mw["total_s"] - sum(p["compile_s"] for n, p in parts.items() if n not in r["compiled_parts"])
        rows.append({"model": model.name, "batch": r["batch"], "mode": r["mode"], "warm_setup_s": round(setup, 3),
                     "generate_ms": round(r["generate_ms"], 3), "tokens": r["tokens"],
                     "total_s": round(setup + r["generate_ms"] / 1e3, 3),
                     "same_tokens_as_eager": r["same_tokens_as_eager"]})
    by = {(r["batch"], r["mode"]): r for r in rows}
    for r in rows:
        e = by.get((r["batch"], "eager"))
        if e:
            r["total_vs_eager"] = round(r["total_s"] / e["total_s"], 3) if e["total_s"] else None
            r["generate_vs_eager"] = round(r["generate_ms"] / e["generate_ms"], 3) if e["generate_ms"] else None
    return rows


# -- the foreign-GPU fault -------------------------------------------------------------------------------------------
def foreign_gpu_fault(store: Path, key: str, work: Path) -> dict[str, Any]:
    """Copy the entry ``key``, edit its GPU factors as another machine would have written them (``gpu.arch`` changed,
    or added where there is none), recompute the fingerprint so the manifest is self-consistent, put it where this
    machine's key is read, and restore it with this machine's factors: the restore must refuse it, naming the
    factor, and place nothing."""
    copy = work / "foreign-store"
    shutil.copytree(store, copy)
    st = LocalStore(copy)
    m, token = read_manifest(st, key)
    if m is None:
        return {"status": "not run", "reason": f"no entry {key} in {store}"}
    ours = dict(m.factors)
    theirs = dict(ours)
    old = ours.get("gpu.arch")
    theirs["gpu.arch"] = ("sm_80" if old != "sm_80" else "sm_90") if old else "sm_90"
    body = m.model_dump(mode="json")
    body.update(factors=theirs, fingerprint=fingerprint_of(theirs), signature=None)
    data = json.dumps(body, sort_keys=True, indent=1).encode()
    Manifest.from_bytes(data)  # self-consistent: a reader's integrity check passes, only the factors differ
    st.put_conditional(manifest_name(key), data, token)
    dest = work / "foreign-restore"
    r = restore(Entry(st, key, {"inductor": dest / "inductor", "triton": dest / "triton"}, ours, TrustPolicy()))
    placed = sum(1 for p in dest.rglob("*") if p.is_file()) if dest.exists() else 0
    return {
        "status": r.status,
        "reason": r.reason,
        "factor": "gpu.arch",
        "edited": {"gpu.arch": [old, theirs["gpu.arch"]]},
        "names_the_factor": "gpu.arch" in r.reason,
        "files_placed": placed,
        "key": key,
    }


# -- batching --------------------------------------------------------------------------------------------------------
def batching_summary(batch: dict[str, Any]) -> dict[str, Any]:
    """gpu_check.json's ``batching`` from bench_batch's batch.json: its runs, targets and servers, as they are."""
    keep = ("served_compiled", "cache", "strategy", "setup_s", "concurrency", "request_path_compiles", "error")
    return {
        "runs": batch.get("runs", []),
        "targets": batch.get("targets", {}),
        "servers": {k: {f: s.get(f) for f in keep} for k, s in batch.get("servers", {}).items()},
        "weights": batch.get("weights"),
        "warnings": batch.get("warnings", []),
    }


def _batching(c: Check) -> int:
    """``python -m compile_cache.tools.bench_batch --quick`` into ``OUT/batch`` in what is left of the budget
    (random weights at the example's shapes where ``weights/`` has none); its exit status. On the time limit it is
    interrupted (SIGINT), so that it stops its servers."""
    left = c.left()
    if left < BATCHING_S / 2:  # not even the two boots and the runs on a fast machine
        c.result["batching"] = {"skipped": f"budget: {left:.0f}s left, it needs at least {BATCHING_S / 2:.0f}s"}
        return 0
    out = c.out / "batch"
    cmd = [sys.executable, "-m", "compile_cache.tools.bench_batch", "--out", str(out), "--quick",
           "--timeout", f"{left / 2:.0f}"]
    if not (ROOT / "weights" / "all-MiniLM-L6-v2" / "model.safetensors").is_file():
        cmd.append("--random-weights")
    _say(f"batching: {shlex.join(cmd[1:])} ({left:.0f}s left)")
    t = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "log.txt", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            rc: int | None = proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            rc = None
    c.phase("batching", time.monotonic() - t)
    try:
        batch = json.loads((out / "batch.json").read_text())
    except (OSError, ValueError):
        batch = {}
    c.result["batching"] = {**batching_summary(batch), "exit_code": rc, "log": "batch/log.txt"}
    for x in batch.get("runs", []):
        _say(f"batching {'on' if x['batching'] else 'off'}, {x['clients']} clients: {x['throughput_per_s']}/s, "
             f"p50 {x['p50_ms']} ms, p99 {x['p99_ms']} ms, mean batch {x['mean_batch']}")
    return 0 if rc == 0 else 1


# -- the chart -------------------------------------------------------------------------------------------------------
def _chart(path: Path, res: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in res["runs"] if r.get("cold_setup_s") is not None]
    t1 = res["table1"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    title = f"compile_cache gpu_check: {res['device']}, torch {res['torch']}"
    if res.get("cuda"):
        title += f", CUDA {res['cuda']}, Triton {res['triton']}"
    fig.suptitle(title + f" ({res['timestamp']})", fontsize=10)

    ax = axes[0]
    names = [f"{r['model']}\n{r['strategy']}/{r['mode']}" + ("\n(shared)" if r.get("shared_with") else "")
             for r in runs]
    x = range(len(runs))
    w = 0.27
    for i, (k, c, lab) in enumerate((("eager_setup_s", "#7f7f7f", "eager"), ("cold_setup_s", "#d62728", "cold"),
                                     ("warm_setup_s", "#2ca02c", "warm"))):
        ax.bar([j + (i - 1) * w for j in x], [r[k] for r in runs], w, color=c, label=lab)
    for j, r in enumerate(runs):
        if r.get("overhead_removed") is not None:
            ax.text(j, r["cold_setup_s"], f"{100 * r['overhead_removed']:.0f}%", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), names, fontsize=7)
    ax.set_ylabel("setup s (in the boot process)")
    ax.set_title("boots: eager / cold / warm (label: overhead removed)", fontsize=9)
    ax.legend(fontsize=8)

    ax = axes[1]
    bars = [(r, b) for r in runs for b in r["eager_ms"]]
    xs = range(len(bars))
    ax.bar([j - 0.2 for j in xs], [r["eager_ms"][b] for r, b in bars], 0.4, color="#7f7f7f", label="eager")
    ax.bar([j + 0.2 for j in xs], [r["compiled_ms"][b] for r, b in bars], 0.4, color="#1f77b4", label="compiled")
    ax.set_xticks(list(xs), [f"{r['strategy']}/{r['mode']}\nbatch {b}" for r, b in bars], fontsize=6, rotation=60)
    ax.set_ylabel("ms per call of every part (p50)")
    ax.set_title("latency in the warm process, paired", fontsize=9)
    ax.legend(fontsize=8)

    ax = axes[2]
    if t1:
        modes = list(dict.fromkeys(r["mode"] for r in t1))
        batches = sorted({r["batch"] for r in t1})
        by = {(r["batch"], r["mode"]): r for r in t1}
        w = 0.8 / len(modes)
        for i, mode in enumerate(modes):
            ax.bar([j + (i - (len(modes) - 1) / 2) * w for j in range(len(batches))],
                   [by[(b, mode)]["total_s"] if (b, mode) in by else 0 for b in batches], w, label=mode)
        ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
        ax.set_ylabel("warm setup + one generation, s")
        ax.legend(fontsize=8)
    ax.set_title("Table 1 modes, warm", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the driver ------------------------------------------------------------------------------------------------------
def _check_model(c: Check, model: CheckModel, runs: tuple[Run, ...], all_modes: bool) -> None:
    size = c.size(model)
    if c.left() < FIRST_RUN_NEED_S:  # a model after others: no eager boot to be cut off by the budget mid-way
        _say(f"{model.name}: skipped, {c.left():.0f}s left of the budget")
        c.result["runs"] += [_unmeasured(model, run, skipped=f"budget: {c.left():.0f}s left before this model, a "
                                                               f"run needs about {FIRST_RUN_NEED_S:.0f}s")
                             for run in runs]
        c.save()
        return
    wdir = c.work / f"weights-{model.name}"
    t = time.monotonic()
    model.make_weights(wdir, size.weights)
    c.phase(f"{model.name}/weights", time.monotonic() - t)
    _say(f"{model.name}: random weights ({size.weights}) in {time.monotonic() - t:.1f}s")
    menv = {model.weights_env: str(wdir), **size.env}
    lat = ["--latency-iters", str(LATENCY_ITERS[c.kind]), "--batches", ",".join(map(str, size.latency_batches))]
    eager = c.boot(f"{model.name}/eager", model, {**menv, "COMPILE_CACHE_COMPILE": "0", "COMPILE_CACHE_DISABLE": "1",
                                                  "GPU_CHECK_BATCHES": ",".join(map(str, size.batches))}, [])
    for k in ("device", "torch", "triton", "cuda"):
        c.result[k] = c.result.get(k) or eager[k]
    c.save()
    done: dict[str, dict[str, Any]] = {}
    first_jit = True
    need = FIRST_RUN_NEED_S
    for run in runs:
        label = f"{model.name}/{run.name}"
        if c.kind == "cpu" and run.cpu_shared_with and not all_modes and run.cpu_shared_with in done:
            row = {**done[run.cpu_shared_with], "strategy": run.strategy, "mode": run.mode,
                   "shared_with": run.cpu_shared_with, "shared_why": run.cpu_why}
            c.result["runs"].append(row)
            c.save()
            continue
        if c.left() < need:
            _say(f"{label}: skipped, {c.left():.0f}s left of the budget and a run took up to {need / 1.2:.0f}s")
            c.result["runs"].append(_unmeasured(model, run, skipped=f"budget: {c.left():.0f}s left, a run needs "
                                                                    f"about {need:.0f}s"))
            c.save()
            continue
        store = c.work / f"store-{label.replace('/', '-')}"
        t1 = first_jit and run.strategy == "jit" and bool(size.table1_batches)
        # The Table 1 run declares every size's batch; the others only the two latency is reported at (fewer graphs
        # to compile cold: the budget).
        batches = size.batches if t1 else size.latency_batches
        env = {**menv, **run.env(), "COMPILE_CACHE_URL": str(store), "GPU_CHECK_BATCHES": ",".join(map(str, batches))}
        t = time.monotonic()
        try:
            cold = c.boot(f"{label}/cold", model, env, ["--check-outputs", "--counters"])
            flags = ["--check-outputs", "--counters", *lat]
            if t1:
                flags += ["--table1-iters", str(TABLE1_ITERS[c.kind]),
                          "--table1-batches", ",".join(map(str, size.table1_batches))]
            warm = c.boot(f"{label}/warm", model, env, flags)
        except CheckError as e:
            _say(f"ERROR {e}")
            c.result["runs"].append(_unmeasured(model, run, error=str(e)))
            c.save()
            continue
        need = max(need, 1.2 * (time.monotonic() - t))
        row = _row(model, run, eager, cold, warm, store)
        row["batches"] = list(batches)
        done[run.name] = row
        c.result["runs"].append(row)
        _say(f"{label}: warm cache {row['warm_cache']}, fx misses {row['warm_fxgraph_misses']}, Triton compiles "
             f"{row['warm_triton_compiles']}, autotunes {row['warm_autotune_runs']}, outputs match "
             f"{row['outputs_match_eager']}, overhead removed {row['overhead_removed']}")
        if t1:
            first_jit = False
            c.result["table1"] += _table1(model, eager, warm)
            c.result["table1_how"] = _table1.__doc__.split("\n\n")[0].replace("\n    ", " ")
        if "foreign_gpu" not in c.result and row["warm_cache"] == "hit":
            t = time.monotonic()
            c.result["foreign_gpu"] = fg = foreign_gpu_fault(store, row["key"], c.work / "foreign")
            c.phase("foreign-gpu fault", time.monotonic() - t)
            _say(f"foreign-GPU fault: {fg['status']}: {fg['reason']}")
        c.save()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="where gpu_check.json and gpu_check.png go")
    ap.add_argument("--cpu", action="store_true", help="the same code paths on CPU, at the smallest sizes")
    ap.add_argument("--models", default=None,
                    help=f"comma-separated, of {', '.join(MODELS)} (default: all on a GPU; with --cpu: "
                         f"{', '.join(default_models('cpu'))})")
    ap.add_argument("--budget-s", type=float, default=None,
                    help=f"stop starting boots past this (default: {GPU_BUDGET_S:.0f} on a GPU, none with --cpu)")
    ap.add_argument("--all-modes", action="store_true", help="with --cpu: boot the modes that share the default's")
    ap.add_argument("--quick", action="store_true",
                    help="each model at its first batch size only: half the cold compiles (the test uses it)")
    ap.add_argument("--batching", action="store_true",
                    help=f"last, the example with batching off and on under concurrent clients (its own "
                         f"{BATCHING_S:.0f}s of the budget; DIR/batch)")
    ap.add_argument("--keep-work", action="store_true", help="keep the boots' dirs and logs (printed)")
    args = ap.parse_args(argv)

    kind = "cpu" if args.cpu else "gpu"
    if args.models is None:
        wanted = default_models(kind)
    else:
        wanted = [m for m in args.models.split(",") if m]
    unknown = sorted(set(wanted) - set(MODELS))
    if unknown:
        ap.error(f"unknown model(s) {unknown}; registered: {', '.join(MODELS)}")
    if kind == "gpu" and not _has_cuda():
        ap.error("no CUDA device visible to torch here: run with --cpu, or on the GPU machine (docs/gpu.md)")
    budget = args.budget_s if args.budget_s is not None else (GPU_BUDGET_S if kind == "gpu" else 24 * 3600.0)
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    end = time.monotonic() + budget
    c = Check(args.out, work, kind, end - (BATCHING_S if args.batching else 0.0), quick=args.quick)
    c.result = {
        "device": None, "torch": None, "triton": None, "cuda": None, "runs": [], "table1": [],
        "kind": kind,
        "quick": args.quick,
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["scripts/gpu_check", *(sys.argv[1:] if argv is None else argv)]),
        "budget_s": budget,
        "sizes": {},
        "models_unavailable": {},
    }
    if kind == "cpu" and not args.all_modes:
        c.result["cpu_shared"] = {r.name: {"shared_with": r.cpu_shared_with, "why": r.cpu_why}
                                  for r in RUNS if r.cpu_shared_with}
    _say(f"gpu_check ({kind}): models {', '.join(wanted)}; budget {budget:.0f}s; work dir {work}")
    rc = 0
    try:
        for name in wanted:
            model = MODELS[name]
            why = model.unavailable()
            if why:
                c.result["models_unavailable"][name] = why
                _say(f"{name}: skipped ({why})")
                continue
            size = c.size(model)
            c.result["sizes"][name] = {"weights": size.weights, "batches": list(size.batches),
                                       "latency_batches": list(size.latency_batches),
                                       "table1_batches": list(size.table1_batches), **size.env}
            try:
                _check_model(c, model, RUNS, args.all_modes)
            except CheckError as e:  # the eager boot failed: nothing of this model can be compared
                _say(f"ERROR {e}")
                c.result.setdefault("errors", []).append(str(e))
                rc = 1
        if any("error" in r for r in c.result["runs"]):
            rc = 1
        if args.batching:
            c.deadline = end
            rc = _batching(c) or rc
    finally:
        c.save()
        try:
            _chart(args.out / "gpu_check.png", c.result)
        except Exception as e:  # the JSON is the result; a chart that fails must not hide it
            _say(f"chart failed: {type(e).__name__}: {e}")
            rc = rc or 1
        if args.keep_work:
            _say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    _say(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.png'} in {c.result['elapsed_s']:.0f}s")
    return rc


def default_models(kind: str) -> list[str]:
    """``--models``' default: every registered model on a GPU; on CPU those cheap enough there (``cpu_default``)."""
    return [n for n, m in MODELS.items() if kind == "gpu" or m.cpu_default]


def _has_cuda() -> bool:
    """Whether torch sees a CUDA device, asked in a child process (this one stays free of torch and CUDA)."""
    cp = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                        capture_output=True, text=True, timeout=300)
    return cp.stdout.strip() == "True"


def _precompiled(metrics: dict[str, Any], what: str) -> int:
    return sum(p.get("precompiled", {}).get(what, 0) for p in metrics.get("parts", {}).values())
