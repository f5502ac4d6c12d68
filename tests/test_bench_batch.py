"""make bench-batch's summary, targets, report and chart on small hand-made load records (no boots: the benchmark
itself boots two servers and loads each for minutes), how it picks a runner's concurrency, and that the tool and
its make target are there."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from compile_cache.tools import bench_batch, gpucheck
from compile_cache.tools.bench_batch import chart, concurrency_for, report, summarize, summarize_run, targets
from compile_cache.tools.gpucheck import Check, batching_summary

ROOT = Path(__file__).resolve().parent.parent
META = {"predictor": "predict.py:Runner", "batched_predictor": "predict.py:BatchedRunner", "torch_version": "2.x",
        "max_delay_ms": 5.0, "timestamp": "2026-12-06T00:00:00+00:00",
        "machine": {"nproc": 2, "load_avg_before": [1.0], "load_avg_after": [2.0]}}


def load(clients: int, batching: bool, ms: list[float], elapsed_s: float, sizes: list[int] | None = None,
         compiles: int = 0, errors: int = 0) -> dict[str, Any]:
    """A run's load record as _load leaves it: one call per latency in ``ms``, the first carrying ``compiles``
    request-path compiles, then ``errors`` failed calls."""
    calls = [{"ms": m, "ok": True, "batch_size": (sizes[i % len(sizes)] if sizes else None),
              "batch_wait_ms": (2.0 if sizes else None), "request_path_compiles": compiles if i == 0 else 0}
             for i, m in enumerate(ms)]
    calls += [{"ms": 1.0, "ok": False, "batch_size": None, "batch_wait_ms": None, "request_path_compiles": 0,
               "error": "HTTP 500: boom"}] * errors
    return {"clients": clients, "batching": batching, "calls": calls, "elapsed_s": elapsed_s}


def server(predictor: str, compiles: int = 0, **kw: Any) -> dict[str, Any]:
    """A server's record as _serve leaves it: compiled at READY, the metrics file after its shutdown."""
    parts = {"model": {"strategy": "export", "eager_fallback": "", "request_path_compiles": compiles}}
    final = {"request_path_compiles": compiles, "request_path_eager_calls": 0,
             "parts": {"model": {**parts["model"], "batch": {"batches": 3, "sizes": {"2": 3}}}}}
    return {"predictor": predictor, "concurrency": 64, "exit_code": 0,
            "metrics_at_ready": {"cache": "hit", "strategy": "export", "total_s": 1.5, "eager_fallback": "",
                                 "parts": parts},
            "metrics": final, **kw}


def loads() -> list[dict[str, Any]]:
    """1 client: 10 ms unbatched, 14 ms batched (the batch wait); 16 clients: 100 predictions in 2 s unbatched,
    300 in 2 s batched, in batches of 8 and 12 rows."""
    return [
        load(1, False, [10.0] * 99 + [20.0], 1.0),
        load(16, False, [float(x) for x in range(1, 101)], 2.0),
        load(1, True, [14.0] * 99 + [30.0], 1.5, sizes=[1]),
        load(16, True, [50.0] * 300, 2.0, sizes=[8, 12]),
    ]


def servers() -> dict[str, dict[str, Any]]:
    return {"off": server("predict.py:Runner"), "on": server("predict.py:BatchedRunner")}


def test_a_run_has_its_throughput_percentiles_and_mean_batch() -> None:
    off = summarize_run(load(16, False, [float(x) for x in range(1, 102)], 4.0))
    assert (off["clients"], off["batching"], off["requests"], off["errors"]) == (16, False, 101, 0)
    assert off["throughput_per_s"] == 25.25  # 101 answered in 4 s
    assert (off["p50_ms"], off["p99_ms"]) == (51.0, 100.0)  # 1..101: order statistics fall on whole numbers
    assert off["mean_batch"] == 1.0 and off["mean_batch_wait_ms"] is None  # every prediction rides alone
    on = summarize_run(load(4, True, [5.0] * 4, 0.5, sizes=[1, 3], compiles=2))
    assert on["mean_batch"] == 2.0 and on["mean_batch_wait_ms"] == 2.0
    assert on["request_path_compiles"] == 2 and on["throughput_per_s"] == 8.0


def test_failed_predictions_are_counted_apart_and_an_empty_run_has_no_figures() -> None:
    r = summarize_run(load(4, True, [5.0, 7.0], 1.0, sizes=[2], errors=3))
    assert (r["requests"], r["errors"]) == (2, 3) and r["throughput_per_s"] == 2.0
    assert r["p50_ms"] == 6.0 and r["first_error"] == "HTTP 500: boom"  # the failed calls' 1 ms left out
    empty = summarize_run(load(4, True, [], 0.0, errors=1))
    assert empty["throughput_per_s"] is None and empty["p50_ms"] is None and empty["mean_batch"] is None
    assert summarize_run(load(4, False, [], 0.0, errors=1))["mean_batch"] is None  # nothing rode anywhere


def test_summary_has_every_run_with_the_required_keys() -> None:
    r = summarize(loads(), servers(), META)
    required = {"clients", "batching", "throughput_per_s", "p50_ms", "p99_ms", "mean_batch", "request_path_compiles"}
    assert all(required <= set(x) for x in r["runs"])
    assert [(x["clients"], x["batching"]) for x in r["runs"]] == [(1, False), (16, False), (1, True), (16, True)]
    assert r["predictor"] == "predict.py:Runner" and r["max_delay_ms"] == 5.0  # meta copied to the top level
    assert r["servers"]["on"]["batch"] == {"model": {"batches": 3, "sizes": {"2": 3}}}
    assert r["servers"]["off"]["served_compiled"] and r["failed"] == 0 and r["warnings"] == []


def test_targets_pass_when_batching_pays_off() -> None:
    t = summarize(loads(), servers(), META)["targets"]
    assert t["throughput"]["value"] == 3.0 and t["throughput"]["limit"] == 1.3 and t["throughput"]["pass"]
    # 1 client: unbatched p99 of 99 x 10 ms and one 20 ms is 10.1 ms; limit 1.1 * (10.1 + 5)
    p99 = t["p99_1_client"]
    assert p99["limit"] == 16.61 and p99["value"] == 14.16 and p99["pass"]
    assert t["request_path_compiles"] == {"rule": "request_path_compiles == 0 in every run and every server's "
                                          "metrics file", "value": 0, "limit": 0, "pass": True}


def test_targets_fail_on_slow_batching_a_late_single_client_or_a_compile() -> None:
    ls = loads()
    ls[3] = load(16, True, [50.0] * 120, 2.0, sizes=[8])  # 60/s against 50/s: 1.2x
    ls[2] = load(1, True, [20.0] * 100, 1.5, sizes=[1])
    t = summarize(ls, servers(), META)["targets"]
    assert t["throughput"]["value"] == 1.2 and not t["throughput"]["pass"]
    assert t["p99_1_client"]["value"] == 20.0 and not t["p99_1_client"]["pass"]
    assert t["request_path_compiles"]["pass"]
    ls[1] = load(16, False, [5.0] * 10, 1.0, compiles=1)  # a run that compiled on the request path
    assert summarize(ls, servers(), META)["targets"]["request_path_compiles"]["value"] == 1
    srv = {**servers(), "on": server("predict.py:BatchedRunner", compiles=2)}  # only the metrics file counted it
    t = summarize(loads(), srv, META)["targets"]
    assert t["request_path_compiles"]["value"] == 2 and not t["request_path_compiles"]["pass"]


def test_targets_without_the_runs_they_need_fail() -> None:
    runs = [summarize_run(x) for x in loads() if x["clients"] == 1]  # --clients 1: nothing at 16
    t = targets(runs, {}, 5.0)
    assert t["throughput"]["value"] is None and not t["throughput"]["pass"]
    assert t["p99_1_client"]["pass"]
    assert not targets([], {}, 5.0)["request_path_compiles"]["pass"]  # nothing measured proves nothing
    srv = {"off": {"request_path_compiles": None}}  # a server whose metrics file never came
    assert not targets(runs, srv, 5.0)["request_path_compiles"]["pass"]


def test_a_failed_server_an_eager_one_and_failed_predictions_are_flagged() -> None:
    eager = server("predict.py:Runner")
    eager["metrics_at_ready"]["eager_fallback"] = "model: export failed"
    srv = {"off": eager, "on": server("predict.py:BatchedRunner", error="RuntimeFailure: runtime status SETUP_FAILED")}
    ls = loads()
    ls[1] = load(16, False, [5.0] * 10, 1.0, errors=2)
    ls[2] = load(1, True, [14.0] * 10, 1.0)  # batched, but no batch_size reported
    r = summarize(ls, srv, META)
    assert not r["servers"]["off"]["served_compiled"]
    assert r["failed"] == 2  # the server that failed and the run with failed predictions
    w = "\n".join(r["warnings"])
    assert "server on (predict.py:BatchedRunner): RuntimeFailure" in w
    assert "server off does not serve compiled at READY: eager fallback 'model: export failed'" in w
    assert "16 clients, batching off: 2 predictions failed, the first: HTTP 500: boom" in w
    assert "1 clients, batching on: no prediction reported batch_size" in w


def test_report_and_chart_from_a_batch_json(tmp_path: Path) -> None:
    r = json.loads(json.dumps(summarize(loads(), servers(), META)))  # what batch.json holds
    text = report(r)
    assert "PASS  batched / unbatched throughput_per_s at 16 clients >= 1.3: 3.0 (limit 1.3)" in text
    assert text.count("\n       16        on       300") == 1  # the 16-client batched row
    png = tmp_path / "batch.png"
    chart(png, r)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert not list(tmp_path.glob(".*incomplete"))


def test_a_synchronous_run_gets_one_slot(tmp_path: Path) -> None:
    src = tmp_path / "p.py"
    src.write_text("class Base:\n    async def run(self): ...\n"
                   "class Sync(Base):\n    def run(self): ...\n"
                   "class Inherits(Base):\n    pass\n"
                   "class FromSync(Sync):\n    pass\n"
                   "class Elsewhere(Imported):\n    pass\n")
    got = {name: concurrency_for(f"{src}:{name}", 64) for name in ("Base", "Sync", "Inherits", "FromSync", "Elsewhere")}
    assert got == {"Base": 64, "Sync": 1, "Inherits": 64, "FromSync": 1, "Elsewhere": 64}


def test_help_and_bad_arguments() -> None:
    cp = subprocess.run([sys.executable, "-m", "compile_cache.tools.bench_batch", "--help"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    assert all(f in cp.stdout for f in ("--batched-predictor", "--clients", "--quick", "COG_MAX_CONCURRENCY"))
    assert bench_batch.main(["--requests", "0", "--out", "unused"]) == 2
    assert bench_batch.main(["--batched-predictor", "no/such.py:Runner", "--out", "unused"]) == 2
    with pytest.raises(SystemExit):
        bench_batch.main(["--clients", "0,4", "--out", "unused"])
    assert not (ROOT / "unused").exists()


def make(*args: str) -> str:
    cp = subprocess.run(["make", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    return cp.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_the_make_target_runs_the_tool(tmp_path: Path) -> None:
    dry = make("-n", "bench-batch", f"BENCH_OUT={tmp_path}", "BENCH_ARGS=--quick")
    assert f"-m compile_cache.tools.bench_batch --out {tmp_path}/batch --quick" in dry
    assert "make bench-batch BENCH_OUT=dir" in make("help")


# -- the GPU check's --batching step ---------------------------------------------------------------------------------
def test_the_gpu_check_keeps_the_runs_targets_and_servers_of_batch_json() -> None:
    r = json.loads(json.dumps(summarize(loads(), servers(), {**META, "weights": "the runner's own"})))
    got = batching_summary(r)
    assert got["runs"] == r["runs"] and got["targets"] == r["targets"] and got["weights"] == "the runner's own"
    assert got["servers"]["on"] == {"served_compiled": True, "cache": "hit", "strategy": "export", "setup_s": 1.5,
                                    "concurrency": 64, "request_path_compiles": 0, "error": ""}
    assert batching_summary({}) == {"runs": [], "targets": {}, "servers": {}, "weights": None, "warnings": []}


def test_the_gpu_check_skips_batching_without_the_time_for_it(tmp_path: Path) -> None:
    c = Check(tmp_path, tmp_path / "work", "cpu", time.monotonic() + gpucheck.BATCHING_S / 4)
    assert gpucheck._batching(c) == 0
    assert c.result["batching"]["skipped"].startswith("budget: ") and not (tmp_path / "batch").exists()


def test_the_gpu_check_offers_the_batching_step(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        gpucheck.main(["--help"])
    assert e.value.code == 0 and "--batching" in capsys.readouterr().out


def test_random_weights_have_the_examples_shapes_and_a_tokenizer_that_knows_its_text(tmp_path: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    bench_batch._random_weights(tmp_path / "w")
    cfg = AutoConfig.from_pretrained(tmp_path / "w")
    assert {k: getattr(cfg, k) for k in bench_batch._MINILM} == bench_batch._MINILM
    ids = AutoTokenizer.from_pretrained(tmp_path / "w")(["A man is eating food."])["input_ids"][0]
    assert len(ids) > 7 and 1 not in ids  # every character known: no [UNK] (id 1)
    real = ROOT / "weights" / "all-MiniLM-L6-v2"
    if not (real / "model.safetensors").is_file():
        pytest.skip("no weights/all-MiniLM-L6-v2 to compare with (make weights)")
    assert json.loads((real / "config.json").read_text()).items() >= bench_batch._MINILM.items()
    with safe_open(tmp_path / "w" / "model.safetensors", "pt") as ours, safe_open(real / "model.safetensors",
                                                                                   "pt") as theirs:
        shapes = {k: ours.get_slice(k).get_shape() for k in ours.keys()}
        assert shapes and all(theirs.get_slice(k).get_shape() == v for k, v in shapes.items())
