"""The build lease in the boot (compile_cache/fleet.py, lifecycle.py): a fleet builds each key once.

The first tests drive :func:`coordinate` on a store with a stand-in restore (no compile). The others boot the tiny
runner in fresh processes ("containers") beside each other on one store: one builds, the other follows and restores
its entry; a failed build stops the followers at once; with the lease off every replica builds. A holder killed
mid-build and taken over after the TTL (Coordination.settle, the same under both policies) is in tests/test_serve.py.
Boots run under the default jit restore (``precompile``), as in production.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from compile_cache.fleet import coordinate
from compile_cache.lease import acquire, read_lease
from compile_cache.stores import LocalStore
from compile_cache.trust import TrustPolicy
from tests.conftest import Boot, boot, lease_file, wait_for
from tests.tiny_predictor import BATCHES, close, eager

TINY = "tests.tiny_predictor:Runner"
GATED = "tests.tiny_predictor:GatedRunner"
KEY = "tiny-fleet-0123456789abcdef"
OPEN = TrustPolicy()
BOOT_S = 600  # a cold boot under load, with room


@dataclass
class _R:
    """A stand-in restore result: what coordinate() reads of one."""

    status: str
    seconds: float = 0.5


# -- coordinate() without a compile --------------------------------------------------------------------------------
def test_a_holder_that_finds_the_entry_published_meanwhile_restores_it(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    calls: list[str] = []
    c = coordinate(store, KEY, OPEN, ttl_s=30, wait_s=30, restore_entry=lambda: calls.append("r") or _R("hit"))
    assert c.role == "held" and calls == ["r"] and c.lease is None
    assert c.outcome(_R("miss", 0.25)).status == "hit" and c.outcome(_R("miss", 0.25)).seconds == 0.75
    assert read_lease(store, KEY, OPEN).body.state == "done"  # type: ignore[union-attr]


def test_a_holder_builds_then_publishes_then_the_lease_is_done(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    c = coordinate(store, KEY, OPEN, ttl_s=30, wait_s=30, restore_entry=lambda: _R("miss"))
    assert c.role == "held" and c.outcome(_R("miss")).status == "miss" and "lease held" in c.note
    with c.building(exit_budget_s=1):
        assert read_lease(store, KEY, OPEN).body.state == "building"  # type: ignore[union-attr]
    c.published("", complete=False)  # a deadline cut the upload short: nothing is decided yet
    assert read_lease(store, KEY, OPEN).body.state == "building"  # type: ignore[union-attr]
    c.published("", complete=True)
    c.release(time.monotonic() + 1)  # the exit flush after done writes nothing
    body = read_lease(store, KEY, OPEN).body
    assert body is not None and body.state == "done" and body.holder == c.holder


def test_renewals_go_on_after_the_build_until_the_lease_ends(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    c = coordinate(store, KEY, OPEN, ttl_s=0.15, wait_s=30, restore_entry=lambda: _R("miss"))  # renewed every 50 ms

    def renewals() -> int:
        return read_lease(store, KEY, OPEN).body.renewals  # type: ignore[union-attr]

    with c.building(exit_budget_s=1):
        pass
    after_build = renewals()
    wait_for("a renewal after the build (the upload is still to come)", lambda: renewals() > after_build, 30)
    c.published("", complete=True)
    ended = renewals()
    time.sleep(0.3)
    assert renewals() == ended and read_lease(store, KEY, OPEN).body.state == "done"  # type: ignore[union-attr]


def test_a_build_that_raises_marks_the_lease_failed_with_its_reason(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    c = coordinate(store, KEY, OPEN, ttl_s=30, wait_s=30, restore_entry=lambda: _R("miss"))
    with pytest.raises(RuntimeError), c.building(exit_budget_s=1):
        raise RuntimeError("the model does not fit")
    body = read_lease(store, KEY, OPEN).body
    assert body is not None and body.state == "failed" and "the model does not fit" in body.reason


def test_the_exit_flush_releases_a_lease_still_building(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    c = coordinate(store, KEY, OPEN, ttl_s=30, wait_s=30, restore_entry=lambda: _R("miss"))
    c.release(time.monotonic() + 5)
    assert read_lease(store, KEY, OPEN).body.state == "released"  # type: ignore[union-attr]


def test_a_follower_stops_at_its_wait_and_builds_without_the_lease(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    acquire(store, KEY, OPEN, ttl_s=30, holder="other:1:x")
    restores: list[str] = []
    c = coordinate(store, KEY, OPEN, ttl_s=30, wait_s=0, restore_entry=lambda: restores.append("r") or _R("hit"))
    assert c.role == "followed" and c.holder == "other:1:x" and c.lease is None and restores == []
    assert "COMPILE_CACHE_LEASE_WAIT_S" in c.note
    assert read_lease(store, KEY, OPEN).body.holder == "other:1:x"  # type: ignore[union-attr]


def test_a_follower_restores_the_entry_once_the_lease_is_done(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    held = acquire(store, KEY, OPEN, ttl_s=30, holder="other:1:x")
    threading.Timer(0.5, held.finish, args=("done",)).start()  # type: ignore[union-attr]
    c = coordinate(store, KEY, OPEN, ttl_s=30, wait_s=60, restore_entry=lambda: _R("hit"))
    assert c.role == "followed" and c.restored is not None and c.note == "followed the build of other:1:x"
    assert 1 <= c.polls <= 2 and c.lease is None


# -- boots ---------------------------------------------------------------------------------------------------------
def _env(tmp: Path, name: str, store_env: dict[str, str], **extra: str) -> dict[str, str]:
    """One container: its own Inductor cache dir and log file, the shared store, the default jit restore."""
    return {
        "TORCHINDUCTOR_CACHE_DIR": str(tmp / name / "inductor"),
        "COMPILE_CACHE_LOG_FILE": str(tmp / name / "log.txt"),
        "COMPILE_CACHE_JIT_RESTORE": "precompile",
        **store_env,
        **extra,
    }


def _together(*boots: tuple[str, dict[str, str]]) -> list[Boot]:
    """Boot the containers at the same time, one thread each; their results in the order given."""
    out: list[Any] = [None] * len(boots)

    def one(i: int, target: str, env: dict[str, str]) -> None:
        out[i] = boot(target, env, {"batch": 1}, check=False)

    threads = [threading.Thread(target=one, args=(i, t, e)) for i, (t, e) in enumerate(boots)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(BOOT_S)
    return out


def _start(target: str, env: dict[str, str]) -> tuple[threading.Thread, list[Boot]]:
    out: list[Boot] = []
    t = threading.Thread(target=lambda: out.append(boot(target, env, {"batch": 1}, check=False)))
    t.start()
    return t, out




def _in_log(env: dict[str, str], text: str) -> bool:
    p = Path(env["COMPILE_CACHE_LOG_FILE"])
    return p.exists() and text in p.read_text()


def _built(m: dict[str, Any]) -> bool:
    """A boot that compiled under precompile: every shape's function built (and traced: Dynamo compiles)."""
    return m["parts"]["model"]["precompiled"]["built"] == len(BATCHES) and m["compiles"] > 0


def _assert_restored(b: Boot) -> None:
    """A boot that restored the entry under precompile: no Dynamo work, every shape's function loaded."""
    m = b.metrics
    assert m["cache"] == "hit" and m["compiles"] == 0 and m["fxgraph_misses"] == 0, m
    assert m["parts"]["model"]["precompiled"]["loaded"] == len(BATCHES), m["parts"]
    assert close(b.outputs[0], eager(1))


@pytest.fixture(params=["local", "s3"])
def store_env(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    if request.param == "local":
        return {"COMPILE_CACHE_URL": str(tmp_path / "store")}
    return request.getfixturevalue("s3_env")


def test_two_replicas_booting_together_build_once(tmp_path: Path, store_env: dict[str, str]) -> None:
    a, b = _together((TINY, _env(tmp_path, "a", store_env)), (TINY, _env(tmp_path, "b", store_env)))
    by_role = {x.metrics.get("lease"): x for x in (a, b)}
    assert set(by_role) == {"held", "followed"}, [(x.metrics, x.stderr[-2000:]) for x in (a, b)]
    held, followed = by_role["held"], by_role["followed"]
    assert held.metrics["cache"] == "miss" and _built(held.metrics), held.metrics
    assert "lease held" in held.metrics["cache_reason"]
    _assert_restored(followed)
    assert followed.metrics["lease_holder"] == held.metrics["lease_holder"]
    assert f"followed the build of {held.metrics['lease_holder']}" in followed.metrics["cache_reason"]
    assert followed.metrics["lease_polls"] >= 1 and held.metrics["lease_polls"] == 0
    assert "  lease      followed" in followed.stderr


def test_lease_off_every_replica_builds(tmp_path: Path) -> None:
    store = {"COMPILE_CACHE_URL": str(tmp_path / "store"), "COMPILE_CACHE_BUILD_LEASE": "0"}
    a, b = _together((TINY, _env(tmp_path, "a", store)), (TINY, _env(tmp_path, "b", store)))
    for x in (a, b):
        assert x.metrics["lease"] == "none" and x.metrics["cache"] == "miss" and _built(x.metrics)
    assert lease_file(tmp_path / "store") is None


def test_a_failed_build_stops_the_followers_at_once(tmp_path: Path) -> None:
    # Both replicas' compile fails (a backend that raises): the holder records why; the follower, which would wait
    # up to 600 s, builds itself once as soon as it reads the failure.
    store = {"COMPILE_CACHE_URL": str(tmp_path / "store"), "COMPILE_CACHE_LEASE_WAIT_S": "600"}
    gate = tmp_path / "gate"
    first_env = _env(tmp_path, "first", store, TINY_GATE=str(gate), TINY_BREAK_FORWARD="1")
    first, first_out = _start(GATED, first_env)
    wait_for("the first boot's lease", lambda: lease_file(tmp_path / "store"))
    second_env = _env(tmp_path, "second", store, TINY_GATE=str(gate), TINY_BREAK_FORWARD="1")
    second, second_out = _start(GATED, second_env)
    wait_for("the second boot to follow", lambda: _in_log(second_env, "following the build of"))
    gate.touch()
    first.join(BOOT_S)
    second.join(BOOT_S)
    holder, follower = first_out[0].metrics, second_out[0].metrics
    assert holder["lease"] == "held" and holder["eager_fallback"], first_out[0].stderr[-3000:]
    lease = lease_file(tmp_path / "store")
    assert lease is not None and lease["state"] == "failed" and lease["holder"] == holder["lease_holder"]
    assert "no part compiled" in lease["reason"] and "tiny_broken" in lease["reason"]
    assert follower["lease"] == "followed" and follower["lease_holder"] == holder["lease_holder"]
    assert "failed" in follower["cache_reason"] and "building here, once" in follower["cache_reason"]
    # It read the failure within a few polls (a 600 s wait is over 60 at the follower's poll rate), built once
    # (its own compile failed too: it serves eager) and left the holder's record as it was.
    assert 1 <= follower["lease_polls"] <= 15 and follower["eager_fallback"], follower
    assert follower["upload_state"] == "none"


@pytest.mark.serial
def test_a_holder_stopped_mid_build_releases_the_lease_and_exits_in_cogs_window(tmp_path: Path) -> None:
    store = {"COMPILE_CACHE_URL": str(tmp_path / "store")}
    env = _env(tmp_path, "first", store, TINY_GATE=str(tmp_path / "never-opened"))
    t, _ = _start(GATED, env)
    lease = wait_for("the lease", lambda: lease_file(tmp_path / "store"))
    wait_for("the build to start", lambda: lease_file(tmp_path / "store")["renewals"] > 0)
    os.kill(int(lease["holder"].split(":")[1]), signal.SIGTERM)
    t.join(10)  # Cog's window between SIGTERM and SIGKILL
    assert not t.is_alive()
    after = lease_file(tmp_path / "store")
    assert after is not None and after["state"] == "released" and after["holder"] == lease["holder"]
