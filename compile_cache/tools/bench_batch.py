"""``make bench-batch``: the example served with batching off and on, under 1, 4, 16 and 64 concurrent clients.

Two servers, one after the other, each in the real Cog runtime (:class:`~.cogrun.CogServer`: its own port,
TORCHINDUCTOR_CACHE_DIR, metrics file and log) with ``COG_MAX_CONCURRENCY`` at the largest client count, against
one local store under the out dir and under one lineage (``COMPILE_CACHE_MODEL_NAME``), so both have one key: the
first server compiles in setup and fills the store, the second restores from it.

    off  ``--predictor`` (``predict.py:Runner``): every prediction calls the model alone
    on   ``--batched-predictor`` (``predict.py:BatchedRunner``): concurrent predictions joined into one model call
         (``COMPILE_CACHE_BATCH`` sets ``max_delay_ms``, so the latency target knows it)

A runner whose ``run()`` is synchronous gets ``COG_MAX_CONCURRENCY=1`` (the runtime refuses more for it): its
clients then queue on the runtime's one slot, retrying every 0.1 s while it answers 409 (:meth:`CogServer.predict`):
served in no particular order, so that server's p99 grows with the clients while its throughput stays the slot's.

Each server must serve compiled from READY on (its metrics file: no eager fallback, no build pending); it is warmed
up with one burst of concurrent predictions at each client count (not counted), then loaded at each client count in
turn: that many threads, each sending the same prediction (``--input``) back to back over HTTP for ``--duration``
seconds (or ``--requests`` each). Latency is the client's round trip (what a caller waits: queue, batch wait and the
model call). ``--random-weights`` serves random weights at the example's shapes where ``weights/`` has none
(``scripts/gpu_check --batching`` on the GPU machine).

batch.json: ``runs``, one per (clients, batching), each with ``clients``, ``batching``, ``throughput_per_s``
(predictions answered / seconds from the first sent to the last answered), ``p50_ms``, ``p99_ms``, ``mean_batch``
(the mean of the predictions' ``batch_size`` Cog metric, rows in the model call each rode in; 1.0 with batching
off) and ``request_path_compiles`` (the predictions' own Cog metric); per server its metrics file as read at READY
and after its graceful shutdown (``request_path_compiles`` there: the server's total, warm-up included); and the
targets with their values, pass or fail. The benchmark reports the targets and does not fail on them: its exit
status is 1 only when a server or a prediction failed.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ToolError
from ..predictors import DEFAULT_PREDICTOR
from .bench import _base_env, _error, _load_avg, _say, repo_relative
from .bench_fleet import _check, _read_json, _torch_version, latency, publish, run_meta
from .cogrun import PACKAGE_ROOT, CogServer, project_of

__all__ = ["CLIENTS", "chart", "concurrency_for", "main", "make_random_weights", "report", "summarize", "summarize_run",
           "targets"]

DEFAULT_OUT = "bench-out/batch"
DEFAULT_BATCHED = "predict.py:BatchedRunner"
CLIENTS = (1, 4, 16, 64)
DEFAULT_INPUT = '{"text": "A man is eating food."}'  # one sentence: one row per prediction
THROUGHPUT_FACTOR = 1.3  # batched over unbatched throughput, at TARGET_CLIENTS
TARGET_CLIENTS = 16
P99_SLACK = 1.1  # batched p99 at 1 client <= P99_SLACK * (unbatched p99 + max_delay_ms)
# Variables the servers set; inherited values would blur the comparison (the rest pass through, as in bench.py).
_CONTROLLED = ("COMPILE_CACHE_BATCH", "COMPILE_CACHE_ON_MISS", "COMPILE_CACHE_MODEL_NAME", "COG_MAX_CONCURRENCY")
# Both servers' lineage: the key's model part is otherwise the runner class's name, and the two runners compile the
# same model (batching is not a key factor), so the second server restores what the first one built.
LINEAGE = "bench-batch"
QUICK_DURATION_S = 3.0  # --quick: seconds per run


# -- the summary -----------------------------------------------------------------------------------------------------
def summarize_run(rec: Mapping[str, Any]) -> dict[str, Any]:
    """One run's line in batch.json from its load record (see :func:`_load`): ``clients``, ``batching``, ``calls``
    (each ``ms``, ``ok``, ``batch_size``, ``batch_wait_ms``, ``request_path_compiles``), ``elapsed_s``."""
    calls = rec["calls"]
    ok = [c for c in calls if c["ok"]]
    lat = latency([c["ms"] for c in ok])
    sizes = [c["batch_size"] for c in ok if c.get("batch_size") is not None]
    waits = [c["batch_wait_ms"] for c in ok if c.get("batch_wait_ms") is not None]
    mean_batch: float | None = None
    if ok and not rec["batching"]:
        mean_batch = 1.0  # every prediction rides alone
    elif sizes:
        mean_batch = round(statistics.fmean(sizes), 3)
    elapsed = rec["elapsed_s"]
    return {
        "clients": rec["clients"],
        "batching": rec["batching"],
        "requests": len(ok),
        "errors": len(calls) - len(ok),
        "elapsed_s": round(elapsed, 3),
        "throughput_per_s": round(len(ok) / elapsed, 3) if ok and elapsed > 0 else None,
        "p50_ms": lat["p50"],
        "p99_ms": lat["p99"],
        "mean_batch": mean_batch,
        "mean_batch_wait_ms": round(statistics.fmean(waits), 3) if waits else None,
        "request_path_compiles": sum(int(c.get("request_path_compiles") or 0) for c in calls),
        "first_error": next((c["error"] for c in calls if not c["ok"]), ""),
    }


def _run(runs: Sequence[Mapping[str, Any]], clients: int, batching: bool) -> Mapping[str, Any]:
    return next((r for r in runs if r["clients"] == clients and r["batching"] == batching), {})


def targets(runs: Sequence[Mapping[str, Any]], servers: Mapping[str, Mapping[str, Any]],
            max_delay_ms: float) -> dict[str, Any]:
    """The targets, each with its value, its limit and pass/fail (a missing value fails)."""
    on, off = _run(runs, TARGET_CLIENTS, True), _run(runs, TARGET_CLIENTS, False)
    tp_on, tp_off = on.get("throughput_per_s"), off.get("throughput_per_s")
    ratio = round(tp_on / tp_off, 3) if tp_on is not None and tp_off else None
    p99_on, p99_off = _run(runs, 1, True).get("p99_ms"), _run(runs, 1, False).get("p99_ms")
    limit = None if p99_off is None else round(P99_SLACK * (p99_off + max_delay_ms), 3)
    per_run = [r.get("request_path_compiles") for r in runs]
    per_server = [s.get("request_path_compiles") for s in servers.values()]
    counts = per_run + per_server
    compiles = None if not runs or None in counts else sum(counts)  # type: ignore[arg-type]
    return {
        "throughput": _check(
            ratio, THROUGHPUT_FACTOR, ratio is not None and ratio >= THROUGHPUT_FACTOR,
            f"batched / unbatched throughput_per_s at {TARGET_CLIENTS} clients >= {THROUGHPUT_FACTOR}",
        ),
        "p99_1_client": _check(
            p99_on, limit, None not in (p99_on, limit) and p99_on <= limit,
            f"batched p99_ms at 1 client <= {P99_SLACK} * (unbatched p99_ms + max_delay_ms {max_delay_ms:g})",
        ),
        "request_path_compiles": _check(
            compiles, 0, compiles == 0, "request_path_compiles == 0 in every run and every server's metrics file",
        ),
    }


def _server_summary(s: Mapping[str, Any]) -> dict[str, Any]:
    """A server's line in batch.json from its record (see :func:`_serve`)."""
    ready, final = s.get("metrics_at_ready") or {}, s.get("metrics") or {}
    return {
        "predictor": s["predictor"],
        "concurrency": s["concurrency"],
        "served_compiled": serves_compiled(ready),
        "eager_fallback": ready.get("eager_fallback"),
        "cache": ready.get("cache"),
        "strategy": ready.get("strategy"),
        "setup_s": ready.get("total_s"),
        "request_path_compiles": final.get("request_path_compiles"),
        "request_path_eager_calls": final.get("request_path_eager_calls"),
        "batch": {name: p["batch"] for name, p in (final.get("parts") or {}).items() if p.get("batch")},
        "exit_code": s.get("exit_code"),
        "error": s.get("error", ""),
    }


def serves_compiled(m: Mapping[str, Any]) -> bool:
    """A metrics file says every part serves compiled: it has parts, none fell back to eager or waits for a build."""
    parts = m.get("parts") or {}
    return bool(parts) and not m.get("eager_fallback") and not any(
        p.get("eager_fallback") or p.get("build_pending") for p in parts.values())


def summarize(loads: Sequence[Mapping[str, Any]], servers: Mapping[str, Mapping[str, Any]],
              meta: Mapping[str, Any]) -> dict[str, Any]:
    """batch.json from the load records of every run, the two servers' records (``servers["off"|"on"]``) and
    ``meta`` (machine, command, ``max_delay_ms``, ...: copied to the top level)."""
    runs = sorted((summarize_run(r) for r in loads), key=lambda r: (r["batching"], r["clients"]))
    srv = {k: _server_summary(v) for k, v in servers.items()}
    warnings = [f"server {k} ({s['predictor']}): {s['error']}" for k, s in srv.items() if s["error"]]
    warnings += [f"server {k} does not serve compiled at READY: eager fallback {s['eager_fallback']!r}"
                 for k, s in srv.items() if not s["error"] and not s["served_compiled"]]
    warnings += [f"{r['clients']} clients, batching {'on' if r['batching'] else 'off'}: {r['errors']} predictions "
                 f"failed, the first: {r['first_error']}" for r in runs if r["errors"]]
    warnings += [f"{r['clients']} clients, batching on: no prediction reported batch_size"
                 for r in runs if r["batching"] and r["requests"] and r["mean_batch"] is None]
    failed = sum(1 for s in srv.values() if s["error"]) + sum(1 for r in runs if r["errors"])
    return {
        **meta,
        "runs": runs,
        "servers": srv,
        "targets": targets(runs, srv, float(meta["max_delay_ms"])),
        "failed": failed,
        "warnings": warnings,
    }


# -- the report and the chart ----------------------------------------------------------------------------------------
def _f(v: float | None, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


def report(r: Mapping[str, Any]) -> str:
    mc = r["machine"]
    lines = [
        f"compile_cache bench-batch: {r['predictor']} (off) vs {r['batched_predictor']} (on), torch "
        f"{r['torch_version']}, {mc['nproc']} CPUs, load {mc['load_avg_before']} -> {mc['load_avg_after']}, "
        f"{r['timestamp']}",
        "  clients  batching  requests  throughput/s   p50 ms   p99 ms  mean batch  request-path compiles",
    ]
    for x in r["runs"]:
        lines.append(f"  {x['clients']:>7}  {'on' if x['batching'] else 'off':>8}  {x['requests']:>8}  "
                     f"{_f(x['throughput_per_s']):>12}  {_f(x['p50_ms']):>7}  {_f(x['p99_ms']):>7}  "
                     f"{_f(x['mean_batch'], '.2f'):>10}  {x['request_path_compiles']:>21}")
    lines.append("targets:")
    for t in r["targets"].values():
        lines.append(f"  {'PASS' if t['pass'] else 'FAIL'}  {t['rule']}: {t['value']} (limit {t['limit']})")
    lines += [f"WARNING: {w}" for w in r["warnings"]]
    return "\n".join(lines)


# (batching, label, colour, where a point's client count is written: the two lines' labels apart)
_LINES = ((False, "batching off", "#7f7f7f", (5, 4)), (True, "batching on", "#1f77b4", (5, -11)))


def chart(path: Path, r: Mapping[str, Any]) -> None:
    """Throughput against p50 latency, a line per batching setting, each point labelled by its client count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), layout="constrained")
    for batching, label, color, offset in _LINES:
        pts = [x for x in r["runs"] if x["batching"] == batching and None not in (x["p50_ms"], x["throughput_per_s"])]
        if not pts:
            continue
        ax.plot([x["p50_ms"] for x in pts], [x["throughput_per_s"] for x in pts], marker="o", color=color, label=label)
        for x in pts:
            ax.annotate(f"{x['clients']}", (x["p50_ms"], x["throughput_per_s"]), textcoords="offset points",
                        xytext=offset, fontsize=8, color=color)
    ax.set_xlabel("p50 latency, ms (client round trip)")
    ax.set_ylabel("throughput, predictions / s")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(title="points: concurrent clients", fontsize=8, title_fontsize=8)
    t = r["targets"]["throughput"]
    ax.set_title(f"{r['batched_predictor']} vs {r['predictor']}: throughput x{_f(t['value'], '.2f')} at "
                 f"{TARGET_CLIENTS} clients (target {THROUGHPUT_FACTOR})", fontsize=10)
    tmp = path.with_name(f".{path.name}.incomplete")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


# -- the servers and their load ------------------------------------------------------------------------------------------
def concurrency_for(ref: str, clients: int) -> int:
    """``COG_MAX_CONCURRENCY`` for the runner ``ref``: ``clients``, or 1 where its ``run()`` is synchronous (the
    runtime refuses concurrency above 1 for it). Read from the source, following base classes defined in the same
    file: this process imports no torch."""
    path_s, _, name = ref.partition(":")
    classes = {n.name: n for n in ast.parse(Path(path_s).read_text()).body if isinstance(n, ast.ClassDef)}
    todo, seen = [name], set()
    while todo:
        cls = classes.get(todo.pop(0))
        if cls is None or cls.name in seen:
            continue
        seen.add(cls.name)
        run = next((f for f in cls.body if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef) and f.name == "run"),
                   None)
        if run is not None:
            return clients if isinstance(run, ast.AsyncFunctionDef) else 1
        todo += [b.id for b in cls.bases if isinstance(b, ast.Name)]
    return clients


# all-MiniLM-L6-v2's architecture (its config.json): random weights of the same shapes cost what the real ones do.
_MINILM = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536,
           "vocab_size": 30522, "max_position_embeddings": 512}


def make_random_weights(dest: Path) -> None:
    """The example's weights directory with random weights at all-MiniLM-L6-v2's shapes and a character-level
    tokenizer (a machine without ``weights/``, the GPU machine: the real files are more than the device tool
    carries). Imports torch and transformers: run it in a child process (:func:`_random_weights`)."""
    import string

    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    dest.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True).save_pretrained(dest)
    torch.manual_seed(0)
    BertModel(BertConfig(**_MINILM), add_pooling_layer=False).save_pretrained(dest)


def _random_weights(dest: Path) -> None:
    """:func:`make_random_weights` in a child process: this one imports no torch."""
    code = ("import sys, pathlib; from compile_cache.tools.bench_batch import make_random_weights; "
            "make_random_weights(pathlib.Path(sys.argv[1]))")
    path = os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    cp = subprocess.run([sys.executable, "-c", code, str(dest)], env={**os.environ, "PYTHONPATH": path},
                        capture_output=True, text=True, timeout=600)
    if cp.returncode != 0:
        raise ToolError(f"random weights: exit {cp.returncode}:\n{cp.stderr[-2000:]}")


def _load(srv: CogServer, inputs: dict[str, Any], clients: int, batching: bool, *, duration_s: float | None,
          requests: int | None, timeout: float) -> dict[str, Any]:
    """``clients`` threads, each sending predictions back to back: for ``duration_s`` seconds (none is started
    after), or ``requests`` each. A client stops at its first failed prediction."""
    calls: list[dict[str, Any]] = []
    lock = threading.Lock()
    t0 = time.monotonic()
    ends: list[float] = []

    def more(n: int) -> bool:
        return n < requests if requests is not None else time.monotonic() - t0 < (duration_s or 0.0)

    def client() -> None:
        n = 0
        while more(n):
            sent = time.monotonic()
            try:
                code, resp = srv.predict(inputs, timeout=timeout)
            except Exception as e:  # noqa: BLE001 - recorded: a dead server is a failed prediction
                code, resp = None, f"{type(e).__name__}: {e}"
            done = time.monotonic()
            ok = code == 200 and isinstance(resp, dict) and resp.get("status") == "succeeded"
            cm = (resp.get("metrics") or {}) if isinstance(resp, dict) else {}
            call = {"ms": round((done - sent) * 1e3, 3), "ok": ok, "batch_size": cm.get("batch_size"),
                    "batch_wait_ms": cm.get("batch_wait_ms"),
                    "request_path_compiles": cm.get("request_path_compiles", 0)}
            if not ok:
                detail = resp.get("error") if isinstance(resp, dict) else resp
                call["error"] = f"HTTP {code}: {str(detail)[:300]}"
            with lock:
                calls.append(call)
                ends.append(done)
            if not ok:
                return
            n += 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"clients": clients, "batching": batching, "calls": calls,
            "elapsed_s": (max(ends) - t0) if ends else 0.0}


def _serve(key: str, ref: str, env: dict[str, str], args: argparse.Namespace,
           loads: list[dict[str, Any]]) -> dict[str, Any]:
    """Boot one server, check it serves compiled, warm it up, load it at each client count (appending to
    ``loads``), shut it down gracefully. Returns its record; a failure leaves what was measured and the error."""
    d = args.out / "servers" / key
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    metrics_file = d / "metrics.json"
    concurrency = concurrency_for(ref, max(args.clients))
    env = {**env, "COG_MAX_CONCURRENCY": str(concurrency),
           "TORCHINDUCTOR_CACHE_DIR": str(args.work / key / "inductor"),
           "COMPILE_CACHE_METRICS_FILE": str(metrics_file), "COMPILE_CACHE_LOG_FILE": str(d / "log.txt")}
    rec: dict[str, Any] = {"predictor": repo_relative(ref), "concurrency": concurrency}
    srv = CogServer.in_project(ref, env=env, log_path=d / "server.log")
    batching = key == "on"
    try:
        srv.start()
        srv.wait_ready(timeout=args.timeout)
        rec["metrics_at_ready"] = ready = _read_json(metrics_file)
        _say(f"       READY: cache {ready.get('cache')}, setup {_f(ready.get('total_s'))}s, serves compiled "
             f"{serves_compiled(ready)}, COG_MAX_CONCURRENCY={concurrency}")
        for c in args.clients:  # one burst at each count: every batch size the load will see has run once
            _load(srv, args.input, c, batching, duration_s=None, requests=1, timeout=args.request_timeout)
        for c in args.clients:
            r = _load(srv, args.input, c, batching, duration_s=args.duration, requests=args.requests,
                      timeout=args.request_timeout)
            loads.append(r)
            s = summarize_run(r)
            _say(f"       {c:>3} clients: {s['requests']} predictions, {_f(s['throughput_per_s'])}/s, p50 "
                 f"{_f(s['p50_ms'])} ms, p99 {_f(s['p99_ms'])} ms, mean batch {_f(s['mean_batch'], '.2f')}"
                 + (f", {s['errors']} FAILED: {s['first_error']}" if s["errors"] else ""))
        rec["exit_code"] = srv.shutdown("post", timeout=120)
        if rec["exit_code"] != 0:
            raise RuntimeError(f"graceful shutdown ended with {rec['exit_code']} (None: still running, killed)")
    except Exception as e:  # noqa: BLE001 - recorded in batch.json; the other server goes on
        lines = [ln for ln in str(e).splitlines() if ln.strip()] or [""]
        # The first line says what failed; a runtime failure's last line is the end of the server's log (why).
        rec["error"] = f"{type(e).__name__}: {lines[0][:300]}" + (f" ... {lines[-1][:300]}" if len(lines) > 1 else "")
    finally:
        srv.kill()
        rec["metrics"] = _read_json(metrics_file)  # after the exit flush: the request-path counts of the whole run
    return rec


# -- main ------------------------------------------------------------------------------------------------------------
_EXAMPLES = """example:
  make bench-batch BENCH_OUT=bench-out [BENCH_ARGS=--quick]
  python -m compile_cache.tools.bench_batch --out bench-out/batch --clients 1,16 --duration 10"""


def _clients(text: str) -> tuple[int, ...]:
    try:
        out = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated client counts") from None
    if not out or out[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected client counts >= 1")
    return out


def _inputs(text: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a JSON object of inputs")
    return obj


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m compile_cache.tools.bench_batch", description=__doc__,
                                 epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), metavar="DIR",
                    help=f"where batch.json, batch.png and each server's logs go ({DEFAULT_OUT})")
    ap.add_argument("--predictor", default=DEFAULT_PREDICTOR, metavar="FILE.py:CLASS",
                    help=f"the unbatched runner ({DEFAULT_PREDICTOR})")
    ap.add_argument("--batched-predictor", default=DEFAULT_BATCHED, metavar="FILE.py:CLASS",
                    help=f"the batched runner ({DEFAULT_BATCHED})")
    ap.add_argument("--clients", type=_clients, default=CLIENTS, metavar="N,N,...",
                    help=f"concurrent clients, one run per count ({','.join(map(str, CLIENTS))})")
    ap.add_argument("--duration", type=float, default=20.0, metavar="S",
                    help=f"seconds each run's clients send predictions (20; --quick: {QUICK_DURATION_S:g})")
    ap.add_argument("--requests", type=int, default=None, metavar="N",
                    help="predictions each client sends, instead of --duration")
    ap.add_argument("--quick", action="store_true", help="a smoke run: short runs, the same client counts")
    ap.add_argument("--input", type=_inputs, default=_inputs(DEFAULT_INPUT), metavar="JSON",
                    help=f"every prediction's inputs ({DEFAULT_INPUT})")
    ap.add_argument("--max-delay-ms", type=float, default=5.0, metavar="MS",
                    help="the batched server's max_delay_ms, set through COMPILE_CACHE_BATCH (5)")
    ap.add_argument("--timeout", type=float, default=900.0, metavar="S", help="seconds a server may take to READY (900)")
    ap.add_argument("--request-timeout", type=float, default=120.0, metavar="S", help="seconds per prediction (120)")
    ap.add_argument("--threads", type=int, default=None, metavar="N",
                    help="OMP_NUM_THREADS for both servers, as in make bench (default: torch's own choice)")
    ap.add_argument("--random-weights", action="store_true",
                    help="serve random weights at the example's shapes (MODEL_WEIGHTS_DIR; a machine without "
                         "weights/), with a character-level tokenizer")
    ap.add_argument("--keep-work", action="store_true", help="keep OUT/work (the store and the Inductor caches)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.quick and "--duration" not in argv:
        args.duration = QUICK_DURATION_S
    if (args.requests is not None and args.requests < 1) or min(args.duration, args.timeout, args.request_timeout) <= 0 \
            or args.max_delay_ms < 0 or (args.threads or 1) < 1:
        _error("--requests and --threads must be >= 1; --duration and the timeouts > 0; --max-delay-ms >= 0")
        return 2
    try:
        for ref in (args.predictor, args.batched_predictor):
            project_of(ref)  # each server runs it as its container would: from its project dir
    except (ValueError, FileNotFoundError) as e:
        _error(str(e))
        return 2
    out: Path = args.out
    args.work = out / "work"
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    env, passed = _base_env("default", args.threads)
    env = {k: v for k, v in env.items() if k not in _CONTROLLED}
    env["COMPILE_CACHE_URL"] = str((args.work / "store").resolve())
    env["COMPILE_CACHE_MODEL_NAME"] = LINEAGE
    if args.random_weights:
        try:
            _random_weights(args.work / "weights")
        except (ToolError, subprocess.TimeoutExpired) as e:
            _error(str(e))
            return 1
        env["MODEL_WEIGHTS_DIR"] = str((args.work / "weights").resolve())
    plan = {
        "off": (args.predictor, {}),
        "on": (args.batched_predictor, {"COMPILE_CACHE_BATCH": json.dumps({"max_delay_ms": args.max_delay_ms})}),
    }
    load_before = _load_avg()
    loads: list[dict[str, Any]] = []
    servers: dict[str, dict[str, Any]] = {}
    interrupted = False
    try:
        for n, (key, (ref, extra)) in enumerate(plan.items(), 1):
            _say(f"[{n}/{len(plan)}] batching {key}: {repo_relative(ref)}, clients {list(args.clients)} ...")
            servers[key] = _serve(key, ref, {**env, **extra}, args, loads)
            if servers[key].get("error"):
                _say(f"       ERROR {servers[key]['error']}")
    except KeyboardInterrupt:  # a caller's time limit (scripts/gpu_check): _serve stopped its server; keep the runs
        interrupted = True
    finally:
        if not args.keep_work:
            shutil.rmtree(args.work, ignore_errors=True)
    meta = {
        "predictor": repo_relative(args.predictor),
        "batched_predictor": repo_relative(args.batched_predictor),
        "torch_version": _torch_version(),
        "threads_requested": args.threads,
        "input": args.input,
        "weights": "random, at the example's shapes (--random-weights)" if args.random_weights else "the runner's own",
        "max_delay_ms": args.max_delay_ms,
        "duration_s": None if args.requests else args.duration,
        "requests_per_client": args.requests,
        "latency_method": "the client's round trip of each prediction (HTTP POST to its answer)",
        **run_meta("bench_batch", argv, passed, load_before),
    }
    result = summarize(loads, servers, meta)
    if interrupted:
        result["warnings"].append("interrupted: the runs and servers missing here were not measured")
        result["failed"] += 1
    return publish(out, "batch", result, report, chart)


if __name__ == "__main__":
    sys.exit(main())
