"""``make bench-fleet``: a fleet of replicas that boots together on a new key, under three policies, side by side.

Each fleet is N replicas of the runner, each in the real Cog runtime (:class:`~.cogrun.CogServer`: its own port,
TORCHINDUCTOR_CACHE_DIR, metrics file and log), booted at once against one SeaweedFS S3 store on 127.0.0.1 with a
fresh bucket (an empty key). The fleets run one after another:

    eager  COMPILE_CACHE_COMPILE=0: what the fleet costs without compiling at all
    today  COMPILE_CACHE_ON_MISS=wait, COMPILE_CACHE_BUILD_LEASE=0: setup waits for a compile, every replica builds
    new    COMPILE_CACHE_ON_MISS=serve with the build lease: eager from the end of setup, one replica builds in the
           background, every replica swaps the compiled parts in when the entry is there

From READY on, each replica sends a prediction (the runner's default input) every interval until it serves compiled
(the prediction's Cog metrics say ``served_before_swap`` false and its metrics file has ``compiled_s``), or, in the
eager fleet, for a fixed number of predictions; then it is shut down gracefully (POST /shutdown).

fleet.json: per fleet ``builds`` (replicas with ``built_here``), ``median_ready_s`` and ``max_compiled_s`` (the
metrics file's, seconds from setup's start), each replica's record; the eager request latency while the ``new``
fleet builds (its predictions served before the swap) against idle (the eager fleet's); every output compared
with the eager fleet's (:data:`TOLERANCE`); and the targets of the ``new`` fleet with their values, pass or fail.
The benchmark reports the targets and does not fail on them: its exit status is 1 only when a replica failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from ..metrics import write_json_atomic
from ..predictors import DEFAULT_PREDICTOR
from .bench import _base_env, _error, _load_avg, _machine, _say, percentiles, repo_relative
from .cogrun import CogServer, project_of
from .seaweed import Seaweed, isolated_env

__all__ = ["FLEETS", "TOLERANCE", "chart", "latency", "main", "outputs_match", "summarize", "targets"]

DEFAULT_OUT = "bench-out/fleet"
# name -> (what it is, the variables that make it so)
FLEETS: dict[str, tuple[str, dict[str, str]]] = {
    "eager": ("compile off", {"COMPILE_CACHE_COMPILE": "0"}),
    "today": (
        "setup waits for its compile, no lease: every replica builds",
        {"COMPILE_CACHE_ON_MISS": "wait", "COMPILE_CACHE_BUILD_LEASE": "0"},
    ),
    "new": (
        "eager until the swap, the lease: one replica builds",
        {"COMPILE_CACHE_ON_MISS": "serve", "COMPILE_CACHE_BUILD_LEASE": "1"},
    ),
}
# Variables the fleets set; inherited values would blur them (the rest pass through, as in bench.py).
_CONTROLLED = ("COMPILE_CACHE_ON_MISS", "COMPILE_CACHE_BUILD_LEASE", "COMPILE_CACHE_COMPILE")
# Embeddings computed by compiled code differ from eager in the last bits (fused kernels sum in another order).
TOLERANCE = {"rtol": 1e-3, "atol": 1e-4}
READY_FACTOR = 1.5  # the new fleet's median ready_s against the eager fleet's setup


# -- arithmetic ------------------------------------------------------------------------------------------------------
def latency(samples_ms: Sequence[float]) -> dict[str, Any]:
    """p50 and p99 of ``samples_ms`` (bench.py's percentiles) and how many there were; None values when none."""
    if not samples_ms:
        return {"p50": None, "p99": None, "n": 0}
    p = percentiles(list(samples_ms))
    return {"p50": round(p["p50"], 3), "p99": round(p["p99"], 3), "n": len(samples_ms)}


def outputs_match(a: Any, b: Any, rtol: float = TOLERANCE["rtol"], atol: float = TOLERANCE["atol"]) -> bool:
    """``a`` equals ``b`` (nested lists of numbers, or anything else compared exactly): the same shape, and every
    number within ``atol + rtol * |b|`` of ``b``'s (numpy's isclose, ``b`` the reference)."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(outputs_match(x, y, rtol, atol) for x, y in zip(a, b, strict=True))
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return math.isfinite(a) and abs(a - b) <= atol + rtol * abs(b)
    return bool(a == b)


def _median(xs: Sequence[float | None]) -> float | None:
    """The median, None when any value is missing (a replica that never got there)."""
    if not xs or any(x is None for x in xs):
        return None
    return round(statistics.median(xs), 3)  # type: ignore[type-var]


def _max(xs: Sequence[float | None]) -> float | None:
    if not xs or any(x is None for x in xs):
        return None
    return round(max(xs), 3)  # type: ignore[type-var]


# -- the summary -----------------------------------------------------------------------------------------------------
def _replica(rec: Mapping[str, Any], reference: Any) -> dict[str, Any]:
    """One replica's line in fleet.json, from its run record (see :func:`_run_replica`)."""
    m = rec.get("metrics") or {}
    outputs = rec.get("outputs") or []
    calls = rec.get("calls") or []
    return {
        "replica": rec["replica"],
        "ready_s": m.get("ready_s", m.get("total_s")),
        "compiled_s": m.get("compiled_s"),
        "built_here": bool(m.get("built_here", False)),
        "lease": m.get("lease"),
        "cache": m.get("cache"),
        "strategy": m.get("strategy"),
        "eager_calls_before_swap": sum(int(p.get("eager_calls_before_swap") or 0) for p in (m.get("parts") or {}).values()),
        "outputs_match_eager": None if reference is None or not outputs else all(outputs_match(o, reference) for o in outputs),
        "predictions": len(calls),
        "served_before_swap": sum(1 for c in calls if c["before_swap"]),
        "background_build": m.get("background_build") or {},
        "process_ready_at_s": rec.get("ready_at_s"),
        "first_compiled_at_s": rec.get("first_compiled_at_s"),
        "end_at_s": rec.get("end_at_s"),
        "exit_code": rec.get("exit_code"),
        "error": rec.get("error", ""),
    }


def _fleet(name: str, recs: Sequence[Mapping[str, Any]], reference: Any) -> dict[str, Any]:
    reps = [_replica(r, reference) for r in recs]
    what, env = FLEETS[name]
    return {
        "what": what,
        "env": env,
        "builds": sum(1 for r in reps if r["built_here"]),
        "median_ready_s": _median([r["ready_s"] for r in reps]),
        "max_compiled_s": _max([r["compiled_s"] for r in reps]),
        "replicas": reps,
    }


def _reference(eager: Sequence[Mapping[str, Any]]) -> Any:
    """The eager fleet's first output: what every served output is compared with (every prediction sends the same
    input, the runner's default)."""
    return next((r["outputs"][0] for r in eager if r.get("outputs")), None)


def _check(value: Any, limit: Any, ok: bool, rule: str) -> dict[str, Any]:
    return {"rule": rule, "value": value, "limit": limit, "pass": ok}


def targets(fleets: Mapping[str, Mapping[str, Any]], eager_setup_s: float | None) -> dict[str, Any]:
    """The ``new`` fleet's targets, each with its value, its limit and pass/fail (a missing value fails)."""
    new, today = fleets["new"], fleets["today"]
    ready, compiled, today_compiled = new["median_ready_s"], new["max_compiled_s"], today["max_compiled_s"]
    limit = None if eager_setup_s is None else round(READY_FACTOR * eager_setup_s, 3)
    return {
        "median_ready_s": _check(
            ready, limit, None not in (ready, limit) and ready <= limit,
            f"new.median_ready_s <= {READY_FACTOR} * eager_fleet_setup_s",
        ),
        "builds": {
            **_check(new["builds"], 1, new["builds"] == 1, "new.builds == 1"),
            "today": today["builds"],
            "replicas": len(new["replicas"]),
        },
        "max_compiled_s": _check(
            compiled, today_compiled, None not in (compiled, today_compiled) and compiled <= today_compiled,
            "new.max_compiled_s <= today.max_compiled_s",
        ),
    }


def summarize(records: Mapping[str, Sequence[Mapping[str, Any]]], meta: Mapping[str, Any]) -> dict[str, Any]:
    """fleet.json from the run records of the three fleets (``records[name]``: one per replica) and ``meta``
    (machine, command, ...: copied to the top level)."""
    reference = _reference(records["eager"])
    fleets = {name: _fleet(name, records[name], reference) for name in FLEETS}
    eager_setup = fleets["eager"]["median_ready_s"]
    during = [c["ms"] for r in records["new"] for c in r.get("calls") or () if c["before_swap"]]
    idle = [c["ms"] for r in records["eager"] for c in r.get("calls") or ()]
    failed = [f"{name} r{r['replica']}: {r['error']}" for name in FLEETS for r in fleets[name]["replicas"] if r["error"]]
    warnings = [f"replica {f}" for f in failed]
    if reference is None:
        warnings.append("the eager fleet served nothing: no output to compare with")
    if fleets["eager"]["builds"]:
        warnings.append(f"eager: {fleets['eager']['builds']} replicas report built_here with compile off")
    for name in FLEETS:
        off = [r["replica"] for r in fleets[name]["replicas"] if r["outputs_match_eager"] is False]
        if off:
            warnings.append(f"{name}: replicas {off} served an output that differs from eager beyond {TOLERANCE}")
    return {
        **meta,
        "replicas": max(len(v) for v in records.values()),
        "eager_fleet_setup_s": eager_setup,
        "fleets": fleets,
        "eager_latency_ms": {"during_build": latency(during), "idle": latency(idle)},
        "outputs_tolerance": TOLERANCE,
        "targets": targets(fleets, eager_setup),
        "failed": len(failed),
        "warnings": warnings,
    }


# -- the report and the chart ----------------------------------------------------------------------------------------
def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}s"


def report(r: Mapping[str, Any]) -> str:
    mc = r["machine"]
    lines = [
        f"compile_cache bench-fleet: {r['replicas']} replicas of {r['predictor']}, torch {r['torch_version']}, "
        f"{mc['nproc']} CPUs, load {mc['load_avg_before']} -> {mc['load_avg_after']}, {r['timestamp']}",
        "  fleet  builds  median ready  max compiled  eager calls before swap  outputs match eager",
    ]
    for name, f in r["fleets"].items():
        reps = f["replicas"]
        match = sum(1 for x in reps if x["outputs_match_eager"])
        calls = sum(x["eager_calls_before_swap"] for x in reps)
        lines.append(f"  {name:<6} {f['builds']:>6}  {_s(f['median_ready_s']):>12}  {_s(f['max_compiled_s']):>12}"
                     f"  {calls:>23}  {match}/{len(reps)}")
    lat = r["eager_latency_ms"]
    lines.append("eager latency ms p50 / p99: " + ", ".join(
        f"{k} {v['p50']} / {v['p99']} (n={v['n']})" for k, v in (("idle", lat["idle"]),
                                                                   ("during the build", lat["during_build"]))
    ))
    lines.append("targets (new fleet):")
    for t in r["targets"].values():
        lines.append(f"  {'PASS' if t['pass'] else 'FAIL'}  {t['rule']}: {t['value']} (limit {t['limit']})")
    lines += [f"WARNING: {w}" for w in r["warnings"]]
    return "\n".join(lines)


_SEGMENTS = (("booting (spawn to READY)", "#c7c7c7"), ("serving eager", "#ff7f0e"), ("serving compiled", "#2ca02c"))


def chart(path: Path, r: Mapping[str, Any]) -> None:
    """A row per replica and fleet: booting, serving eager, serving compiled, in seconds from the replica's spawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(name, x) for name, f in r["fleets"].items() for x in f["replicas"]]
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.45 * len(rows)), layout="constrained")
    end = 1.0
    for y, (name, x) in enumerate(rows):
        ready, swap, stop = x["process_ready_at_s"], x["first_compiled_at_s"], x["end_at_s"]
        if ready is None:
            continue
        stop = stop if stop is not None else ready
        spans = (0.0, ready), (ready, swap if swap is not None else stop), (swap, stop if swap is not None else None)
        for (label, color), (a, b) in zip(_SEGMENTS, spans, strict=True):
            if a is not None and b is not None and b > a:
                ax.barh(y, b - a, left=a, color=color, label=label)
        if swap is not None:  # the compiled segment is one prediction long: mark where it starts
            ax.plot([swap], [y], marker="|", markersize=14, color=_SEGMENTS[2][1])
        tag = "compile off" if name == "eager" else "built here" if x["built_here"] else (x["lease"] or "")
        ax.text(stop, y, f"  {tag}", va="center", fontsize=8)
        end = max(end, stop)
    handles = dict(zip(*reversed(ax.get_legend_handles_labels()), strict=True))  # one entry per kind of segment
    shown = [s for s, _ in _SEGMENTS if s in handles]
    ax.legend([handles[s] for s in shown], shown, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.set_yticks(range(len(rows)), [f"{name} r{x['replica']}" for name, x in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, end * 1.15)
    ax.set_xlabel("seconds from the replica's spawn")
    t = r["targets"]
    ax.set_title(
        f"{r['replicas']} replicas per fleet, {r['predictor']}: new fleet builds {t['builds']['value']} "
        f"(today {t['builds']['today']}), median ready {_s(t['median_ready_s']['value'])} "
        f"(eager setup {_s(r['eager_fleet_setup_s'])})", fontsize=10,
    )
    tmp = path.with_name(f".{path.name}.incomplete")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


# -- the fleets ------------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not written yet, or mid-replace on a filesystem without atomic rename
        return {}


def _run_replica(name: str, i: int, env: dict[str, str], d: Path, args: argparse.Namespace,
                 deadline: float, rec: dict[str, Any]) -> None:
    """Boot one replica, send predictions until it serves compiled (or, eager, ``--idle-requests`` of them), shut it
    down. Fills ``rec`` as it goes, so a failure leaves what was measured and the error."""
    metrics_file = d / "metrics.json"
    env = {**env, "TORCHINDUCTOR_CACHE_DIR": str(args.work / name / f"r{i}" / "inductor"),
           "COMPILE_CACHE_METRICS_FILE": str(metrics_file), "COMPILE_CACHE_LOG_FILE": str(d / "log.txt")}
    srv = CogServer.in_project(args.predictor, env=env, log_path=d / "server.log")
    t0 = time.monotonic()

    def since() -> float:
        return round(time.monotonic() - t0, 3)

    rec.update(replica=i, calls=[], outputs=[], ready_at_s=None, first_compiled_at_s=None, end_at_s=None)
    try:
        srv.start()
        srv.wait_ready(timeout=max(1.0, deadline - time.monotonic()))
        rec["ready_at_s"] = since()
        while True:
            sent, at = time.monotonic(), since()
            code, resp = srv.predict({}, timeout=max(1.0, deadline - sent))
            took_ms = (time.monotonic() - sent) * 1e3
            if code != 200 or not isinstance(resp, dict) or resp.get("status") != "succeeded":
                raise RuntimeError(f"prediction {len(rec['calls']) + 1}: HTTP {code} {str(resp)[:300]}")
            cm = resp.get("metrics") or {}
            before = bool(cm.get("served_before_swap", False))
            # Cog's own predict_time (seconds, inside the worker) when it reports one, else the round trip.
            ms = cm["predict_time"] * 1e3 if isinstance(cm.get("predict_time"), int | float) else took_ms
            rec["calls"].append({"at_s": at, "ms": round(ms, 3), "before_swap": before})
            rec["outputs"].append(resp.get("output"))
            if name == "eager":
                done = len(rec["calls"]) >= args.idle_requests
            else:
                done = not before and _read_json(metrics_file).get("compiled_s") is not None
                if done:
                    rec["first_compiled_at_s"] = at
            if done:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"not serving compiled after {args.timeout:.0f}s")
            time.sleep(max(0.0, sent + args.interval - time.monotonic()))
        rec["end_at_s"] = since()
        rec["exit_code"] = srv.shutdown("post", timeout=120)
        if rec["exit_code"] != 0:
            raise RuntimeError(f"graceful shutdown ended with {rec['exit_code']} (None: still running, killed)")
    except Exception as e:  # noqa: BLE001 - recorded in fleet.json; the other replicas go on
        rec["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        rec["end_at_s"] = rec["end_at_s"] or since()
    finally:
        srv.kill()
        rec["metrics"] = _read_json(metrics_file)


def _run_fleet(name: str, env: dict[str, str], args: argparse.Namespace) -> list[dict[str, Any]]:
    recs: list[dict[str, Any]] = [{} for _ in range(args.replicas)]
    deadline = time.monotonic() + args.timeout
    threads = []
    for i in range(args.replicas):
        d = args.out / "replicas" / name / f"r{i}"
        d.mkdir(parents=True)
        t = threading.Thread(target=_run_replica, args=(name, i, env, d, args, deadline, recs[i]), daemon=True)
        threads.append(t)
        t.start()
    for t in threads:
        t.join()
    for r in recs:  # the raw records beside each replica's logs, outputs left out (they are compared, not kept)
        write_json_atomic(args.out / "replicas" / name / f"r{r['replica']}" / "record.json",
                          {k: v for k, v in r.items() if k != "outputs"})
    return recs


def run_meta(module: str, argv: Sequence[str], passed: Mapping[str, str], load_before: Any) -> dict[str, Any]:
    """What every Cog-runtime benchmark's JSON records of its run: the machine and its load before and after, when,
    the command that reruns it (``python -m compile_cache.tools.<module> ...``), the variables passed through."""
    return {
        "machine": {**_machine(), "load_avg_before": load_before, "load_avg_after": _load_avg()},
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": f"python -m compile_cache.tools.{module} " + shlex.join(repo_relative(a) for a in argv),
        "cwd": repo_relative(os.getcwd()),
        "env_passed": passed,
    }


def publish(out: Path, stem: str, result: Mapping[str, Any], report_of: Any, chart_of: Any) -> int:
    """Write ``OUT/<stem>.json``, print its report, draw ``OUT/<stem>.png``; the exit status: 1 when something
    failed (``result["failed"]``) or there is no chart."""
    write_json_atomic(out / f"{stem}.json", result)
    _say(report_of(result))
    _say(f"wrote {out / f'{stem}.json'}")
    try:
        chart_of(out / f"{stem}.png", result)
    except ImportError as e:  # matplotlib is a dev requirement (make installs it)
        _error(f"no chart: {e}")
        return 1
    _say(f"wrote {out / f'{stem}.png'}")
    return 1 if result["failed"] else 0


def _torch_version() -> str:
    try:
        return version("torch")  # not imported: the replicas run torch, this process only watches them
    except PackageNotFoundError:
        return "unknown"


# -- main ------------------------------------------------------------------------------------------------------------
_EXAMPLES = """example:
  make bench-fleet BENCH_OUT=bench-out REPLICAS=3
  python -m compile_cache.tools.bench_fleet --out bench-out/fleet --replicas 3 --threads 1"""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m compile_cache.tools.bench_fleet", description=__doc__,
                                 epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), metavar="DIR",
                    help=f"where fleet.json, fleet.png and each replica's logs go ({DEFAULT_OUT})")
    ap.add_argument("--replicas", type=int, default=3, metavar="N", help="replicas per fleet (3)")
    ap.add_argument("--predictor", default=DEFAULT_PREDICTOR, metavar="FILE.py:CLASS",
                    help=f"as in cog.yaml ({DEFAULT_PREDICTOR})")
    ap.add_argument("--timeout", type=float, default=900.0, metavar="S",
                    help="seconds a fleet may take from spawn until every replica serves compiled (900)")
    ap.add_argument("--interval", type=float, default=0.5, metavar="S", help="seconds between predictions (0.5)")
    ap.add_argument("--idle-requests", type=int, default=20, metavar="N",
                    help="predictions each replica of the eager fleet sends: the idle latency (20)")
    ap.add_argument("--threads", type=int, default=None, metavar="N",
                    help="OMP_NUM_THREADS for every replica, as in make bench (default: torch's own choice)")
    ap.add_argument("--keep-work", action="store_true", help="keep OUT/work (the replicas' Inductor caches)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if min(args.replicas, args.idle_requests) < 1 or min(args.timeout, args.interval) <= 0 or (args.threads or 1) < 1:
        _error("--replicas, --idle-requests and --threads must be >= 1; --timeout and --interval > 0")
        return 2
    try:
        project_of(args.predictor)  # the replicas run it as its container would: from its project dir
    except (ValueError, FileNotFoundError) as e:
        _error(str(e))
        return 2
    out: Path = args.out
    args.work = out / "work"
    for d in (args.work, out / "replicas", out / "seaweed"):
        shutil.rmtree(d, ignore_errors=True)
    args.work.mkdir(parents=True)
    env, passed = _base_env("default", args.threads)
    env = isolated_env({k: v for k, v in env.items() if k not in _CONTROLLED})
    load_before = _load_avg()
    records: dict[str, list[dict[str, Any]]] = {}
    try:
        s3 = Seaweed.start(out / "seaweed")
    except Exception as e:  # noqa: BLE001 - no store, no benchmark
        _error(f"SeaweedFS: {e}")
        return 1
    try:
        s3.wait_ready()
        for n, (name, (what, extra)) in enumerate(FLEETS.items(), 1):
            _say(f"[{n}/{len(FLEETS)}] {name}: {args.replicas} replicas, {what} ...")
            bucket = s3.make_bucket(f"fleet-{name}-{uuid.uuid4().hex[:8]}")
            recs = records[name] = _run_fleet(name, {**env, **s3.env(bucket), **extra}, args)
            for r in recs:
                _say(f"       r{r['replica']}: READY at {_s(r['ready_at_s'])}, {len(r['calls'])} predictions"
                     + (f", compiled at {_s(r['first_compiled_at_s'])}" if r["first_compiled_at_s"] else "")
                     + (f", ERROR {r['error']}" if r.get("error") else ""))
    except Exception as e:  # noqa: BLE001 - the store broke: nothing to summarize
        _error(f"SeaweedFS: {e}\n{s3.log_tail()}")
        return 1
    finally:
        s3.stop()
        shutil.rmtree(out / "seaweed" / "data", ignore_errors=True)  # keep weed.log, drop the volumes
        if not args.keep_work:
            shutil.rmtree(args.work, ignore_errors=True)
    meta = {
        "predictor": repo_relative(args.predictor),
        "torch_version": _torch_version(),
        "threads_requested": args.threads,
        "interval_s": args.interval,
        "timeout_s": args.timeout,
        "idle_requests": args.idle_requests,
        "latency_method": "Cog's predict_time of each prediction (the round trip where it reports none)",
        **run_meta("bench_fleet", argv, passed, load_before),
    }
    return publish(out, "fleet", summarize(records, meta), report, chart)


if __name__ == "__main__":
    sys.exit(main())
