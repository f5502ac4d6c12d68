"""``python -m compile_cache bench``: eager, cold and warm boots side by side, then latency and break-even.

Every boot runs in a fresh process (:mod:`compile_cache.tools.benchboot`) so Dynamo/Inductor state never leaks:

    eager  COMPILE_CACHE_COMPILE=0, store off
    cold   compiled, TORCHINDUCTOR_FORCE_DISABLE_CACHES=1, empty TORCHINDUCTOR_CACHE_DIR, store off
    seed   compiled, empty TORCHINDUCTOR_CACHE_DIR, a fresh local store that this boot fills
    warm   compiled, empty TORCHINDUCTOR_CACHE_DIR, the seeded store: a new container (restore counted in setup)

Setup time is the predictor's own ``total_s`` metric (setup wall time inside the process); the time from spawn to
ready (interpreter, imports, setup) is recorded beside it. Steady-state latency is measured in the warm process,
compiled and eager calls paired back to back (the same load for both; the eager one is the served wrapper around the
uncompiled model), compile time apart (a warm-up call not counted), as gpt-fast reports it.

A runner with several parts (``load()`` returned ``{name: Part}``) is measured per request: requests and latency go
through ``run()`` with its default inputs (tag ``run``), each part is also timed alone on what ``run()`` gave it (tag
``part_<name>``), and break-even is per ``run()`` request; it has no ``*_b1``/``*_b16`` keys (no batch sizes of its
own), every other key is the same.

Break-even at batch 1 (p50): the requests after which the compiled server has caught up with an eager one,
``ceil((setup_compiled - setup_eager) / (eager_latency - compiled_latency))``, for the cold and the warm setup;
0 if the compiled boot is no slower, null if compiled is not faster per request (it never pays back).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import ToolError
from ..metrics import write_json_atomic
from .benchboot import BootFailed, spawn

__all__ = ["main", "REQUIRED_KEYS", "break_even", "overhead_removed", "percentiles"]

# bench.json keys scripts rely on: add keys, never rename one.
REQUIRED_KEYS = (
    "eager_setup_s",
    "cold_setup_s",
    "warm_setup_s",
    "overhead_removed",
    "eager_p50_ms_b1",
    "compiled_p50_ms_b1",
    "eager_p50_ms_b16",
    "compiled_p50_ms_b16",
    "request_path_compiles",
    "break_even_requests_cold",
    "break_even_requests_warm",
)
DEFAULT_OUT = "bench-out"
BATCHES = (1, 16)
BOOT_TIMEOUT_S = 3600
# Variables the bench sets per boot; inherited values would blur the modes. Others (COMPILE_CACHE_BACKEND, ...)
# pass through to every boot and are recorded in bench.json.
_CONTROLLED = (
    "COMPILE_CACHE_URL",
    "COMPILE_CACHE_DISABLE",
    "COMPILE_CACHE_COMPILE",
    "COMPILE_CACHE_METRICS_FILE",
    "COMPILE_CACHE_LOG_FILE",
    "COMPILE_CACHE_UPLOAD_INTERVAL_S",
    "COMPILE_CACHE_PROGRESS",
    "TORCHINDUCTOR_CACHE_DIR",
    "TORCHINDUCTOR_FORCE_DISABLE_CACHES",
    "TORCHINDUCTOR_FX_GRAPH_CACHE",
    "TORCHINDUCTOR_AUTOGRAD_CACHE",
    "TRITON_CACHE_DIR",
)


class BenchError(ToolError):
    """A boot failed or produced no result: the benchmark cannot be trusted."""


def _say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _error(text: str) -> None:
    sys.stderr.write(f"error: {text}\n")


# -- arithmetic ------------------------------------------------------------------------------------------------------
def percentiles(samples: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99 with linear interpolation between order statistics (numpy's default)."""
    if len(samples) == 1:
        return {"p50": samples[0], "p90": samples[0], "p99": samples[0]}
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return {"p50": q[49], "p90": q[89], "p99": q[98]}


def overhead_removed(eager_s: float, cold_s: float, warm_s: float) -> float | None:
    """1 − (warm − eager)/(cold − eager): the share of the compile overhead the warm cache removes."""
    if cold_s <= eager_s:
        return None
    return 1.0 - (warm_s - eager_s) / (cold_s - eager_s)


def break_even(setup_compiled_s: float, setup_eager_s: float, eager_ms: float, compiled_ms: float) -> int | None:
    """Requests after which compiling has paid for its extra boot time (see the module docstring)."""
    extra_s = setup_compiled_s - setup_eager_s
    if extra_s <= 0:
        return 0
    gain_s = (eager_ms - compiled_ms) / 1e3
    if gain_s <= 0:
        return None
    return math.ceil(extra_s / gain_s)


# -- the boots -------------------------------------------------------------------------------------------------------
def _base_env(strategy: str, threads: int | None) -> tuple[dict[str, str], dict[str, str]]:
    """(environment for every boot, the framework/torch variables passed through as they are)."""
    env = {k: v for k, v in os.environ.items() if k not in _CONTROLLED}
    if strategy != "default":
        env["COMPILE_CACHE_STRATEGY"] = strategy
    if threads is not None:  # torch reads it at start-up: intra-op threads of eager and compiled code alike
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env["COMPILE_CACHE_PROGRESS"] = "0"
    root = str(Path(__file__).resolve().parents[2])  # so `-m compile_cache.tools.benchboot` imports this package
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    passed = {
        k: ("***" if "KEY" in k or "SECRET" in k else v)
        for k, v in sorted(env.items())
        if k.startswith(("COMPILE_CACHE_", "TORCH", "COG_", "OMP_", "MKL_")) and k != "COMPILE_CACHE_PROGRESS"
    }
    return env, passed


def _plan(work: Path) -> list[tuple[str, str, dict[str, str]]]:
    store = str(work / "store")
    return [
        ("eager", "eager, no compile", {"COMPILE_CACHE_COMPILE": "0", "COMPILE_CACHE_DISABLE": "1"}),
        (
            "cold",
            "compiled, every Torch cache disabled",
            {"COMPILE_CACHE_COMPILE": "1", "COMPILE_CACHE_DISABLE": "1", "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"},
        ),
        ("seed", "compiled, cold, seeding a fresh store", {"COMPILE_CACHE_COMPILE": "1", "COMPILE_CACHE_URL": store}),
        (
            "warm",
            "compiled, new container, warm from the store",
            {"COMPILE_CACHE_COMPILE": "1", "COMPILE_CACHE_URL": store},
        ),
    ]


# What each boot measures besides setup: request-path compiles where a compile could happen on a request (cold and
# warm: the seed boot is the cold one with caches on); latency in the warm (served) process, compiled and eager
# calls paired so both see the same load (see benchboot._latency).
_REQUESTS_IN = ("cold", "warm")
_LATENCY_IN = ("warm",)


def _run_boot(name: str, env: dict[str, str], work: Path, logs: Path, args: argparse.Namespace) -> dict[str, Any]:
    d = work / name
    d.mkdir(parents=True)
    env = {
        **env,
        "TORCHINDUCTOR_CACHE_DIR": str(d / "inductor"),
        "COMPILE_CACHE_METRICS_FILE": str(d / "metrics.json"),
        "COMPILE_CACHE_LOG_FILE": str(d / "log.txt"),
    }
    log = logs / f"{name}.log"
    cmd = ["--predictor", args.predictor, "--batches", ",".join(map(str, BATCHES))]
    if name in _REQUESTS_IN:
        cmd += ["--requests", str(args.requests)]
    if name in _LATENCY_IN:
        cmd += ["--latency-iters", str(args.latency_iters)]
    try:
        r = spawn(cmd, env=env, log=log, timeout=BOOT_TIMEOUT_S)
    except BootFailed as e:
        raise BenchError(f"{name} boot {e}") from e
    write_json_atomic(logs / f"{name}.json", r)  # the raw result beside the boot's log
    return r


# -- the result ------------------------------------------------------------------------------------------------------
def _machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# The checkout this bench runs from: bench.json names paths inside it relative to it, so a committed result
# (docs/bench/) says how to rerun it from any checkout and does not carry one engineer's worktree path.
REPO_ROOT = Path(__file__).resolve().parents[2]


def repo_relative(text: str) -> str:
    """``text`` with this checkout's absolute path taken out: the root itself -> ``.``, a path under it -> relative
    (also inside a ``FILE.py:CLASS`` reference). Paths elsewhere (``--out /tmp/x``) stay as they are."""
    root = str(REPO_ROOT)
    if text == root:
        return "."
    return text.replace(root + os.sep, "")


def _load_avg() -> list[float] | None:
    """1/5/15-minute load averages: on a shared machine, how much the timings were disturbed."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _summarize(boots: dict[str, dict[str, Any]], args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    m = {k: b["metrics"] for k, b in boots.items()}
    setup = {k: float(v["total_s"]) for k, v in m.items()}
    warnings: list[str] = []
    res: dict[str, Any] = {f"{k}_setup_s": v for k, v in setup.items()}
    res.update({f"{k}_process_s": b["process_ready_s"] for k, b in boots.items()})
    res["overhead_removed"] = overhead_removed(setup["eager"], setup["cold"], setup["warm"])
    # What a warm boot still pays that an eager one does not, measured side by side in this run.
    res["warm_fixed_s"] = round(setup["warm"] - setup["eager"], 4)
    # The eager boot runs the warm-up plan too (uncompiled): part of eager_setup_s, shown so it can be discounted.
    res["eager_warmup_s"] = m["eager"]["compile_s"]

    lat: dict[str, Any] = {}
    samples: dict[str, Any] = {}
    for want, x in boots["warm"]["latency"].items():
        # one part: "b<batch>"; several parts: "run" (one run() request) and "part_<name>" (see benchboot)
        tag = f"b{want}" if want.isdigit() else want
        for who in ("eager", "compiled"):
            for p, v in percentiles(x[who]).items():
                res[f"{who}_{p}_ms_{tag}"] = round(v, 3)
            samples[f"{who}_{tag}"] = [round(s, 3) for s in x[who]]
        lat[tag] = {"batch": x["batch"], "example": x["example"]}
        if want.isdigit() and x["batch"] != int(want):
            warnings.append(
                f"no declared example has batch {want}: the {tag} figures are at batch {x['batch']} ({x['example']})"
            )

    rp = {k: b["request_path"] for k, b in boots.items() if "request_path" in b}
    # The framework's own counter; Dynamo's graph counter as a cross-check (the larger is reported, never hidden).
    res["request_path_compiles"] = sum(max(r["framework"], r["dynamo_graphs"]) for r in rp.values())
    if any(r["framework"] != r["dynamo_graphs"] for r in rp.values()):
        warnings.append(f"request-path compile counters disagree (framework vs Dynamo): {rp}")

    # Break-even per request: at batch 1 for one part; for several parts, per run() request with default inputs.
    per, what = ("b1", "batch 1") if "b1" in lat else ("run", "one run() request")
    res["parts"] = boots["warm"].get("parts")
    e1, c1 = res[f"eager_p50_ms_{per}"], res[f"compiled_p50_ms_{per}"]
    res["break_even_requests_cold"] = break_even(setup["cold"], setup["eager"], e1, c1)
    res["break_even_requests_warm"] = break_even(setup["warm"], setup["eager"], e1, c1)
    res["break_even_formula"] = (
        f"ceil((setup_compiled_s - eager_setup_s) / ((eager_p50_ms_{per} - compiled_p50_ms_{per}) / 1000))"
    )
    if c1 >= e1:
        res["break_even_note"] = (
            f"null: compiled is not faster than eager at {what} (p50 {c1:.2f} ms vs {e1:.2f} ms), "
            f"so compiling never pays back its boot time at {what}"
        )
    for name in ("cold", "seed", "warm"):
        if m[name]["eager_fallback"]:
            warnings.append(f"the {name} boot served EAGER: {m[name]['eager_fallback']}")
        if args.strategy != "default" and m[name]["strategy"] != args.strategy:
            warnings.append(f"the {name} boot asked for {args.strategy} and ran {m[name]['strategy']} (see its log)")
    if m["warm"]["cache"] != "hit":
        warnings.append(f"the warm boot was not a cache hit: {m['warm']['cache']} {m['warm']['cache_reason']}")
    if m["seed"]["upload_state"] != "done":
        warnings.append(f"the seed boot's upload ended {m['seed']['upload_state']}: {m['seed']['upload_error']}")

    loads = [x[0] for x in (args.load_before, _load_avg()) if x]
    threads, ncpu = boots["warm"]["torch_threads"], os.cpu_count() or 1
    if threads > 1 and loads and max(loads) > ncpu:
        # Under load, spinning OpenMP threads make a multi-threaded p50 many times the 1-thread one (docs/benchmarks.md,
        # "Threads on a busy machine"), so the figures would mislead without this warning.
        warnings.append(
            f"the machine was busy (1-min load up to {max(loads):.1f} on {ncpu} CPUs) and torch used {threads} "
            "threads: OpenMP threads wait for descheduled peers, so latencies are inflated and noisy; rerun when "
            "it is idle, or with --threads 1"
        )

    import torch

    res.update(
        {
            "strategy": m["warm"]["strategy"],
            "strategy_requested": args.strategy,
            "predictor": repo_relative(args.predictor),
            "torch_version": torch.__version__,
            "torch_threads": threads,
            "threads_requested": args.threads,
            "machine": {**_machine(), "load_avg_before": args.load_before, "load_avg_after": _load_avg()},
            "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": "python -m compile_cache bench " + shlex.join(repo_relative(a) for a in argv),
            "cwd": repo_relative(os.getcwd()),  # relative to the checkout ("." for its root)
            "env_passed": args.env_passed,
            "requests": args.requests,
            "latency_iters": args.latency_iters,
            "latency_method": "paired: compiled and eager calls back to back in the warm process, order alternating",
            "latency_examples": lat,
            "warm_cache": m["warm"]["cache"],
            "warm_restore_s": m["warm"]["restore_s"],
            "warm_bytes_downloaded": m["warm"]["bytes_downloaded"],
            "boots": {
                k: {
                    "setup_s": setup[k],
                    "process_ready_s": b["process_ready_s"],
                    "restore_s": m[k]["restore_s"],
                    "load_s": m[k]["load_s"],
                    "compile_s": m[k]["compile_s"],
                    "cache": m[k]["cache"],
                    "strategy": m[k]["strategy"],
                    "compiled": b["compiled"],
                    "compiles": m[k]["compiles"],
                    "graph_breaks": m[k]["graph_breaks"],
                    "fxgraph_hits": m[k]["fxgraph_hits"],
                    "fxgraph_misses": m[k]["fxgraph_misses"],
                    "eager_fallback": m[k]["eager_fallback"],
                    "upload_state": m[k]["upload_state"],
                    "bytes_uploaded": m[k]["bytes_uploaded"],
                    "request_path": b.get("request_path"),
                }
                for k, b in boots.items()
            },
            "samples_ms": samples,
            "warnings": warnings,
        }
    )
    return res


def _fmt(v: Any, unit: str = "", nd: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}{unit}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def _report(r: dict[str, Any], out: Path) -> str:
    b = r["boots"]
    mc = r["machine"]
    lines = [
        f"compile_cache bench: {r['predictor']}, strategy {r['strategy']}, torch {r['torch_version']}, "
        f"{mc['nproc']} CPUs ({mc['cpu']}), load {mc['load_avg_before']} -> {mc['load_avg_after']}, {r['timestamp']}",
        "boots (setup = the predictor's total_s; process = spawn to ready)",
    ]
    for k, what in (("eager", "no compile"), ("cold", "all Torch caches off"), ("seed", "cold, seeds the store"),
                    ("warm", f"new container, cache {b['warm']['cache']}, restore {b['warm']['restore_s']:.2f}s")):
        x = b[k]
        vs = "" if k == "eager" else f", {x['strategy']}, {x['setup_s'] - r['eager_setup_s']:+.2f}s vs eager"
        lines.append(f"  {k:<6} setup {x['setup_s']:7.2f}s  process {x['process_ready_s']:7.2f}s  ({what}{vs})")
    lines.append(
        f"  warm vs cold setup: {_ratio(r['cold_setup_s'], r['warm_setup_s'])} faster; "
        f"overhead removed {_fmt(None if r['overhead_removed'] is None else r['overhead_removed'] * 100, ' %', 1)}; "
        f"warm fixed cost {r['warm_fixed_s']:+.2f}s (warm setup minus eager setup)"
    )
    lines.append(
        f"latency ms p50 / p90 / p99 ({r['latency_iters']} paired calls each in the warm process, "
        f"{r['torch_threads']} torch thread(s), 1 warm-up not counted)"
    )
    for tag, ex in r["latency_examples"].items():
        e = [r[f"eager_{p}_ms_{tag}"] for p in ("p50", "p90", "p99")]
        c = [r[f"compiled_{p}_ms_{tag}"] for p in ("p50", "p90", "p99")]
        lines.append(
            f"  {tag:<4} {ex['example']:<20} eager {' / '.join(f'{v:.2f}' for v in e)}   "
            f"compiled {' / '.join(f'{v:.2f}' for v in c)}   speed-up {_ratio(e[0], c[0])}"
        )
    rp = {k: v["request_path"]["requests"] for k, v in b.items() if v["request_path"]}
    counted = " + ".join(f"{n} {k}" for k, n in rp.items())
    lines.append(f"request-path compiles: {r['request_path_compiles']} ({counted} requests)")
    per = "batch 1" if "b1" in r["latency_examples"] else "one run() request"
    if "break_even_note" in r:
        lines.append(f"break-even at {per}: {r['break_even_note']}")
    else:
        lines.append(
            f"break-even at {per}: {r['break_even_requests_cold']} requests after a cold boot, "
            f"{r['break_even_requests_warm']} after a warm one"
        )
    lines += [f"WARNING: {w}" for w in r["warnings"]]
    lines.append(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
    return "\n".join(lines)


# -- the chart -------------------------------------------------------------------------------------------------------
_SEGMENTS = (
    ("process start + imports", "#c7c7c7"),
    ("key + other", "#8c8c8c"),
    ("restore", "#2ca02c"),
    ("load", "#1f77b4"),
    ("compile + warm-up", "#d62728"),
)


def _chart(path: Path, r: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(2, len(r["latency_examples"]))
    fig = plt.figure(figsize=(6 * cols, 8), layout="constrained")
    gs = fig.add_gridspec(2, cols, height_ratios=[1, 1.2])
    ax = fig.add_subplot(gs[0, :])
    names = {"eager": "eager", "cold": "cold (no caches)", "seed": "cold, seeding", "warm": "warm (from store)"}
    for y, k in enumerate(names):
        b = r["boots"][k]
        other = max(0.0, b["setup_s"] - b["restore_s"] - b["load_s"] - b["compile_s"])
        widths = (max(0.0, b["process_ready_s"] - b["setup_s"]), other, b["restore_s"], b["load_s"], b["compile_s"])
        left = 0.0
        for (seg, color), w in zip(_SEGMENTS, widths, strict=True):
            ax.barh(y, w, left=left, color=color, label=seg if y == 0 else None)
            left += w
        ax.text(left, y, f"  setup {b['setup_s']:.1f}s / process {b['process_ready_s']:.1f}s", va="center", fontsize=9)
    ax.set_yticks(range(len(names)), list(names.values()))
    ax.invert_yaxis()
    ax.set_xlabel("seconds from process spawn to ready")
    ax.set_xlim(0, max(b["process_ready_s"] for b in r["boots"].values()) * 1.3)
    removed = r["overhead_removed"]
    ax.set_title(
        f"Boot timeline ({r['strategy']}): warm removes "
        f"{'n/a' if removed is None else f'{removed * 100:.1f} %'} of the compile overhead"
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    for i, (tag, ex) in enumerate(r["latency_examples"].items()):
        a = fig.add_subplot(gs[1, i])
        data = [r["samples_ms"][f"eager_{tag}"], r["samples_ms"][f"compiled_{tag}"]]
        a.boxplot(data, tick_labels=["eager", "compiled"], showfliers=True, whis=(1, 99))
        for j, d in enumerate(data):
            a.scatter([j + 1] * len(d), d, s=4, alpha=0.3, color="#1f77b4")
        a.set_ylabel("ms per call")
        e, c = r[f"eager_p50_ms_{tag}"], r[f"compiled_p50_ms_{tag}"]
        what = ex["example"] if ex["batch"] is None or "batch" in ex["example"] else f"batch {ex['batch']} {ex['example']}"
        if ex["batch"] is None:  # several parts: a run() call or a part's arguments, too long for one line
            a.set_title(f"{tag}: p50 eager {e:.2f} ms, compiled {c:.2f} ms\n{what[:70]}", fontsize=9)
        else:
            a.set_title(f"{what}: p50 eager {e:.2f} ms, compiled {c:.2f} ms", fontsize=10)
    fig.suptitle(f"compile_cache bench: {r['predictor']}, torch {r['torch_version']}, {r['machine']['nproc']} CPUs")
    tmp = path.with_name(f".{path.name}.incomplete")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


# -- main ------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from ..predictors import DEFAULT_PREDICTOR

    ap = argparse.ArgumentParser(
        prog="python -m compile_cache bench",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python -m compile_cache bench --out bench-out\n"
        "  python -m compile_cache bench --quick --predictor tests/tiny_predictor.py:Predictor --out /tmp/b",
    )
    ap.add_argument(
        "--out", default=DEFAULT_OUT, metavar="DIR", help=f"where bench.json and bench.png go ({DEFAULT_OUT})"
    )
    ap.add_argument(
        "--predictor", default=DEFAULT_PREDICTOR, metavar="FILE.py:CLASS", help=f"as in cog.yaml ({DEFAULT_PREDICTOR})"
    )
    ap.add_argument("--strategy", choices=("jit", "export", "default"), default="default",
                    help="COMPILE_CACHE_STRATEGY for every boot; default: what the predictor declares")
    ap.add_argument("--requests", type=int, default=None, metavar="N",
                    help="requests over the declared shapes after setup, counting compiles (100; --quick 20)")
    ap.add_argument("--latency-iters", type=int, default=None, metavar="N",
                    help="timed calls per batch size and mode, after 1 uncounted warm-up (100; --quick 10)")
    ap.add_argument("--threads", type=int, default=None, metavar="N",
                    help="OMP_NUM_THREADS for every boot (default: torch's own choice, one per core); on a busy "
                    "machine 1 keeps OpenMP threads from waiting on descheduled peers")
    ap.add_argument("--quick", action="store_true", help="fewer requests and latency calls (the test uses it)")
    ap.add_argument("--keep-work", action="store_true", help="keep OUT/work (caches and the store of the boots)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.requests is None:
        args.requests = 20 if args.quick else 100
    if args.latency_iters is None:
        args.latency_iters = 10 if args.quick else 100
    if args.requests < 1 or args.latency_iters < 1 or (args.threads is not None and args.threads < 1):
        _error("--requests, --latency-iters and --threads must be >= 1")
        return 2
    target = args.predictor.partition(":")[0]
    if not Path(target).is_file():
        _error(f"--predictor {args.predictor!r}: no file {target} (relative to {Path.cwd()})")
        return 2
    out = Path(args.out)
    work, logs = out / "work", out / "boots"
    for d in (work, logs):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    env, args.env_passed = _base_env(args.strategy, args.threads)
    args.load_before = _load_avg()
    boots: dict[str, dict[str, Any]] = {}
    try:
        plan = _plan(work)
        for i, (name, what, extra) in enumerate(plan, 1):
            _say(f"[{i}/{len(plan)}] {name}: {what} ...")
            b = boots[name] = _run_boot(name, {**env, **extra}, work, logs, args)
            m = b["metrics"]
            _say(f"       setup {m['total_s']:.2f}s, process {b['process_ready_s']:.2f}s, wall {b['wall_s']:.1f}s")
    except BenchError as e:
        _error(f"{e}")
        return 1
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    result = _summarize(boots, args, argv)
    write_json_atomic(out / "bench.json", result)
    try:
        _chart(out / "bench.png", result)
    except ImportError as e:
        _error(f"the chart needs matplotlib (requirements-dev.txt): {e}; bench.json is written")
        return 1
    _say(_report(result, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
