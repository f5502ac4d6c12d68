"""The build lease (compile_cache/lease.py): every case against both stores (a local directory and the real S3
server). No compile: a lease is a small JSON object, so these are fast.

Time is a fake monotonic clock the tests advance: expiry is decided on it alone, whatever the wall-clock fields say.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from compile_cache.errors import PreconditionFailed, StoreError
from compile_cache.lease import (
    MAX_LEASE_BYTES,
    MAX_POLLS_PER_MINUTE,
    POLL_CAP_S,
    Follow,
    Lease,
    LeaseBody,
    acquire,
    describe,
    lease_name,
    poll_delays,
    read_lease,
)
from compile_cache.lineage import lineage_entries
from compile_cache.manifest import manifest_name
from compile_cache.prune import list_entries
from compile_cache.stores.base import ObjectInfo, Progress, Store
from compile_cache.trust import TrustPolicy
from tests.test_stores import _race

KEY = "v1a2b.m0d3l.torch2.13.0-py311-cpu.0123456789ab"
TTL = 30.0
OPEN = TrustPolicy()  # no signing key: every lease is believed
SIGNED = TrustPolicy(signing_key=b"sk-lease-test-current")
ROTATED = TrustPolicy(signing_key=b"sk-lease-test-next", verify_keys=(b"sk-lease-test-current",))
OTHER = TrustPolicy(signing_key=b"sk-lease-test-other")


class Clock:
    """A monotonic clock that moves only when told (``sleep`` moves it too)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, dt: float) -> None:
        self.t += dt


class Counting(Store):
    """A store that counts the calls made on another, by primitive."""

    def __init__(self, inner: Store) -> None:
        self.inner, self.url, self.calls = inner, inner.url, Counter[str]()

    def read_versioned(self, name: str, *, max_bytes: int | None = None) -> tuple[bytes, str]:
        self.calls["read_versioned"] += 1
        return self.inner.read_versioned(name, max_bytes=max_bytes)

    def download(self, name: str, dest: Path, *, progress: Progress | None = None) -> int:
        self.calls["download"] += 1
        return self.inner.download(name, dest, progress=progress)

    def put_immutable(self, name: str, src: Path) -> bool:
        self.calls["put_immutable"] += 1
        return self.inner.put_immutable(name, src)

    def put_conditional(self, name: str, data: bytes, if_match: str | None) -> str:
        self.calls["put_conditional"] += 1
        return self.inner.put_conditional(name, data, if_match)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        self.calls["list"] += 1
        return self.inner.list(prefix)

    def delete(self, name: str) -> None:
        self.calls["delete"] += 1
        self.inner.delete(name)


def _lease(x: Lease | Follow) -> Lease:
    assert isinstance(x, Lease), f"expected to hold the lease, got {x!r}"
    return x


def _follow(x: Lease | Follow) -> Follow:
    assert isinstance(x, Follow), f"expected to follow the lease, got {x!r}"
    return x


def _body(store: Store) -> dict[str, Any]:
    return json.loads(store.read(lease_name(KEY)))


# -- acquire -------------------------------------------------------------------------------------------------------
def test_first_acquirer_holds_the_second_follows(store: Store) -> None:
    clock = Clock()
    held = _lease(acquire(store, KEY, OPEN, ttl_s=TTL, holder="a:1:x", parts=("encode",)))
    follow = _follow(acquire(store, KEY, OPEN, ttl_s=TTL, holder="b:2:y", clock=clock))
    assert held.state == "building"
    assert follow.status().seen_as == "live"
    assert follow.seen.body is not None and follow.seen.body.holder == "a:1:x"
    body = _body(store)
    assert (body["holder"], body["state"], body["renewals"], body["parts"]) == ("a:1:x", "building", 0, ["encode"])
    assert lease_name(KEY) == f"entries/{KEY}/lease.json" and manifest_name(KEY) == f"entries/{KEY}/manifest.json"


def test_acquirers_racing_on_a_missing_lease_elect_one_holder(store: Store) -> None:
    got = _race(6, lambda i: acquire(store, KEY, OPEN, ttl_s=TTL, holder=f"h:{i}:r"))
    holders = [x for x in got if isinstance(x, Lease)]
    assert len(holders) == 1
    assert all(isinstance(x, Follow) and x.status().seen_as == "live" for x in got if x is not holders[0])
    assert _body(store)["holder"] == holders[0].body.holder


@pytest.mark.parametrize("state", ["done", "failed", "released"])
def test_a_new_boot_takes_over_a_finished_lease(store: Store, state: str) -> None:
    """A done lease without a manifest (the entry was deleted since), an earlier failure, a released lease: none
    blocks a new boot, which takes it over by compare-and-swap."""
    first = _lease(acquire(store, KEY, OPEN, ttl_s=TTL, holder="old:1:x"))
    assert first.finish(state, "why")  # type: ignore[arg-type]
    counting = Counting(store)
    again = _lease(acquire(counting, KEY, OPEN, ttl_s=TTL, holder="new:2:y"))
    assert again.state == "building" and _body(store)["holder"] == "new:2:y"
    # create-only (refused), read, CAS on what was read
    assert counting.calls == Counter(put_conditional=2, read_versioned=1)


# -- renewal and expiry ----------------------------------------------------------------------------------------------
def test_every_renewal_changes_the_token(store: Store) -> None:
    held = _lease(acquire(store, KEY, OPEN, ttl_s=TTL))
    tokens = [held.token]
    for _ in range(3):
        assert held.renew()
        tokens.append(held.token)
        assert store.read_versioned(lease_name(KEY))[1] == held.token
    assert len(set(tokens)) == 4
    assert _body(store)["renewals"] == 3


def test_expiry_needs_ttl_without_change_on_the_followers_clock(store: Store) -> None:
    clock = Clock()
    held = _lease(acquire(store, KEY, OPEN, ttl_s=TTL))
    follow = _follow(acquire(store, KEY, OPEN, ttl_s=TTL, clock=clock))
    for _ in range(4):  # 4 renewals, each seen just inside the TTL: 4 * (TTL - 1) s in all, longer than the TTL
        held.renew()
        clock.sleep(TTL - 1)
        assert follow.poll().seen_as == "live"
    clock.sleep(TTL - 1)
    assert follow.poll().seen_as == "live"  # the last renewal was seen TTL - 1 s ago
    clock.sleep(1)
    st = follow.poll()
    assert st.seen_as == "expired" and "unchanged" in st.reason
    held.renew()
    assert follow.poll().seen_as == "live"  # a change revives it: the holder was only slow


def test_wall_clock_fields_decide_nothing(store: Store) -> None:
    """A lease whose writer's clock says 1970 is live while it changes, and one from the far future expires."""
    clock = Clock()
    name = lease_name(KEY)
    past = LeaseBody(key=KEY, holder="skewed:1:x", started_at=0.0, updated_at=0.0)
    token = store.put_conditional(name, past.to_bytes(OPEN), None)
    follow = _follow(acquire(store, KEY, OPEN, ttl_s=TTL, clock=clock))
    for n in range(1, 4):
        clock.sleep(TTL - 1)
        token = store.put_conditional(name, past.model_copy(update={"renewals": n}).to_bytes(OPEN), token)
        assert follow.poll().seen_as == "live"
    future = past.model_copy(update={"renewals": 9, "updated_at": time.time() + 10**6})
    store.put_conditional(name, future.to_bytes(OPEN), token)
    assert follow.poll().seen_as == "live"
    clock.sleep(TTL)
    assert follow.poll().seen_as == "expired"


def test_renewing_renews_in_the_background_until_the_block_ends(store: Store) -> None:
    held = _lease(acquire(store, KEY, OPEN, ttl_s=TTL))
    deadline = time.monotonic() + 30
    with held.renewing(0.02):
        while held.body.renewals < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert held.body.renewals >= 3
    stopped_at = _body(store)["renewals"]
    time.sleep(0.1)
    assert _body(store)["renewals"] == stopped_at == held.body.renewals


class LostReplies(Counting):
    """A store whose conditional puts land but whose replies get lost: the client retried the put and the retry
    lost to the first attempt (PreconditionFailed), or the reply timed out (StoreError)."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.lose: type[Exception] | None = None

    def put_conditional(self, name: str, data: bytes, if_match: str | None) -> str:
        token = super().put_conditional(name, data, if_match)
        if self.lose is not None:
            lose, self.lose = self.lose, None
            raise lose("the reply was lost")
        return token


def test_a_write_that_landed_with_its_reply_lost_is_not_a_lost_lease(store: Store) -> None:
    flaky = LostReplies(store)
    flaky.lose = PreconditionFailed
    held = _lease(acquire(flaky, KEY, OPEN, ttl_s=TTL, holder="me:1:x"))  # not a follower of its own lease
    assert held.body.holder == "me:1:x" and not held.lost
    flaky.lose = PreconditionFailed
    assert held.renew() and not held.lost
    flaky.lose = StoreError
    with pytest.raises(StoreError):
        held.renew()  # landed, but the holder cannot know
    assert held.renew() and not held.lost  # the next renewal finds its own write and goes on from it
    assert _body(store)["renewals"] == held.body.renewals == 3
    flaky.lose = PreconditionFailed
    assert held.finish("done") and _body(store)["state"] == "done"
    assert flaky.calls["delete"] == 0


def test_a_takeover_that_landed_with_its_reply_lost_is_held(store: Store) -> None:
    clock = Clock()
    _lease(acquire(store, KEY, OPEN, ttl_s=TTL, holder="dead:1:x"))
    flaky = LostReplies(store)
    follow = _follow(acquire(flaky, KEY, OPEN, ttl_s=TTL, clock=clock))
    clock.sleep(TTL)
    assert follow.poll().seen_as == "expired"
    flaky.lose = PreconditionFailed
    held = follow.take_over(holder="me:2:y")
    assert held is not None and held.body.holder == "me:2:y" and held.renew()


# -- takeover --------------------------------------------------------------------------------------------------------
def test_exactly_one_of_racing_followers_takes_over_a_stale_lease(store: Store) -> None:
    n = 8
    clock = Clock()
    stale = _lease(acquire(store, KEY, OPEN, ttl_s=TTL, holder="dead:1:x"))
    followers = [_follow(acquire(store, KEY, OPEN, ttl_s=TTL, clock=clock)) for _ in range(n)]
    with pytest.raises(ValueError, match="live"):
        followers[0].take_over()
    clock.sleep(TTL)
    assert all(f.poll().seen_as == "expired" for f in followers)
    got = _race(n, lambda i: followers[i].take_over(holder=f"f:{i}:r"))
    winners = [g for g in got if isinstance(g, Lease)]
    assert len(winners) == 1 and got.count(None) == n - 1
    assert _body(store)["holder"] == winners[0].body.holder
    assert all(f.poll().seen_as == "live" for f in followers)  # the losers now follow the winner
    # The old holder finds out at its next write, which changes nothing.
    assert stale.renew() is False and stale.lost
    assert stale.finish("done") is False
    assert _body(store)["holder"] == winners[0].body.holder and _body(store)["state"] == "building"


# -- end states ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("state", ["done", "failed", "released"])
def test_end_states_are_compare_and_swap_writes(store: Store, state: str) -> None:
    counting = Counting(store)
    held = _lease(acquire(counting, KEY, OPEN, ttl_s=TTL))
    held.renew()
    assert held.finish(state, "reason given")  # type: ignore[arg-type]
    assert counting.calls == Counter(put_conditional=3)  # create, renew, finish: no delete, no plain put
    assert held.finish("done") is False and held.renew() is False  # a finished lease stays as it ended
    assert counting.calls == Counter(put_conditional=3)
    body = _body(store)
    assert (body["state"], body["reason"], body["renewals"]) == (state, "reason given", 2)
    with pytest.raises(ValueError):
        held.finish("building")  # type: ignore[arg-type]


def test_a_failure_reaches_a_waiting_follower_at_its_next_read(store: Store) -> None:
    clock = Clock()
    held = _lease(acquire(store, KEY, OPEN, ttl_s=TTL))
    follow = _follow(acquire(store, KEY, OPEN, ttl_s=TTL, clock=clock))
    held.finish("failed", "RuntimeError: CUDA out of memory during compile")
    st = follow.watch(3600, sleep=clock.sleep)
    assert st.seen_as == "failed"
    assert st.reason == "RuntimeError: CUDA out of memory during compile"
    assert follow.polls == 1


def test_watch_returns_done_or_live_at_its_deadline(store: Store) -> None:
    clock = Clock()
    held = _lease(acquire(store, KEY, OPEN, ttl_s=10 * TTL))
    follow = _follow(acquire(store, KEY, OPEN, ttl_s=10 * TTL, clock=clock))
    st = follow.watch(TTL, sleep=clock.sleep)
    assert st.seen_as == "live" and 0 < follow.polls <= MAX_POLLS_PER_MINUTE
    held.finish("done")
    assert follow.watch(TTL, sleep=clock.sleep).seen_as == "done"


def test_a_follower_that_cannot_read_the_store_sees_the_lease_expire(store: Store) -> None:
    clock = Clock()
    held = _lease(acquire(store, KEY, OPEN, ttl_s=TTL))

    class Unreachable(Counting):
        def read_versioned(self, name: str, *, max_bytes: int | None = None) -> tuple[bytes, str]:
            super().read_versioned(name, max_bytes=max_bytes)
            raise StoreError("connection refused")

    follow = _follow(acquire(store, KEY, OPEN, ttl_s=TTL, clock=clock))
    follow.store = unreachable = Unreachable(store)
    held.renew()  # a change this follower cannot see
    start = clock()
    st = follow.watch(3600, sleep=clock.sleep)
    assert st.seen_as == "expired" and unreachable.calls["read_versioned"] > 0
    assert TTL <= clock() - start < TTL + POLL_CAP_S * (1 + 0.1)  # within one (jittered) poll interval of the TTL


# -- poll rate -------------------------------------------------------------------------------------------------------
def _most_in_a_minute(times: list[float]) -> int:
    return max(sum(1 for u in times if t <= u < t + 60) for t in times)


def test_poll_schedule_bounds_reads_per_minute() -> None:
    delays = poll_delays()
    times, t = [0.0], 0.0
    for _ in range(200):
        t += next(delays)
        times.append(t)
    assert _most_in_a_minute(times) == MAX_POLLS_PER_MINUTE
    assert _most_in_a_minute([u for u in times if u >= 60]) == 6


def test_a_follower_reads_at_most_the_stated_rate(store: Store) -> None:
    """The reads a watching follower makes, timed on its clock, over ten minutes of a live lease."""
    clock = Clock()
    _lease(acquire(store, KEY, OPEN, ttl_s=10**6))
    times: list[float] = []

    class Timed(Counting):
        def read_versioned(self, name: str, *, max_bytes: int | None = None) -> tuple[bytes, str]:
            times.append(clock())
            return super().read_versioned(name, max_bytes=max_bytes)

    follow = _follow(acquire(Timed(store), KEY, OPEN, ttl_s=10**6, clock=clock))
    times.clear()  # acquire's own read
    assert follow.watch(600, sleep=clock.sleep).seen_as == "live"
    assert len(times) == follow.polls > 50
    assert _most_in_a_minute(times) <= MAX_POLLS_PER_MINUTE


# -- signing ---------------------------------------------------------------------------------------------------------
def test_signed_lease_is_followed_under_the_same_and_the_next_key(store: Store) -> None:
    held = _lease(acquire(store, KEY, SIGNED, ttl_s=TTL, holder="signer:1:x"))
    assert _body(store)["signature"]
    assert _follow(acquire(store, KEY, SIGNED, ttl_s=TTL)).status().seen_as == "live"
    assert _follow(acquire(store, KEY, ROTATED, ttl_s=TTL)).status().seen_as == "live"  # signed with an earlier key
    held.finish("failed", "boom")
    assert read_lease(store, KEY, SIGNED).body is not None  # the failure record is signed too
    assert read_lease(store, KEY, OTHER).body is None
    unsigned = _lease(acquire(store, KEY + "0", OPEN, ttl_s=TTL)).key  # a lease written without a key
    migrating = TrustPolicy(signing_key=SIGNED.signing_key, allow_unsigned=True)
    assert read_lease(store, unsigned, SIGNED).body is None
    assert read_lease(store, unsigned, migrating).body is not None  # COMPILE_CACHE_ALLOW_UNSIGNED believes it


def _tampered(store: Store) -> None:
    acquire(store, KEY, SIGNED, ttl_s=TTL, holder="signer:1:x")
    data, token = store.read_versioned(lease_name(KEY))
    body = json.loads(data)
    body["renewals"] = 7
    store.put_conditional(lease_name(KEY), json.dumps(body).encode(), token)


def _write(store: Store, data: bytes) -> None:
    store.put_conditional(lease_name(KEY), data, None)


BAD_LEASES = {
    "tampered": _tampered,
    "unsigned": lambda s: _write(s, LeaseBody(key=KEY, holder="x:1:y").to_bytes(OPEN)),
    "other key": lambda s: _write(s, LeaseBody(key=KEY, holder="x:1:y").to_bytes(OTHER)),
    "another entry's": lambda s: _write(s, LeaseBody(key=KEY + "0", holder="x:1:y").to_bytes(SIGNED)),
    "malformed": lambda s: _write(s, b'{"state": "building"'),
    "newer format": lambda s: _write(
        s, LeaseBody(key=KEY, holder="x:1:y").to_bytes(SIGNED).replace(b'"format": 1', b'"format": 2')
    ),
}


@pytest.mark.parametrize("bad", BAD_LEASES)
def test_an_untrusted_lease_never_blocks_a_build(store: Store, bad: str) -> None:
    """Under a signing key, a building lease that does not verify counts as released: taken over by CAS at once."""
    BAD_LEASES[bad](store)
    assert describe(store, KEY, SIGNED)["state"] == "untrusted"  # type: ignore[index]
    held = _lease(acquire(store, KEY, SIGNED, ttl_s=TTL, holder="me:1:z"))
    seen = read_lease(store, KEY, SIGNED)
    assert seen.body is not None and seen.body.holder == "me:1:z" and held.renew()


def test_an_unreadably_large_lease_turns_the_lease_off_for_its_key(store: Store) -> None:
    """No CAS can replace an object whose token is not read: acquire says so (the boot builds unleased) and a
    follower stops waiting."""
    clock = Clock()
    held = _lease(acquire(store, KEY, OPEN, ttl_s=TTL))
    follow = _follow(acquire(store, KEY, OPEN, ttl_s=TTL, clock=clock))
    store.put_conditional(lease_name(KEY), b" " * (MAX_LEASE_BYTES + 1), held.token)
    with pytest.raises(StoreError, match="cannot be used"):
        acquire(store, KEY, OPEN, ttl_s=TTL)
    assert follow.watch(3600, sleep=clock.sleep).seen_as == "failed" and follow.polls == 1


# -- listing, inspect, prune -----------------------------------------------------------------------------------------
def test_entry_listings_ignore_lease_objects(store: Store, tmp_path: Path) -> None:
    other = KEY.replace("m0d3l", "m0d3m")
    store.put_conditional(manifest_name(KEY), b"{}", None)  # listings go by name; contents are not read here
    acquire(store, KEY, OPEN, ttl_s=TTL)
    acquire(store, other, OPEN, ttl_s=TTL)  # a lease whose entry is not published yet
    assert [e.key for e in lineage_entries(store, KEY.split(".")[0])] == [KEY]
    assert [e.key for e in list_entries(store)] == [KEY]


def test_describe_shows_state_holder_and_renewals(store: Store) -> None:
    assert describe(store, KEY, OPEN) is None
    held = _lease(acquire(store, KEY, SIGNED, ttl_s=TTL, holder="host:42:ab", parts=("encode", "decode")))
    held.renew()
    d = describe(store, KEY, SIGNED, now=held.body.updated_at + 12.0)
    assert d is not None
    assert (d["state"], d["holder"], d["renewals"], d["parts"], d["age_s"]) == (
        "building", "host:42:ab", 1, ["encode", "decode"], 12.0,
    )
    assert d["signed"] is True and d["trusted"] is True
    held.finish("failed", "compile error")
    d = describe(store, KEY, SIGNED)
    assert d is not None and (d["state"], d["reason"]) == ("failed", "compile error")


def test_inspect_shows_the_lease(store: Store, tmp_path: Path) -> None:
    from tests.test_cli import cli, fake_cache, seed

    key = seed(store, "v7", fake_cache(tmp_path, {"fxgraph/aa/g": b"g" * 100}))
    assert "build lease    -" in cli(store, "inspect", key).stdout
    held = _lease(acquire(store, key, OPEN, ttl_s=TTL, holder="host:7:cd", parts=("decode",)))
    held.finish("failed", "compile error in decode")
    cp = cli(store, "inspect", key)
    assert cp.returncode == 0, cp.stderr
    line = next(ln for ln in cp.stdout.splitlines() if ln.startswith("build lease"))
    assert line.startswith("build lease    failed of decode by host:7:cd, 1 renewals, written ")
    assert line.endswith(": compile error in decode")
    body = json.loads(cli(store, "inspect", key, "--json").stdout)
    assert (body["lease"]["state"], body["lease"]["reason"]) == ("failed", "compile error in decode")


def test_prune_deletes_only_leases_unchanged_past_the_grace(store: Store) -> None:
    from compile_cache.prune import apply_prune, plan_prune

    other = KEY.replace("m0d3l", "m0d3m")
    acquire(store, KEY, OPEN, ttl_s=TTL)
    assert plan_prune(store, grace_s=3600).leases == []
    acquire(store, other, OPEN, ttl_s=TTL)
    plan = plan_prune(store, grace_s=3600, now=time.time() + 7200)
    assert sorted(o.name for o in plan.leases) == sorted([lease_name(KEY), lease_name(other)])
    assert sorted(apply_prune(store, plan).leases_deleted) == sorted([lease_name(KEY), lease_name(other)])
    assert [o.name for o in store.list("entries/")] == []
