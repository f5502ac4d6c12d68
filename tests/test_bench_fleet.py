"""make bench-fleet's arithmetic, summary, targets, report and chart on small hand-made replica records (no boots:
the benchmark itself takes many minutes), and that the tool and its make target are there."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from compile_cache.tools import bench_fleet
from compile_cache.tools.bench_fleet import chart, latency, outputs_match, report, summarize, targets
from compile_cache.tools.seaweed import AWS_NOISE, isolated_env

ROOT = Path(__file__).resolve().parent.parent
EMB = [[0.5, -0.25, 0.125], [0.0, 1.0, -1.0]]  # what the eager fleet served: the reference


def near(scale: float) -> list[list[float]]:
    return [[x * scale for x in row] for row in EMB]


def rec(i: int, metrics: dict[str, Any], calls: list[tuple[float, bool]] | None = None,
        outputs: list[Any] | None = None, **kw: Any) -> dict[str, Any]:
    """A replica's run record as _run_replica leaves it; ``calls``: (ms, served before the swap)."""
    calls = calls if calls is not None else [(10.0, False)]
    return {
        "replica": i,
        "metrics": metrics,
        "calls": [{"at_s": 5.0 + n, "ms": ms, "before_swap": b} for n, (ms, b) in enumerate(calls)],
        "outputs": outputs if outputs is not None else [EMB] * len(calls),
        "ready_at_s": 4.0 + i,
        "first_compiled_at_s": kw.get("first_compiled_at_s"),
        "end_at_s": (kw.get("first_compiled_at_s") or 20.0 + i) + 1.0,
        "exit_code": 0,
        **({"error": kw["error"]} if "error" in kw else {}),
    }


def parts(*eager_calls: int) -> dict[str, Any]:
    return {f"p{n}": {"eager_calls_before_swap": c, "swapped_at_s": None} for n, c in enumerate(eager_calls)}


def records() -> dict[str, list[dict[str, Any]]]:
    """Three replicas per fleet: eager setups 4/5/6 s; today every replica builds (compiled at 80/90/100 s);
    new: replica 0 holds the lease and builds, the others follow, all ready in about 6 s and compiled by 75 s."""
    eager = [rec(i, {"ready_s": 4.0 + i, "total_s": 4.0 + i, "compiled_s": None, "strategy": "export"},
                 [(10.0 + i, False)] * 4)
             for i in range(3)]
    today = [rec(i, {"ready_s": 80.0 + 10 * i, "compiled_s": 80.0 + 10 * i, "built_here": True, "lease": "none",
                     "parts": parts(0)}, [(8.0, False)], outputs=[near(1.0 + 1e-5)], first_compiled_at_s=85.0 + i)
             for i in range(3)]
    new = [
        rec(0, {"ready_s": 6.0, "compiled_s": 75.0, "built_here": True, "lease": "held", "parts": parts(3, 2),
                "strategy": "export"},
            [(40.0, True)] * 5 + [(8.0, False)], first_compiled_at_s=78.0),
        rec(1, {"ready_s": 5.5, "compiled_s": 74.0, "built_here": False, "lease": "followed", "parts": parts(4, 0),
                "strategy": "export"},
            [(30.0, True)] * 4 + [(8.0, False)], first_compiled_at_s=77.0),
        rec(2, {"ready_s": 6.5, "compiled_s": 73.0, "built_here": False, "lease": "followed", "parts": parts(1, 1),
                "strategy": "export"},
            [(20.0, True)] * 2 + [(8.0, False)], first_compiled_at_s=76.0),
    ]
    return {"eager": eager, "today": today, "new": new}


META = {"predictor": "predict.py:Runner", "torch_version": "2.x", "timestamp": "2026-12-06T00:00:00+00:00",
        "machine": {"nproc": 2, "load_avg_before": [1.0], "load_avg_after": [2.0]}}


def test_outputs_match_within_the_stated_tolerance() -> None:
    rtol, atol = bench_fleet.TOLERANCE["rtol"], bench_fleet.TOLERANCE["atol"]
    assert outputs_match(EMB, EMB)
    assert outputs_match(near(1 + rtol / 2), EMB)
    assert not outputs_match(near(1 + 3 * rtol), EMB)  # 0.5 * 3e-3 = 1.5e-3 > atol + rtol * 0.5
    assert outputs_match([[atol / 2]], [[0.0]]) and not outputs_match([[atol * 2]], [[0.0]])  # atol near zero
    assert not outputs_match(EMB[:1], EMB)  # a missing row
    assert not outputs_match([[float("nan")] * 3, EMB[1]], EMB)
    assert not outputs_match("text", EMB) and outputs_match("same", "same")


def test_latency_takes_p50_and_p99_and_says_how_many() -> None:
    got = latency([float(x) for x in range(1, 102)])  # 1..101: order statistics fall on whole numbers
    assert got == {"p50": 51.0, "p99": 100.0, "n": 101}
    assert latency([7.0]) == {"p50": 7.0, "p99": 7.0, "n": 1}
    assert latency([]) == {"p50": None, "p99": None, "n": 0}


def test_summary_counts_builds_medians_and_calls_per_fleet() -> None:
    r = summarize(records(), META)
    assert r["replicas"] == 3 and r["predictor"] == "predict.py:Runner"  # meta copied to the top level
    assert r["eager_fleet_setup_s"] == 5.0  # median of 4, 5, 6
    f = r["fleets"]
    assert [f[n]["builds"] for n in ("eager", "today", "new")] == [0, 3, 1]
    assert f["today"]["median_ready_s"] == 90.0 and f["today"]["max_compiled_s"] == 100.0
    assert f["new"]["median_ready_s"] == 6.0 and f["new"]["max_compiled_s"] == 75.0
    assert f["new"]["env"]["COMPILE_CACHE_ON_MISS"] == "serve" and f["today"]["env"]["COMPILE_CACHE_BUILD_LEASE"] == "0"
    new = f["new"]["replicas"]
    assert [x["eager_calls_before_swap"] for x in new] == [5, 4, 2]  # summed over the parts
    assert [x["lease"] for x in new] == ["held", "followed", "followed"]
    assert [x["served_before_swap"] for x in new] == [5, 4, 2] and [x["predictions"] for x in new] == [6, 5, 3]
    assert all(x["outputs_match_eager"] for n in f for x in f[n]["replicas"])
    assert r["failed"] == 0 and r["warnings"] == []


def test_latency_during_the_build_is_the_new_fleets_calls_before_the_swap() -> None:
    r = summarize(records(), META)
    during, idle = r["eager_latency_ms"]["during_build"], r["eager_latency_ms"]["idle"]
    assert during["n"] == 5 + 4 + 2 and idle["n"] == 3 * 4  # compiled calls and the today fleet left out
    assert during["p50"] == 30.0 and during["p99"] == 40.0
    assert idle["p50"] == 11.0 and idle["p99"] == 12.0


def test_targets_pass_when_the_new_fleet_meets_them() -> None:
    t = summarize(records(), META)["targets"]
    assert t["median_ready_s"] == {"rule": "new.median_ready_s <= 1.5 * eager_fleet_setup_s", "value": 6.0,
                                   "limit": 7.5, "pass": True}
    assert t["builds"]["value"] == 1 and t["builds"]["today"] == 3 and t["builds"]["pass"]
    assert t["max_compiled_s"]["value"] == 75.0 and t["max_compiled_s"]["limit"] == 100.0 and t["max_compiled_s"]["pass"]


def test_targets_fail_on_two_builds_a_slow_setup_or_a_replica_that_never_compiled() -> None:
    recs = records()
    recs["new"][1]["metrics"]["built_here"] = True
    recs["new"][0]["metrics"]["ready_s"] = recs["new"][2]["metrics"]["ready_s"] = 9.0  # median 9 > 7.5
    recs["new"][2]["metrics"]["compiled_s"] = None
    recs["new"][2]["error"] = "TimeoutError: not serving compiled after 900s"
    r = summarize(recs, META)
    t = r["targets"]
    assert (t["builds"]["value"], t["builds"]["pass"]) == (2, False)
    assert (t["median_ready_s"]["value"], t["median_ready_s"]["pass"]) == (9.0, False)
    assert t["max_compiled_s"]["value"] is None and not t["max_compiled_s"]["pass"]  # never compiled: no maximum
    assert r["failed"] == 1 and any("new r2" in w for w in r["warnings"])
    # targets() on its own: a fleet slower than today's fails the compiled target
    fleets = {"new": {"median_ready_s": 1.0, "max_compiled_s": 120.0, "builds": 1, "replicas": [{}]},
              "today": {"max_compiled_s": 100.0, "builds": 1}}
    assert not targets(fleets, 1.0)["max_compiled_s"]["pass"] and targets(fleets, 1.0)["median_ready_s"]["pass"]
    assert not targets(fleets, None)["median_ready_s"]["pass"]  # no eager setup: nothing to compare with


def test_an_output_off_the_eager_one_is_flagged() -> None:
    recs = records()
    recs["new"][1]["outputs"][-1] = near(1.01)  # the compiled answer is 1 % off
    r = summarize(recs, META)
    assert [x["outputs_match_eager"] for x in r["fleets"]["new"]["replicas"]] == [True, False, True]
    assert any("new: replicas [1]" in w for w in r["warnings"])
    recs["eager"] = [rec(i, {"ready_s": 5.0}, calls=[], outputs=[]) for i in range(3)]  # eager served nothing
    r = summarize(recs, META)
    assert all(x["outputs_match_eager"] is None for x in r["fleets"]["new"]["replicas"])
    assert any("no output to compare with" in w for w in r["warnings"])


def test_an_eager_fleet_that_builds_is_flagged() -> None:
    recs = records()
    for r in recs["eager"]:
        r["metrics"].update(strategy="jit", built_here=True)
    r = summarize(recs, META)
    assert r["fleets"]["eager"]["builds"] == 3
    assert "eager: 3 replicas report built_here with compile off" in r["warnings"]
    assert r["failed"] == 0  # flagged, not failed: the figures are still what was measured


def test_report_and_chart_from_a_fleet_json(tmp_path: Path) -> None:
    recs = records()
    recs["today"][2] = rec(2, {}, calls=[], outputs=[], error="RuntimeFailure: runtime status SETUP_FAILED")
    recs["today"][2]["ready_at_s"] = None  # it never got READY: no row segments, and no crash
    r = json.loads(json.dumps(summarize(recs, META)))  # what fleet.json holds
    text = report(r)
    assert "PASS  new.builds == 1: 1 (limit 1)" in text
    assert "FAIL  new.max_compiled_s <= today.max_compiled_s: 75.0 (limit None)" in text  # today's r2 never compiled
    assert "WARNING: replica today r2: RuntimeFailure" in text
    png = tmp_path / "fleet.png"
    chart(png, r)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert not list(tmp_path.glob(".*incomplete"))


def test_replicas_get_an_environment_without_a_developers_aws_setup() -> None:
    env = isolated_env({"AWS_PROFILE": "dev", "AWS_REGION": "eu-west-1", "PATH": "/bin"})
    assert not set(AWS_NOISE) & set(env) and env["PATH"] == "/bin"
    assert env["AWS_CONFIG_FILE"] == env["AWS_SHARED_CREDENTIALS_FILE"]


def test_help_and_bad_arguments() -> None:
    cp = subprocess.run([sys.executable, "-m", "compile_cache.tools.bench_fleet", "--help"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0 and "--replicas" in cp.stdout and "COMPILE_CACHE_ON_MISS=serve" in cp.stdout
    assert bench_fleet.main(["--replicas", "0", "--out", "unused"]) == 2
    assert bench_fleet.main(["--predictor", "no/such.py:Runner", "--out", "unused"]) == 2
    assert not (ROOT / "unused").exists()


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_the_make_target_runs_the_tool_with_its_replicas(tmp_path: Path) -> None:
    cp = subprocess.run(["make", "-n", "bench-fleet", f"BENCH_OUT={tmp_path}", "REPLICAS=5"], cwd=ROOT,
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert f"-m compile_cache.tools.bench_fleet --out {tmp_path}/fleet --replicas 5" in cp.stdout
    helped = subprocess.run(["make", "help"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    assert "make bench-fleet BENCH_OUT=dir [REPLICAS=3]" in helped
