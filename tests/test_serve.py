"""The ``serve`` policy (compile_cache/serve.py, background.py): on a miss a part serves eager from the end of setup,
a child process builds the entry, and the compiled part is swapped in; with the build lease, a fleet builds once.

Boots run the tiny runner in fresh processes ("containers"), the first in the real Cog runtime with concurrent
predictions; outputs are compared with the eager model's before, during and after the swap.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from compile_cache.tools.cogrun import CogServer
from tests.conftest import ROOT, Boot, boot, lease_file, precompiled, wait_for
from tests.tiny_predictor import BATCHES, close, eager

TINY = "tests.tiny_predictor:Runner"
GATED = "tests.tiny_predictor:GatedRunner"
ASYNC = f"{ROOT / 'tests' / 'tiny_predictor.py'}:AsyncRunner"
BOOT_S = 600.0


def _env(tmp: Path, name: str, store: dict[str, str], **extra: str) -> dict[str, str]:
    """One container under the serve policy: its own Inductor dir, log and metrics file; the shared store."""
    return {
        "TORCHINDUCTOR_CACHE_DIR": str(tmp / name / "inductor"),
        "COMPILE_CACHE_LOG_FILE": str(tmp / name / "log.txt"),
        "COMPILE_CACHE_METRICS_FILE": str(tmp / name / "metrics.json"),
        "COMPILE_CACHE_ON_MISS": "serve",
        **store,
        **extra,
    }


def _metrics(env: dict[str, str]) -> dict[str, Any]:
    p = Path(env["COMPILE_CACHE_METRICS_FILE"])
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}




def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()


def _child_pid(env: dict[str, str]) -> int:
    """The pid of the container's background build, once it runs."""
    return int(wait_for("the background build to start",
                         lambda: _metrics(env).get("background_build", {}).get("pid")))


def _start(target: str, env: dict[str, str], **kw: Any) -> tuple[threading.Thread, list[Boot]]:
    out: list[Boot] = []
    t = threading.Thread(target=lambda: out.append(boot(target, env, {"batch": 1}, check=False, **kw)))
    t.start()
    return t, out


def _swapped(m: dict[str, Any]) -> None:
    """A replica that ends compiled: ready before compiled, the part swapped in and loaded, not traced."""
    part = m["parts"]["model"]
    assert m["compiled_s"] is not None and m["ready_s"] < part["swapped_at_s"] <= m["compiled_s"], m
    assert precompiled(m)["loaded"] == len(BATCHES) and m["compiles"] == 0, part
    assert not part["eager_fallback"] and not m["eager_fallback"] and not part["build_pending"]


# -- in the real Cog runtime -------------------------------------------------------------------------------------
def test_a_miss_serves_at_once_and_swaps_in_under_concurrent_predictions(tmp_path: Path) -> None:
    """Async run(), 4 slots: clients predict from READY until after the swap; every output is the eager model's, and
    each prediction says whether it was served before the swap. A second container then boots warm: a hit, nothing
    in the background."""
    store = {"COMPILE_CACHE_URL": f"file://{tmp_path / 'store'}", "COG_MAX_CONCURRENCY": "4", "PYTHONPATH": str(ROOT)}
    env = _env(tmp_path, "a", store)
    results: list[tuple[int, Any, bool]] = []  # (batch, response, whether the replica had swapped when it was sent)
    (tmp_path / "a").mkdir()  # the container's project dir: no .cog schema of another runner there
    with CogServer(ASYNC, cwd=tmp_path / "a", env=env, log_path=tmp_path / "a" / "server.log") as srv:
        srv.wait_ready(BOOT_S)
        assert _metrics(env)["compiled_s"] is None  # ready, the build still running

        def client(i: int) -> None:
            after = 0
            while after < 2:  # until two predictions sent after the swap
                swapped = _metrics(env).get("compiled_s") is not None
                batch = BATCHES[i % len(BATCHES)]
                code, body = srv.predict({"batch": batch}, timeout=120)
                results.append((batch, body if code == 200 else {"status": code, "body": body}, swapped))
                after += swapped
                time.sleep(0.2)

        clients = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for c in clients:
            c.start()
        for c in clients:
            c.join(BOOT_S)
        assert srv.shutdown("post") == 0, srv.log_tail()
    m = _metrics(env)
    for batch, body, _ in results:
        assert body["status"] == "succeeded" and close(body["output"], eager(batch)), body
    before = [b for _, b, _ in results if b["metrics"]["served_before_swap"]]
    assert before and len(before) < len(results)  # some predictions on each side of the swap
    assert all(not b["metrics"]["served_before_swap"] for _, b, swapped in results if swapped)
    _swapped(m)
    assert m["parts"]["model"]["eager_calls_before_swap"] == len(before)
    assert m["lease"] == "held" and m["built_here"] and m["cache"] == "miss", m
    build = m["background_build"]
    assert build["state"] == "done" and build["exit_code"] == 0 and build["peak_rss_mb"] > 0, build
    assert not _alive(build["pid"])
    manifest = json.loads(next((tmp_path / "store").glob("entries/*/manifest.json")).read_text())
    assert manifest["parts"] == {"model": "jit/precompile"}  # the parts the entry covers

    warm = boot(TINY.replace("Runner", "AsyncRunner"), _env(tmp_path, "b", store), {"batch": 4})
    w = warm.metrics
    assert w["cache"] == "hit" and w["compiled_s"] == w["ready_s"] and w["background_build"] == {}, w
    assert precompiled(w)["loaded"] == len(BATCHES) and w["compiles"] == 0 and not w["built_here"]
    assert w["parts"]["model"]["swapped_at_s"] is None and close(warm.outputs[0], eager(4))


@pytest.mark.serial
def test_a_container_stopped_mid_build_ends_its_child_and_releases_the_lease(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    env = _env(tmp_path, "a", {"COMPILE_CACHE_URL": f"file://{store_dir}", "PYTHONPATH": str(ROOT)},
               TINY_GATE=str(tmp_path / "never-opened"))  # the child's build waits forever
    (tmp_path / "a").mkdir()
    with CogServer(f"{ROOT / 'tests' / 'tiny_predictor.py'}:GatedRunner", cwd=tmp_path / "a", env=env,
                   log_path=tmp_path / "a" / "server.log") as srv:
        srv.wait_ready(BOOT_S)
        child = _child_pid(env)
        code, body = srv.predict({"batch": 1}, timeout=120)
        assert code == 200 and close(body["output"], eager(1)) and body["metrics"]["served_before_swap"]
        t = time.monotonic()
        assert srv.shutdown("sigterm", timeout=30) is not None, srv.log_tail()
        stopped_in = time.monotonic() - t
    assert stopped_in < 10, stopped_in  # inside Cog's shutdown window
    wait_for("the child to be gone", lambda: not _alive(child), 10)
    lease = lease_file(store_dir)
    assert lease is not None and lease["state"] == "released", lease
    assert not list(store_dir.glob("entries/*/manifest.json"))  # nothing half-built published
    m = _metrics(env)
    assert m["background_build"]["state"] == "killed" and m["compiled_s"] is None, m


# -- fleets (tests/boot.py containers) ---------------------------------------------------------------------------
def test_a_fleet_under_serve_builds_once_on_s3(tmp_path: Path, s3_env: dict[str, str]) -> None:
    a_env, b_env = _env(tmp_path, "a", s3_env), _env(tmp_path, "b", s3_env)
    a, a_out = _start(TINY, a_env, wait_compiled=BOOT_S, after=[{"batch": 4}])
    wait_for("the first container's build", lambda: _metrics(a_env).get("background_build"))
    b, b_out = _start(TINY, b_env, wait_compiled=BOOT_S, after=[{"batch": 4}])
    a.join(BOOT_S + 60)
    b.join(BOOT_S + 60)
    holder, follower = a_out[0], b_out[0]
    for x in (holder, follower):
        assert x.compiled and close(x.outputs[0], eager(1)) and close(x.outputs[1], eager(4)), x.stderr[-3000:]
        _swapped(x.metrics)
    h, f = holder.metrics, follower.metrics
    assert h["lease"] == "held" and h["built_here"] and h["background_build"]["state"] == "done", h
    assert f["lease"] == "followed" and not f["built_here"] and f["background_build"] == {}, f
    assert f["lease_holder"] == h["lease_holder"] and f"following the build of {h['lease_holder']}" in f["cache_reason"]
    assert 1 <= f["lease_polls"] <= 20  # backed off: about 9 reads a minute at most


def test_a_holder_killed_mid_build_is_taken_over_and_its_child_dies_with_it(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    store = {"COMPILE_CACHE_URL": str(store_dir), "COMPILE_CACHE_LEASE_TTL_S": "2"}
    a_env = _env(tmp_path, "a", store, TINY_GATE=str(tmp_path / "never-opened"))
    a, _ = _start(GATED, a_env, wait_compiled=BOOT_S)
    child = _child_pid(a_env)
    holder = wait_for("the lease", lambda: lease_file(store_dir))["holder"]
    b_env = _env(tmp_path, "b", store, TINY_GATE=str(tmp_path))  # an open gate
    b, b_out = _start(GATED, b_env, wait_compiled=BOOT_S, after=[{"batch": 4}])
    wait_for("the second container to follow", lambda: _metrics(b_env).get("lease") == "followed")
    os.kill(int(holder.split(":")[1]), signal.SIGKILL)
    wait_for("the killed holder's child to die with it", lambda: not _alive(child), 15)
    a.join(60)
    b.join(BOOT_S + 60)
    m = b_out[0].metrics
    assert b_out[0].compiled and close(b_out[0].outputs[1], eager(4)), b_out[0].stderr[-3000:]
    _swapped(m)
    assert m["lease"] == "held" and m["built_here"] and f"took over the expired build of {holder}" in m["cache_reason"]
    done = lease_file(store_dir)
    assert done is not None and done["state"] == "done" and done["holder"] == m["lease_holder"] != holder


def test_a_failed_build_leaves_the_fleet_eager_without_retrying(tmp_path: Path) -> None:
    # The compile fails (a backend that raises). The holder's child exits with "no part compiled" and the lease says
    # failed; the follower, which would wait 600 s, stops at once and starts no build of its own.
    store_dir, gate = tmp_path / "store", tmp_path / "gate"
    store = {"COMPILE_CACHE_URL": str(store_dir), "COMPILE_CACHE_LEASE_WAIT_S": "600", "TINY_GATE": str(gate),
             "TINY_BREAK_FORWARD": "1"}
    a_env, b_env = _env(tmp_path, "a", store), _env(tmp_path, "b", store)
    a, a_out = _start(GATED, a_env, wait_compiled=BOOT_S, after=[{"batch": 4}])
    _child_pid(a_env)
    b, b_out = _start(GATED, b_env, wait_compiled=BOOT_S, after=[{"batch": 4}])
    wait_for("the second container to follow", lambda: _metrics(b_env).get("lease") == "followed")
    gate.touch()
    a.join(BOOT_S + 60)
    b.join(BOOT_S + 60)
    h, f = a_out[0].metrics, b_out[0].metrics
    for x in (a_out[0], b_out[0]):  # eager, and correct
        assert x.compiled and close(x.outputs[0], eager(1)) and close(x.outputs[1], eager(4)), x.stderr[-3000:]
        assert x.metrics["compiled_s"] is not None and x.metrics["parts"]["model"]["swapped_at_s"] is None
        part = x.metrics["parts"]["model"]
        assert part["eager_fallback"] and part["eager_calls_before_swap"] == 1  # the call after: a fallback's
    assert h["background_build"]["state"] == "failed" and "no part compiled" in h["background_build"]["reason"], h
    lease = lease_file(store_dir)
    assert lease is not None and lease["state"] == "failed" and "no part compiled" in lease["reason"]
    assert f["lease"] == "followed" and f["background_build"] == {} and not f["built_here"], f
    assert "failed" in f["eager_fallback"] and 1 <= f["lease_polls"] <= 15, f
    assert not list(store_dir.glob("entries/*/manifest.json"))
