"""The boot's side of the build lease under the ``wait`` policy: on a miss, one replica of a fleet builds the key
while the others wait for its entry (the lease itself, its states and its expiry: lease.py and docs/fleet.md).

:func:`coordinate` runs after a restore that missed (or seeded) and decides what this boot does:

- it **holds** the lease: it reads the entry again (another holder may have published it since the miss; then the
  boot restores it, a hit, and ends the lease ``done``), otherwise it builds inside :meth:`Coordination.building`
  (renewals in the background) and ends the lease with :meth:`Coordination.published` or :meth:`Coordination.failed`;
- it **follows** a live lease: its setup waits, polling the lease, until the holder's entry is published (then it
  restores it: a hit), the holder's build failed or the wait ran out (then it builds itself, once, unleased), or the
  holder looks dead (then it takes the lease over and holds it);
- **none**: the lease cannot be used (a store error): it builds as with ``COMPILE_CACHE_BUILD_LEASE=0``.

No lease write can fail or hang a boot: store errors are logged, and the exit's write is bounded by the flush
budget. Torch-free and boto3-free.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, TypeVar

from . import log as logmod
from .errors import StoreError
from .lease import Follow, Lease, acquire
from .stores.base import Store
from .trust import TrustPolicy

__all__ = ["Coordination", "begin", "coordinate"]

log = logmod.log

Role = Literal["held", "followed", "none"]

# Takeovers one boot tries: each lost one means another replica took the lease and is now followed, so a few settle
# any race; past them the boot stops waiting (it never loops on the lease).
_TAKEOVERS = 4


class _Restored(Protocol):
    status: str
    seconds: float


R = TypeVar("R", bound=_Restored)


@dataclass
class Coordination:
    """What the lease step decided for this boot, and the holder's handle on the lease (``lease``, None unless this
    boot builds under it). ``restored``: the entry restored in place of the miss (a hit), if any."""

    role: Role = "none"
    holder: str = ""  # the lease's holder: this process when it holds it, the one it followed otherwise
    note: str = ""  # what happened, for the cache line of the timeline
    waited_s: float = 0.0
    polls: int = 0
    lease: Lease | None = None
    renew_every_s: float = 20.0
    restored: Any = None
    # Why a follower stopped following: "done" (restored), "failed" (the holder's build failed), "waited" (the wait
    # ran out), "lost" (takeovers lost, or a takeover's store error), "undone" (done, but the entry did not
    # restore), "unavailable" (no lease: a store error); "" while it holds the lease or has not settled.
    stopped: str = ""
    reason: str = ""  # stopped "failed": the holder's reason
    _got: Any = None  # begin()'s Lease or Follow, until settle()
    _renewals: contextlib.ExitStack | None = None  # the background renewals, from the build until the lease ends
    _ending: threading.Lock = field(default_factory=threading.Lock, repr=False)  # the upload's and the exit's ends

    def outcome(self, first: R) -> R:
        """The restore this boot goes on from: the entry restored in place of ``first`` (its seconds include
        ``first``'s), or ``first``."""
        if self.restored is None:
            return first
        return replace(self.restored, seconds=self.restored.seconds + first.seconds)  # type: ignore[type-var]

    def settle(self, wait_s: float, restore_entry: Callable[[], R],
               clock: Callable[[], float] = time.monotonic) -> None:
        """Follow a live lease up to ``wait_s`` (taking it over where its holder looks dead), or, holding it, read
        the entry again: see the module docstring. Afterwards ``restored`` is set (the entry restored: a hit), or
        ``lease`` (this boot builds under it), or neither (it builds unleased: ``stopped`` says why)."""
        got, self._got = self._got, None
        t0 = clock()
        takeovers = 0
        while isinstance(got, Follow):
            self.role = "followed"
            self.holder = got.seen.body.holder if got.seen.body is not None else self.holder
            log.info("cache miss: following the build of %s (waiting up to %g s)", self.holder, wait_s)
            before = got.polls
            st = got.watch(max(0.0, t0 + wait_s - clock()))
            self.polls += got.polls - before
            self.holder = st.body.holder if st.body is not None else self.holder
            if st.seen_as == "done":
                r = restore_entry()
                if r.status == "hit":
                    self.restored, self.note, self.stopped = r, f"followed the build of {self.holder}", "done"
                else:
                    self.note = (f"the build of {self.holder} is done but its entry did not restore ({r.status}); "
                                 "building")
                    self.stopped = "undone"
                got = None
            elif st.seen_as == "failed":
                self.note = f"the build of {self.holder} failed ({st.reason}); building here, once"
                self.stopped, self.reason = "failed", st.reason
                got = None
            elif st.seen_as == "live":
                self.note = f"waited {wait_s:g} s (COMPILE_CACHE_LEASE_WAIT_S) for the build of {self.holder}; building"
                self.stopped = "waited"
                got = None
            elif takeovers >= _TAKEOVERS:
                self.note = f"lease of {self.holder} {st.seen_as}, takeovers lost {takeovers} times; building"
                self.stopped = "lost"
                got = None
            else:  # expired or released: take it over
                takeovers += 1
                try:
                    taken = got.take_over()
                except StoreError as e:
                    self.note, self.stopped = f"lease takeover failed ({e}); building", "lost"
                    got = None
                else:
                    if taken is not None:
                        log.info("build lease of %s %s (%s): taken over", taken.key, st.seen_as,
                                 st.reason or self.holder)
                        self.note = f"took over the {st.seen_as} build of {self.holder}"
                        got = taken
                    else:  # another follower won: follow it
                        with contextlib.suppress(StoreError):
                            got.poll()
                            self.polls += 1
            if self.note and got is None:
                log.info("cache: %s", self.note)
        self.waited_s = clock() - t0
        if isinstance(got, Lease):
            self.role, self.holder = "held", got.body.holder
            r = restore_entry()  # the entry may have been published between the miss and the acquire
            if r.status == "hit":
                self.restored, self.stopped = r, "done"
                self.note = "; ".join(x for x in (self.note, "published meanwhile, restored; lease done") if x)
                self.lease = got
                self._finish("done")
                self.lease = None
            else:
                self.note = "; ".join(x for x in (self.note, "building; lease held") if x)
                self.lease = got

    def record(self, m: Any) -> None:
        """Into the boot metrics: ``lease``, ``lease_holder``, ``lease_wait_s``, ``lease_polls``, and the note on
        the cache line."""
        m.lease, m.lease_holder, m.lease_wait_s, m.lease_polls = self.role, self.holder, self.waited_s, self.polls
        if self.note:
            m.cache_reason = f"{m.cache_reason}; {self.note}" if m.cache_reason else self.note

    # -- the holder ------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def building(self, exit_budget_s: float) -> Iterator[None]:
        """The build (the compile step) under the lease. Renewals start here and go on in the background until the
        lease ends (the upload after the build takes time too); a build that raises ends it ``failed``; a SIGTERM
        that would kill the process meanwhile first ends it ``released`` (within ``exit_budget_s``), so followers
        take over at once instead of after the TTL."""
        if self.lease is None:
            yield
            return
        self._renewals = contextlib.ExitStack()
        self._renewals.enter_context(self.lease.renewing(self.renew_every_s))
        with self._released_on_sigterm(exit_budget_s):
            try:
                yield
            except BaseException as e:
                self.failed(f"{type(e).__name__}: {e}")
                raise

    def published(self, error: str, complete: bool) -> None:
        """After an upload: the entry is published (``done``), or the upload failed (``failed``). An upload a
        deadline cut short ends nothing (the exit flush releases the lease)."""
        if error:
            self.failed(f"upload failed: {error}")
        elif complete:
            self._finish("done")

    def failed(self, reason: str) -> None:
        """The build produced nothing to publish: followers stop waiting and build themselves, once."""
        self._finish("failed", reason)

    def release(self, deadline: float) -> None:
        """At exit: a lease still ``building`` ends ``released``, within ``deadline`` (``time.monotonic()``); the
        write goes on a daemon thread, so a slow store cannot hold the exit."""
        if self.lease is None or self.lease.state != "building":
            return
        t = threading.Thread(target=self._finish, args=("released", "the holder stopped before publishing"),
                             name="compile-cache-lease-release", daemon=True)
        t.start()
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            log.warning("build lease of %s: release not written within the flush budget (it expires)", self._key)

    @property
    def _key(self) -> str:
        return self.lease.key if self.lease is not None else ""

    def _finish(self, state: Literal["done", "failed", "released"], reason: str = "") -> None:
        if self.lease is None:
            return
        try:
            if self.lease.finish(state, reason):
                log.info("build lease of %s: %s%s", self._key, state, f" ({reason})" if reason else "")
        except StoreError as e:  # followers then see it expire and take over
            log.warning("build lease of %s: could not mark it %s: %s", self._key, state, e)
        finally:
            with self._ending:
                renewals, self._renewals = self._renewals, None
            if renewals is not None:
                renewals.close()

    @contextlib.contextmanager
    def _released_on_sigterm(self, budget_s: float) -> Iterator[None]:
        """While the build runs: where SIGTERM would kill the process, release the lease first, then die as before.
        Elsewhere (a worker thread, a handler someone installed, an ignored signal) nothing changes."""
        if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
            yield
            return

        def on_term(signum: int, frame: Any) -> None:
            self.release(time.monotonic() + budget_s)
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

        signal.signal(signal.SIGTERM, on_term)
        try:
            yield
        finally:
            if signal.getsignal(signal.SIGTERM) is on_term:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)


def coordinate(
    store: Store,
    key: str,
    trust: TrustPolicy,
    *,
    ttl_s: float,
    wait_s: float,
    restore_entry: Callable[[], R],
    clock: Callable[[], float] = time.monotonic,
) -> Coordination:
    """After a miss: take ``key``'s build lease or follow it (see the module docstring). ``restore_entry`` restores
    the key's entry by the ordinary restore path and returns its result (status ``"hit"`` when it restored one)."""
    c = begin(store, key, trust, ttl_s=ttl_s, clock=clock)
    c.settle(wait_s, restore_entry, clock=clock)
    return c


def begin(store: Store, key: str, trust: TrustPolicy, *, ttl_s: float,
          clock: Callable[[], float] = time.monotonic) -> Coordination:
    """The first step of :func:`coordinate`, one store call: take the lease (role ``held``, not yet settled: the
    entry is read again in :meth:`Coordination.settle`) or find a live one (``followed``), or ``none`` on a store
    error. The ``serve`` policy takes it in setup, to say what it does, and settles it in the background."""
    c = Coordination(renew_every_s=ttl_s / 3)
    try:
        got: Lease | Follow | None = acquire(store, key, trust, ttl_s=ttl_s, clock=clock)
    except StoreError as e:
        log.warning("build lease of %s cannot be used (%s): building here, unleased", key, e)
        c.note, c.stopped = "lease unavailable; building", "unavailable"
        return c
    c._got = got
    if isinstance(got, Follow):
        c.role = "followed"
        c.holder = got.seen.body.holder if got.seen.body is not None else c.holder
    elif isinstance(got, Lease):
        c.role, c.holder = "held", got.body.holder
    return c
