"""The build lease: a small object beside a key's manifest, so that a fleet builds each cache key once.

A replica that misses takes the lease with a create-only put (:func:`acquire` returns a :class:`Lease`), or finds a
live one and follows it (a :class:`Follow`). The holder builds, renews the lease while it builds, publishes the
manifest, and only then marks the lease ``done``. A follower polls the lease with a bounded back-off and reports
what it sees: ``live``, ``expired``, ``done``, ``failed`` (with the holder's reason) or ``released``.

Expiry trusts no clock but the follower's own: a lease is expired when the object has not changed (its version
token: sha256 locally, the ETag on S3) for ``ttl_s`` seconds of the follower's ``time.monotonic()``. Every renewal
bumps a counter in the body, so the bytes (and with them both stores' tokens) change. The wall-clock times in the
body are for people reading it (``inspect``), never for a decision.

Every write is a conditional put: the first a create-only put, the rest compare-and-swap on the token last read
(renewal, takeover, and the end states ``done``, ``failed``, ``released``). Nothing here deletes, because the
serving role cannot; old lease objects go with ``prune`` (:func:`stale_leases`). With a signing key the body is
signed like a manifest, and a lease this process cannot trust (unsigned, tampered, foreign, malformed, written
for another key) never blocks a build: it counts as released, so the next replica takes it over by CAS.

The protocol, the states and the settings that drive it: docs/fleet.md. Torch-free and boto3-free.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import IntegrityError, ObjectNotFound, PreconditionFailed, StoreError
from .stores.base import ObjectInfo, Store
from .trust import TrustPolicy

__all__ = [
    "LeaseBody",
    "Lease",
    "Follow",
    "Seen",
    "Status",
    "acquire",
    "read_lease",
    "describe",
    "summary",
    "stale_leases",
    "lease_name",
    "is_lease_name",
    "holder_id",
    "poll_delays",
    "MAX_POLLS_PER_MINUTE",
]

log = logging.getLogger("compile_cache")

LEASE_FORMAT = 1
MAX_LEASE_BYTES = 64 * 2**10  # a lease is a few hundred bytes; a larger object is refused unread
MAX_REASON_CHARS = 2000  # a failure's reason is a summary for people, not a traceback

# The follower's poll schedule: 1 s, doubling, capped at 10 s. Reads then fall at t = 0, 1, 3, 7, 15, 25, 35, 45,
# 55 s, ...: at most 9 in any minute, and 6 a minute once at the cap. Jitter only lengthens a delay, so the bound
# holds with it.
POLL_FIRST_S = 1.0
POLL_CAP_S = 10.0
MAX_POLLS_PER_MINUTE = 9
_JITTER = 0.1

_ACQUIRE_TRIES = 4  # each lost try means another replica wrote the lease meanwhile: reading it again settles it

_LEASE_SUFFIX = "/lease.json"
_ENTRIES = "entries/"

State = Literal["building", "released", "done", "failed"]
Observed = Literal["live", "expired", "released", "done", "failed"]


def lease_name(key: str) -> str:
    """The lease of ``key`` lives beside its manifest (``entries/<key>/manifest.json``)."""
    return f"{_ENTRIES}{key}{_LEASE_SUFFIX}"


def is_lease_name(name: str) -> bool:
    return name.startswith(_ENTRIES) and name.endswith(_LEASE_SUFFIX)


def holder_id() -> str:
    """``host:pid:random``: unique per process, readable in ``inspect``."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class LeaseBody(BaseModel):
    """What the lease object holds. ``renewals`` makes every write change the bytes; ``started_at`` and
    ``updated_at`` are the writer's wall clock, for display only."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    format: Literal[1] = LEASE_FORMAT  # a reader of another format refuses the lease (never blocked by it)
    key: str
    holder: str
    state: State = "building"
    renewals: int = Field(default=0, ge=0)
    reason: str = ""
    parts: tuple[str, ...] = ()  # the parts the holder builds (all of them when empty)
    started_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    signature: str | None = None

    def _canonical(self) -> bytes:
        """What the signature covers: the body without it, in the model's field order."""
        return self.model_dump_json(exclude={"signature"}).encode()

    def to_bytes(self, trust: TrustPolicy) -> bytes:
        signed = self.model_copy(update={"signature": trust.sign(self._canonical())})
        return signed.model_dump_json(indent=1).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> LeaseBody:
        """Parse; raises IntegrityError on anything that is not a well-formed lease of this format."""
        try:
            return cls.model_validate_json(data)
        except ValidationError as e:
            raise IntegrityError(f"lease is malformed: {str(e).splitlines()[0]}") from e

    def untrusted_because(self, trust: TrustPolicy) -> str:
        """Why this process must not believe this lease ("" when it may)."""
        v = trust.judge_record(self._canonical(), self.signature)
        if v.loads:
            return ""
        if v.signer == "foreign":
            return "lease signature does not verify with COMPILE_CACHE_SIGNING_KEY or COMPILE_CACHE_VERIFY_KEYS"
        if trust.signing_key is None:
            return "COMPILE_CACHE_REQUIRE_SIGNED is on but no COMPILE_CACHE_SIGNING_KEY is set"
        return "lease is unsigned and COMPILE_CACHE_SIGNING_KEY is set"


@dataclass(frozen=True)
class Seen:
    """One read of a lease: its token (None: no lease object, or one too large to read) and its body (None: absent,
    or not one this process trusts; ``problem`` says why). ``stuck``: an object too large to read, which no
    compare-and-swap can replace (its token is unknown), so the lease cannot work for this key."""

    token: str | None
    body: LeaseBody | None
    problem: str = ""
    stuck: bool = False

    @property
    def absent(self) -> bool:
        return self.token is None and not self.stuck


def read_lease(store: Store, key: str, trust: TrustPolicy) -> Seen:
    """Read ``key``'s lease and judge it. Raises StoreError only when the store cannot be read."""
    try:
        data, token = store.read_versioned(lease_name(key), max_bytes=MAX_LEASE_BYTES)
    except ObjectNotFound:
        return Seen(None, None, "no lease")
    except IntegrityError as e:  # ObjectTooLarge
        return Seen(None, None, str(e), stuck=True)
    try:
        body = LeaseBody.from_bytes(data)
    except IntegrityError as e:
        return Seen(token, None, str(e))
    if body.key != key:
        return Seen(token, None, f"lease was written for key {body.key!r}")
    if why := body.untrusted_because(trust):
        return Seen(token, None, why)
    return Seen(token, body)


@dataclass
class Lease:
    """The holder's side. Build, :meth:`renew` (or run the build inside :meth:`renewing`), publish the manifest,
    then :meth:`finish` with ``"done"``; on an error ``finish("failed", reason)``; to give it up unbuilt,
    ``finish("released")``.

    Right after acquiring, read the manifest again: another holder may have published it between this process's
    miss and its acquire. If it is there, restore it and ``finish("done")`` instead of building.

    A lost lease (someone took it over: this holder looked dead to them) is not an error for the build: keep
    building and publish (manifest writes merge by CAS). Renewals and :meth:`finish` then write nothing."""

    store: Store
    key: str
    trust: TrustPolicy
    body: LeaseBody
    token: str
    lost: bool = False  # someone took the lease over: nothing more is written to it
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def state(self) -> State:
        return self.body.state

    def _write(self, **changes: object) -> bool:
        """CAS the body with ``changes`` (and one more renewal) on the last token; False if the lease was lost."""
        with self._lock:
            for _ in range(2):
                if self.lost or self.body.state != "building":
                    return False
                body = self.body.model_copy(
                    update={**changes, "renewals": self.body.renewals + 1, "updated_at": time.time()}
                )
                try:
                    self.token = self.store.put_conditional(lease_name(self.key), body.to_bytes(self.trust), self.token)
                    self.body = body
                    return True
                except (PreconditionFailed, ObjectNotFound):
                    # An earlier write of ours may have landed with its reply lost (a put the client retried, or
                    # one that timed out): the lease then still names this holder, and we go on from it.
                    seen = read_lease(self.store, self.key, self.trust)
                    if seen.body is None or seen.token is None or seen.body.holder != self.body.holder:
                        break
                    self.token, self.body = seen.token, seen.body
                    if seen.body.model_copy(update={"signature": None}) == body:
                        return True  # this very write
            if self.body.state != "building":
                return False  # an earlier finish of ours landed
            self.lost = True
            log.info("build lease of %s was taken over by another replica: this build goes on unleased", self.key)
            return False

    def renew(self) -> bool:
        """Show followers this holder is alive (the object changes). False if the lease was lost or is finished.
        Raises StoreError when the store cannot be written (the next renewal tries again)."""
        return self._write()

    def finish(self, state: Literal["done", "failed", "released"], reason: str = "") -> bool:
        """End the lease with a compare-and-swap state write (never a delete). ``done`` only after the manifest is
        published. False if the lease was lost or already finished."""
        if state not in ("done", "failed", "released"):
            raise ValueError(f"a lease ends done, failed or released, not {state!r}")
        return self._write(state=state, reason=reason[:MAX_REASON_CHARS])

    @contextlib.contextmanager
    def renewing(self, every_s: float) -> Iterator[Lease]:
        """Renew every ``every_s`` seconds on a daemon thread while the block runs (a third of the followers' TTL
        leaves room for two failed renewals). Store errors are logged and retried at the next tick."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(every_s):
                try:
                    if not self.renew():
                        return
                except StoreError as e:
                    log.warning("could not renew the build lease of %s: %s", self.key, e)

        t = threading.Thread(target=loop, name="compile-cache-lease", daemon=True)
        t.start()
        try:
            yield self
        finally:
            stop.set()
            t.join()


@dataclass(frozen=True)
class Status:
    """What a follower concludes from its reads. ``live``: keep waiting; ``expired``: unchanged for the TTL, take it
    over; ``released``: nobody holds it (absent, given up, or untrusted), take it over; ``done``: the entry is
    published, restore it; ``failed``: the holder's build failed (``reason``), stop waiting."""

    seen_as: Observed
    reason: str = ""
    body: LeaseBody | None = None


@dataclass
class Follow:
    """The follower's side of a lease someone else holds. ``clock`` is the follower's monotonic clock (injectable
    for tests); the TTL runs from when this follower last saw the object change."""

    store: Store
    key: str
    trust: TrustPolicy
    ttl_s: float
    seen: Seen
    clock: Callable[[], float] = time.monotonic
    changed_at: float = field(default=-1.0)
    polls: int = 0  # reads of the lease made by poll()

    def __post_init__(self) -> None:
        if self.changed_at < 0:
            self.changed_at = self.clock()

    def status(self) -> Status:
        """The conclusion from the last read (no request)."""
        body = self.seen.body
        if self.seen.stuck:
            return Status("failed", self.seen.problem)
        if body is None:
            return Status("released", self.seen.problem)
        if body.state == "building":
            live = self.clock() - self.changed_at < self.ttl_s
            return Status("live" if live else "expired", "" if live else f"unchanged for {self.ttl_s:g} s", body)
        return Status(body.state, body.reason, body)

    def poll(self) -> Status:
        """Read the lease once and conclude. Raises StoreError when the store cannot be read."""
        self._saw(read_lease(self.store, self.key, self.trust))
        self.polls += 1
        return self.status()

    def _saw(self, seen: Seen) -> None:
        if seen.token != self.seen.token:
            self.changed_at = self.clock()
        self.seen = seen

    def watch(
        self,
        timeout_s: float | None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        delays: Iterator[float] | None = None,
    ) -> Status:
        """Poll on the back-off schedule (:func:`poll_delays`) until the lease is no longer live or ``timeout_s``
        (None: no limit) has passed on ``clock``; then the last status (``live`` on a timeout).

        A read that fails (StoreError) is logged and counts as "no change": a store this follower cannot reach
        lets the lease expire here, as a dead holder would."""
        deadline = None if timeout_s is None else self.clock() + timeout_s
        schedule = delays if delays is not None else poll_delays()
        st = self.status()
        while st.seen_as == "live":
            left = None if deadline is None else deadline - self.clock()
            if left is not None and left <= 0:
                return st
            wait = next(schedule) * (1 + random.uniform(0, _JITTER))
            sleep(wait if left is None else min(wait, left))
            try:
                st = self.poll()
            except StoreError as e:
                log.warning("could not read the build lease of %s: %s", self.key, e)
                st = self.status()
        return st

    def take_over(self, holder: str | None = None, parts: tuple[str, ...] = ()) -> Lease | None:
        """Take a lease that is not live by a compare-and-swap on the token last read (a create-only put if there
        was none). Of followers racing on the same token exactly one wins; the others get None and should
        :meth:`poll` again (they now follow the winner). The winner re-reads the manifest before building."""
        if self.status().seen_as == "live":
            raise ValueError(f"the build lease of {self.key} is live: it cannot be taken over")
        got = _claim(self.store, self.key, self.trust, holder or holder_id(), parts, self.seen.token)
        if isinstance(got, Lease):
            return got
        self._saw(got)
        return None


def _claim(
    store: Store, key: str, trust: TrustPolicy, holder: str, parts: tuple[str, ...], if_match: str | None
) -> Lease | Seen:
    """Write a new ``building`` lease over the version ``if_match`` (None: only if there is none). On a lost race,
    what is there now, read once."""
    body = LeaseBody(key=key, holder=holder, parts=tuple(parts))
    try:
        return Lease(store, key, trust, body, store.put_conditional(lease_name(key), body.to_bytes(trust), if_match))
    except (PreconditionFailed, ObjectNotFound):
        seen = read_lease(store, key, trust)
    if seen.body is not None and seen.token is not None and seen.body.holder == holder:
        return Lease(store, key, trust, seen.body, seen.token)  # our put landed, its reply was lost
    return seen


def acquire(
    store: Store,
    key: str,
    trust: TrustPolicy,
    *,
    ttl_s: float,
    holder: str | None = None,
    parts: tuple[str, ...] = (),
    clock: Callable[[], float] = time.monotonic,
) -> Lease | Follow:
    """Take ``key``'s build lease, or follow the live one.

    A create-only put first. If a lease is there: a ``building`` one is followed (whether it is stale only a
    follower's TTL can tell); a ``done``, ``failed`` or ``released`` one, or one this process does not trust, is
    taken over by a compare-and-swap on its token. A ``done`` lease with no manifest means the entry was deleted
    since; a ``failed`` one is an earlier build's, and a new boot tries once more rather than being blocked by it.

    After a :class:`Lease`, read the manifest again before building (see :class:`Lease`). Raises StoreError when
    the store cannot be read or written: the caller builds unleased, as with the lease turned off."""
    holder = holder or holder_id()
    if_match: str | None = None
    for _ in range(_ACQUIRE_TRIES):
        seen = _claim(store, key, trust, holder, parts, if_match)
        if isinstance(seen, Lease):
            return seen
        if seen.body is not None and seen.body.state == "building":
            return Follow(store, key, trust, ttl_s, seen, clock)
        if seen.stuck:
            raise StoreError(f"{store.url}/{lease_name(key)}: {seen.problem}: the build lease cannot be used")
        if seen.body is None and seen.token is not None:
            log.info("build lease of %s is not trusted here (%s): taking it over", key, seen.problem)
        if_match = seen.token
    # Every try lost a race (or the object cannot be replaced): follow whatever is there now.
    return Follow(store, key, trust, ttl_s, read_lease(store, key, trust), clock)


def poll_delays(first_s: float = POLL_FIRST_S, cap_s: float = POLL_CAP_S) -> Iterator[float]:
    """Seconds between a follower's reads: ``first_s`` doubling up to ``cap_s``, then ``cap_s`` for ever (with the
    defaults at most :data:`MAX_POLLS_PER_MINUTE` reads in any minute, 6 a minute at the cap)."""
    delay = first_s
    while True:
        yield delay
        delay = min(delay * 2, cap_s)


def describe(store: Store, key: str, trust: TrustPolicy, *, now: float | None = None) -> dict[str, object] | None:
    """``key``'s lease for ``inspect``: state, holder, renewals, reason, parts, and how long ago its writer's clock
    last wrote it (display only). None when there is no lease object."""
    seen = read_lease(store, key, trust)
    if seen.absent:
        return None
    if seen.body is None:
        return {"state": "untrusted", "reason": seen.problem, "trusted": False}
    b = seen.body
    now = time.time() if now is None else now
    return {
        "state": b.state,
        "holder": b.holder,
        "renewals": b.renewals,
        "reason": b.reason,
        "parts": list(b.parts),
        "started_at": b.started_at,
        "updated_at": b.updated_at,
        "age_s": round(max(0.0, now - b.updated_at), 1),
        "signed": b.signature is not None,
        "trusted": True,
    }


def summary(d: dict[str, object] | None) -> str:
    """One line for ``inspect`` from :func:`describe`'s result."""
    if d is None:
        return "-"
    if not d["trusted"]:
        return f"untrusted, no replica waits for it ({d['reason']})"
    parts = f" of {', '.join(d['parts'])}" if d["parts"] else ""  # type: ignore[arg-type]
    line = f"{d['state']}{parts} by {d['holder']}, {d['renewals']} renewals, written {d['age_s']} s ago (its clock)"
    return f"{line}: {d['reason']}" if d["reason"] else line


def stale_leases(store: Store, older_than_s: float, *, now: float | None = None) -> list[ObjectInfo]:
    """Lease objects the store last modified more than ``older_than_s`` ago, for ``prune`` to delete. A holder
    rewrites its lease every few seconds, so with an age far above the TTL (hours) only finished or abandoned
    leases qualify; prune's own clock against the store's is good enough at that scale."""
    cutoff = (time.time() if now is None else now) - older_than_s
    return [o for o in store.list(_ENTRIES) if is_lease_name(o.name) and o.modified < cutoff]
