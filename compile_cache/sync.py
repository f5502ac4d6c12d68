"""Moving cache entries between a store and the local cache dirs: restore at boot, delta uploads afterwards.

Store-agnostic and torch-free. The protocol (see the module docs of stores.base and manifest):

- restore: read the manifest (size-capped), check it (key, fingerprint, signature: trust.TrustPolicy), stream
  every segment through its sha256 check and the decompressor into staging (one pass, several segments at a time),
  then move into place. Any failure leaves the cache dir as it was and returns a status the lifecycle turns into a
  cold boot.
- upload: scan the dirs, subtract what the manifest already lists, pack the rest into segments, put each segment
  (immutable, content-addressed), then compare-and-swap the manifest to include it. Concurrent writers merge.
  Compaction, healing (damaged segments left out), key rotation and version labels write the manifest through
  the same compare-and-swap (Uploader._swap).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import (
    CacheError,
    EntryRejected,
    IntegrityError,
    ObjectNotFound,
    ObjectTooLarge,
    PreconditionFailed,
    StoreError,
)
from .key import diff_factors, fingerprint_of, split_key
from .manifest import MAX_MANIFEST_BYTES, Manifest, Segment, manifest_name
from .snapshot import Staged, check_object, pack, scan, sha256_file, unpack_into_staging
from .stores.base import Store
from .trust import Signer, TrustPolicy

if TYPE_CHECKING:
    from .config import Settings

__all__ = ["RestoreOptions", "RestoreResult", "UploadResult", "restore", "restore_or_seed", "Uploader", "read_manifest"]

log = logging.getLogger("compile_cache")

# New files go into segments of about SEGMENT_TARGET_BYTES in the store (compressed) and at most
# SEGMENT_MAX_UNPACKED_BYTES of files (or one larger file): an entry that compresses well still takes few requests,
# and a large one still several segments to restore at a time. Cut at 8 MB of files instead, the 419 MB entry of
# `scripts/bench_restore.py --compressible --mb 400` (.so files that compress like CPU kernels, about 24x) took 51
# objects of 265 KB and restored in 340-410 ms; in 7 objects, 220-240 ms (one-off, interleaved runs on 2 cores).
SEGMENT_TARGET_BYTES = 8 * 2**20
SEGMENT_MAX_UNPACKED_BYTES = 64 * 2**20
MAX_SEGMENTS = 64  # a writer that sees more compacts the manifest (see Uploader.compact)
_CAS_ATTEMPTS = 20  # tries of one manifest write against other writers (Uploader._swap)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# Segments restored at a time, each streamed, hashed, decompressed and written by its own thread. Against a server
# on the same 2 cores (scripts/bench_restore.py) 2, 4 and 8 at a time were within noise of each other: the CPU is
# the limit there. Against a remote store each stream is limited by its connection, so four at least; one per core
# up to eight (the S3 connection pool) beyond that.
_PARALLEL_SEGMENTS = max(4, min(8, _cpus()))
_STREAMED_SEGMENT = 64 * 2**20  # larger objects go to a temp file first (parallel ranged GETs)


@dataclass
class RestoreResult:
    status: str  # "hit" | "miss" | "error" | "rejected"
    reason: str = ""
    files: int = 0
    bytes_downloaded: int = 0
    seconds: float = 0.0
    manifest: Manifest | None = None
    token: str | None = None
    # Segments whose object is missing or failed verification (size, sha256, archive checks): the next upload of
    # this process leaves them out of the manifest (Uploader.drop), so a damaged object does not keep every
    # replica cold until someone prunes it.
    bad_segments: frozenset[str] = frozenset()
    signer: Signer | None = None  # who signed the manifest, as trust.TrustPolicy saw it (None: not read)
    # status "seeded": no entry for the key; the entry ``seeded_from`` (same lineage, same environment) was restored
    # instead, and ``manifest`` is the seed's. ``usage_tracked``: its files were marked unread (see mark_unread).
    seeded_from: str = ""
    usage_tracked: bool = False

    @property
    def throughput_mb_s(self) -> float:
        return self.bytes_downloaded / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def uploader_state(self) -> dict[str, object]:
        """What an Uploader of the same key starts from after this restore (its keyword arguments)."""
        if self.status == "seeded":
            assert self.manifest is not None
            return {"known": set(), "manifest": None, "token": None, "seed": self.manifest,
                    "seed_usage_tracked": self.usage_tracked}
        return {"known": set(self.manifest.files()) if self.manifest else set(), "manifest": self.manifest,
                "token": self.token, "drop": set(self.bad_segments)}


@dataclass
class UploadResult:
    bytes_uploaded: int = 0
    files: int = 0
    segments: int = 0
    seconds: float = 0.0
    complete: bool = True  # False when a deadline stopped it before everything new was published
    error: str = ""


def read_manifest(
    store: Store, key: str, max_bytes: int = MAX_MANIFEST_BYTES
) -> tuple[Manifest | None, str | None]:
    """(manifest, version token) or (None, None) when the key has no entry. Malformed → IntegrityError; larger
    than ``max_bytes`` → ObjectTooLarge (an IntegrityError), with nothing of it read."""
    try:
        data, token = store.read_versioned(manifest_name(key), max_bytes=max_bytes)
    except ObjectNotFound:
        return None, None
    return Manifest.from_bytes(data), token


class _Cancelled(Exception):
    pass


@dataclass(frozen=True)
class RestoreOptions:
    """How long a restore may take and how much it may load. The defaults are the settings' defaults; a boot builds
    them from its settings (:meth:`from_settings`). Which manifests may load at all is the trust policy's call."""

    timeout_s: float = 60.0  # COMPILE_CACHE_RESTORE_TIMEOUT_S
    max_bytes: int = 8 * 2**30  # COMPILE_CACHE_MAX_RESTORE_BYTES: unpacked bytes
    max_files: int = 200_000  # COMPILE_CACHE_MAX_RESTORE_FILES
    max_manifest_bytes: int = MAX_MANIFEST_BYTES

    @classmethod
    def from_settings(cls, settings: Settings) -> RestoreOptions:
        return cls(settings.restore_timeout_s, settings.max_restore_bytes, settings.max_restore_files)


_DEFAULT_OPTIONS = RestoreOptions()  # (frozen: one instance serves every call)


def restore(
    store: Store,
    key: str,
    roots: Mapping[str, Path],
    *,
    factors: Mapping[str, str],
    trust: TrustPolicy | None = None,
    options: RestoreOptions = _DEFAULT_OPTIONS,
) -> RestoreResult:
    """Restore the entry ``key`` into ``roots``. Never raises for a cache problem: the status says what happened.

    ``trust`` decides which manifests may be loaded (default: a policy with no key, which loads unsigned entries).
    Runs on a helper thread so the deadline holds even if the store hangs; past it, the helper is told to stop and
    must not move anything into place (the cache dir stays as it was).
    """
    run = _Run(store, key, roots, factors, trust or TrustPolicy(), options)
    t0 = time.monotonic()

    def work() -> None:
        try:
            run.result = run.restore()
        except _Cancelled:
            pass
        except (EntryRejected, IntegrityError) as e:
            run.result = RestoreResult("rejected", str(e))
        except (StoreError, OSError) as e:
            run.result = RestoreResult("error", f"{type(e).__name__}: {e}")
        except Exception as e:  # a cache problem must never fail a boot
            log.exception("unexpected error during restore")
            run.result = RestoreResult("error", f"{type(e).__name__}: {e}")

    th = threading.Thread(target=work, name="compile-cache-restore", daemon=True)
    th.start()
    th.join(options.timeout_s)
    timed_out = th.is_alive()
    if timed_out:
        # Under the lock: a helper that is moving files into place finishes first (and its result stands); one
        # that is not yet there sees the cancel before it starts, so a late restore never races the compile.
        with run.commit_lock:
            run.cancel.set()
    r = run.result
    if r is None:
        why = (
            f"restore exceeded COMPILE_CACHE_RESTORE_TIMEOUT_S={options.timeout_s:g}s" if timed_out
            else "restore stopped"
        )
        r = RestoreResult("error", why)
    r.seconds = time.monotonic() - t0
    if r.status != "hit":
        r.bad_segments = frozenset(run.bad)
    return r


@dataclass
class _Run:
    """One restore, on its helper thread: what it restores, and what it shares with the caller's thread."""

    store: Store
    key: str
    roots: Mapping[str, Path]
    factors: Mapping[str, str]
    trust: TrustPolicy
    options: RestoreOptions
    cancel: threading.Event = field(default_factory=threading.Event)  # set past the deadline
    commit_lock: threading.Lock = field(default_factory=threading.Lock)  # held while moving files into place
    bad: set[str] = field(default_factory=set)  # segments found missing or damaged
    result: RestoreResult | None = None

    def restore(self) -> RestoreResult:
        key, opts = self.key, self.options
        try:
            manifest, token = read_manifest(self.store, key, opts.max_manifest_bytes)
        except ObjectTooLarge as e:
            raise EntryRejected(f"manifest too large: {e}") from e
        if manifest is None:
            return RestoreResult("miss", "no entry for this key")
        manifest.check(key=key, factors=self.factors)
        verdict = self.trust.check(manifest)
        if verdict.signer == "previous":
            log.info("the entry %s %s", key, verdict.reason)
        elif verdict.signer == "unsigned" and self.trust.signing_key is not None:
            log.warning("loading the UNSIGNED entry %s: COMPILE_CACHE_ALLOW_UNSIGNED is on", key)
        _check_caps(manifest, opts)
        downloaded = 0
        stageds: list[tuple[int, Staged]] = []
        large = any(seg.size > _STREAMED_SEGMENT for seg in manifest.segments)  # only those need a temp file
        with tempfile.TemporaryDirectory(prefix="compile-cache-dl-") if large else contextlib.nullcontext("") as tmp:
            try:
                for nbytes in self._fetch_and_stage(manifest.segments, Path(tmp), stageds):
                    downloaded += nbytes
                with self.commit_lock:
                    if self.cancel.is_set():
                        raise _Cancelled
                    # In manifest order: where two segments carry the same file, the first one's copy is kept.
                    moved = sum(st.commit() for _, st in sorted(stageds, key=lambda x: x[0]))
            except BaseException:
                for _, st in stageds:
                    st.discard()
                raise
        log.debug("restored %d files (%d already present)", moved, len(manifest.files()) - moved)
        return RestoreResult("hit", "", len(manifest.files()), downloaded, 0.0, manifest, token, signer=verdict.signer)

    def _fetch_and_stage(self, segments: list[Segment], tmp: Path, out: list[tuple[int, Staged]]) -> Iterator[int]:
        """Download, verify (the object's size and sha256, which vouch for every member) and unpack (into staging,
        member names, types and sizes checked against the manifest) every segment, in one pass per segment and
        several segments at a time: downloads overlap with hashing, decompression and writes, which release the
        GIL. Yields the bytes downloaded per segment. Each staged segment is appended to ``out`` (with its index)
        as soon as it exists, so the caller can discard it whatever happens next."""
        from concurrent.futures import ThreadPoolExecutor, as_completed

        if len(segments) <= 1:
            for i, seg in enumerate(segments):
                staged, n = self._one(i, seg, tmp)
                out.append((i, staged))
                yield n
            return
        with ThreadPoolExecutor(max_workers=min(_PARALLEL_SEGMENTS, len(segments)), thread_name_prefix="cc-dl") as ex:
            futures = {ex.submit(self._one, i, seg, tmp): i for i, seg in enumerate(segments)}
            error: BaseException | None = None
            for fut in as_completed(futures):
                try:
                    staged, n = fut.result()
                except BaseException as e:  # keep collecting: every staged result must reach `out` to be discarded
                    if error is None:
                        error = e
                        if isinstance(e, _Cancelled):
                            self.cancel.set()
                        for f in futures:
                            f.cancel()
                    continue
                out.append((futures[fut], staged))
                if error is None:
                    yield n
            if error is not None:
                raise error

    def _one(self, index: int, seg: Segment, tmp: Path) -> tuple[Staged, int]:
        """One segment into staging: (its staged files, bytes downloaded). A segment whose object is wrong or gone
        (not the network, not us) is noted in ``bad``."""
        if self.cancel.is_set():
            raise _Cancelled
        check = {
            "max_bytes": self.options.max_bytes, "max_files": self.options.max_files, "sha256": seg.sha256,
            "size": seg.size,
        }
        try:
            if seg.size <= _STREAMED_SEGMENT:
                # The usual case: one GET streamed through sha256 and the decompressor straight into staging files;
                # no copy of the object in memory or in a temp file. Nothing is committed unless it verified.
                with self.store.open_read(seg.object) as body:
                    return unpack_into_staging(body, seg.files, self.roots, **check), seg.size
            part = tmp / f"{index}-{seg.sha256}"  # large: parallel ranged GETs into a file, then one verified pass
            n = self.store.download(seg.object, part)
            try:
                return unpack_into_staging(part, seg.files, self.roots, **check), n
            finally:
                part.unlink()
        except (IntegrityError, ObjectNotFound):
            self.bad.add(seg.sha256)
            raise


def _check_caps(manifest: Manifest, opts: RestoreOptions) -> None:
    """Refuse an entry larger than the caps before downloading anything. The caps are on unpacked bytes: what the
    manifest declares unpacked (not the compressed objects' size, which a bomb keeps small). Unpacking enforces
    them again per member."""
    files = manifest.files()
    if sum(f.size for f in files.values()) > opts.max_bytes or len(files) > opts.max_files:
        raise EntryRejected(f"entry is larger than the caps ({opts.max_bytes} bytes / {opts.max_files} files)")
    # Every segment is unpacked, duplicates included (each into its own staging dir, so the per-member caps only
    # see one segment): bound the sums too, not only the de-duplicated view.
    if sum(seg.unpacked_bytes for seg in manifest.segments) > opts.max_bytes:
        raise EntryRejected(f"entry's segments unpack to more than the cap ({opts.max_bytes} bytes)")
    if sum(len(seg.files) for seg in manifest.segments) > opts.max_files:
        raise EntryRejected(f"entry's segments unpack to more than the cap ({opts.max_files} files)")


def _writer_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class Uploader:
    """Publishes what is new in ``roots`` to the entry ``key``. One per process; uploads are serialised.

    ``known`` is what the store is believed to hold already (from the restore or the last upload): if the local
    dirs hold nothing beyond it, an upload costs no request at all. ``trust`` (default: a policy with only
    ``signing_key``) says which manifests it may merge into, hence sign: only those a restore would load, never
    an unsigned one (replaced instead) nor one signed with a key it does not hold (left alone).
    """

    store: Store
    key: str
    roots: Mapping[str, Path]
    model_version: str
    factors: Mapping[str, str]
    signing_key: bytes | None = None
    trust: TrustPolicy | None = None
    known: set[str] = field(default_factory=set)
    manifest: Manifest | None = None
    token: str | None = None
    total: UploadResult = field(default_factory=UploadResult)
    deadline: float | None = None  # time.monotonic() value; set by the exit flush to bound every upload
    lock: threading.Lock = field(default_factory=threading.Lock)
    on_progress: Callable[[UploadResult], None] | None = None
    drop: set[str] = field(default_factory=set)  # damaged segments to leave out (RestoreResult.bad_segments)
    # Versions (docs/versions.md): the entry's lineage and model factors, written into a manifest this creates; the
    # seed's manifest when the restore seeded (the new manifest references the seed's segments this process read).
    lineage: str = ""
    model_factors: Mapping[str, str] = field(default_factory=dict)
    seed: Manifest | None = None
    seed_usage_tracked: bool = False
    _dropping: bool = False  # the manifest in hand left some out and is not written yet
    _scrubbed: bool = False  # the other segments' objects were checked once (see _scrub)
    # Files restored from an entry nothing verified (unsigned, loaded under COMPILE_CACHE_ALLOW_UNSIGNED): this
    # process never publishes them under its signature, nor references such a seed's segments.
    unverified: set[str] = field(default_factory=set)
    _seed_kept: list[Segment] | None = None

    def __post_init__(self) -> None:
        if self.trust is None:
            self.trust = TrustPolicy(signing_key=self.signing_key)
        self.signing_key = self.trust.signing_key
        for m in (self.manifest, self.seed):
            if m is not None and self.signing_key is not None and m.signature is None:
                self.unverified |= set(m.files())

    def pending(self) -> dict[str, Path]:
        seeded = self.seed.files() if self.seed is not None else {}
        skip = self.known | self.unverified
        return {n: p for n, p in scan(self.roots).items() if n not in skip and n not in seeded}
    # -- versions --------------------------------------------------------------------------------------------------
    def _seed_segments(self) -> list[Segment]:
        """The seed's segments the new entry references: those holding a file this process read since the restore
        (all of them where reads cannot be seen). Decided once, at the first upload (after warm-up): an entry
        holds what its version used, so entries do not grow from version to version with files none reads."""
        if self.seed is None or (self.signing_key is not None and self.seed.signature is None):
            return []  # an unsigned seed (COMPILE_CACHE_ALLOW_UNSIGNED) is never published under our signature
        if self._seed_kept is None:
            segs = self.seed.segments
            if self.seed_usage_tracked:
                segs = [s for s in segs if any(_was_read(self.roots, f.path) for f in s.files)]
            self._seed_kept = list(segs)
            log.info(
                "the new entry references %d of the %d segment(s) of its seed %s%s", len(segs),
                len(self.seed.segments), self.seed.key,
                "" if self.seed_usage_tracked else " (reads cannot be seen on this filesystem: all of them)",
            )
        return self._seed_kept

    def _new_manifest(self) -> Manifest:
        """The manifest this process writes where the key has none: the seed's kept segments, nothing else yet."""
        return Manifest(
            key=self.key,
            model_version=self.model_version,
            fingerprint=fingerprint_of(self.factors),
            factors=dict(self.factors),
            lineage=self.lineage,
            model_factors=dict(self.model_factors),
            segments=self._seed_segments(),
            seeded_from=self.seed.key if self.seed is not None else "",
        )

    def _labelled(self, m: Manifest) -> Manifest:
        return m if self.model_version in m.labels() else m.with_label(self.model_version)

    def _meta_due(self) -> bool:
        """Whether the manifest must be written with no new file: a seeded entry not published yet, or an entry
        that does not list this version's label. Decided from what is in hand: a warm boot of a known version asks
        the store nothing."""
        if self.manifest is None:
            return self.seed is not None
        return self.model_version not in self.manifest.labels()

    def upload(self, deadline: float | None = None, lock_timeout: float = -1) -> UploadResult | None:
        """Upload what is new. Raises nothing for store trouble: the result's ``error`` says it.

        Returns None when another upload held the lock for longer than ``lock_timeout`` seconds."""
        if not self.lock.acquire(timeout=lock_timeout):
            return None
        try:
            r = UploadResult()
            t0 = time.monotonic()
            try:
                self._upload(r, deadline)
            except (CacheError, OSError) as e:
                r.error, r.complete = f"{type(e).__name__}: {e}", False
            r.seconds = time.monotonic() - t0
            self.total.seconds += r.seconds
            self.total.complete = r.complete
            self.total.error = r.error or self.total.error
            return r
        finally:
            self.lock.release()

    def _upload(self, r: UploadResult, deadline: float | None) -> None:
        """The steps of one upload; each job below is one method."""
        new = self._refresh() if self.pending() or self._meta_due() else {}
        if new:
            if not self._upload_files(new, r, deadline):
                return  # the deadline cut it short: the rest waits for a later upload
            if deadline is None and self.deadline is None:
                self._compact_if_due()
        else:
            self._swap(self._without_new_files, "publish")  # damaged segments left out, a label, a seed's entry
        self._resign()  # an entry an earlier key verified is re-signed with the current one

    def _out_of_time(self, deadline: float | None) -> bool:
        limits = [d for d in (deadline, self.deadline) if d is not None]
        return bool(limits) and time.monotonic() >= min(limits)

    def _refresh(self) -> dict[str, Path]:
        """Re-read the store's manifest (another replica may have published these files already) and return what
        it still lacks. Only what the current, trusted manifest lists is known: a missing or replaced entry vouches
        for nothing."""
        self.manifest, self.token = self._read_or_reset()
        self.known = set((self.manifest or self._new_manifest()).files())
        return self.pending()

    # -- the one compare-and-swap of the manifest, which every job below writes through ------------------------------
    def _swap(self, build: Callable[[Manifest | None], Manifest | None], what: str) -> bool:
        """Write ``build(manifest in hand)`` over the store's manifest if it is still the version in hand (the
        token); on a lost race re-read it (:meth:`_read_or_reset`) and build again, up to _CAS_ATTEMPTS times.
        ``build`` returns None when there is nothing (left) to write: then False. Afterwards the manifest in hand
        is the one written, signed as in the store."""
        for _ in range(_CAS_ATTEMPTS):
            m = build(self.manifest)
            if m is None:
                return False
            data = m.to_bytes(self.signing_key)
            try:
                self.token = self.store.put_conditional(manifest_name(self.key), data, self.token)
            except PreconditionFailed:  # someone wrote first: judge and merge into theirs
                self.manifest, self.token = self._read_or_reset()
                continue
            self.manifest = Manifest.from_bytes(data)
            self._dropping = False
            return True
        raise StoreError(f"could not {what} the manifest of {self.key} after {_CAS_ATTEMPTS} attempts")

    # -- delta upload ------------------------------------------------------------------------------------------------
    def _upload_files(self, new: Mapping[str, Path], r: UploadResult, deadline: float | None) -> bool:
        """Put ``new`` as segments, publishing each as it lands; False if the deadline stopped it first."""
        for seg, nbytes in self._put_segments(new, stop=lambda: self._out_of_time(deadline)):
            if seg is None:
                r.complete = False
                log.warning("upload stopped by its deadline; %d file(s) left for a later upload", len(new) - r.files)
                return False
            r.bytes_uploaded += nbytes
            self.total.bytes_uploaded += nbytes
            self._swap(partial(self._with_segment, seg=seg), "publish")
            r.files += len(seg.files)
            r.segments += 1
            # Counted per segment, not when upload() returns: an exit flush that gives up waiting for a slow
            # upload still reports what that upload has published.
            self.total.files += len(seg.files)
            self.total.segments += 1
            self.known |= {f.path for f in seg.files}
            if self.on_progress:
                self.on_progress(r)
        return True

    def _with_segment(self, cur: Manifest | None, seg: Segment) -> Manifest | None:
        """``cur`` (or this key's first manifest) with ``seg`` added and this version's label; if another writer
        published all these files already, only what else is due (:meth:`_without_new_files`)."""
        base = self._labelled(cur or self._new_manifest())
        if base.fingerprint != fingerprint_of(self.factors):
            raise EntryRejected(f"the store's entry {self.key} has a foreign fingerprint: not merging into it")
        merged = base.with_segment(seg)
        if merged.segments == base.segments and cur is not None and not self._meta_due():
            return self._without_new_files(cur)
        return merged

    def _without_new_files(self, cur: Manifest | None) -> Manifest | None:
        """The manifest to write when no new segment carries it: the one in hand with damaged segments left out, a
        seeded entry's first manifest, or this version's label added; None when none of these is due."""
        if not (self._dropping or self._meta_due()):
            return None
        return self._labelled(cur or self._new_manifest())

    def _put_segments(
        self, files: Mapping[str, Path], stop: Callable[[], bool] = lambda: False
    ) -> Iterator[tuple[Segment | None, int]]:
        """Pack and put ``files`` as segments, kernels first (see _batches): (segment, bytes sent) each. ``stop`` is
        asked before each one is packed; if it says so, (None, 0) ends the sequence."""
        for batch in _batches(files):
            while batch:
                if stop():
                    yield None, 0
                    return
                seg, nbytes, batch = self._put_segment(batch)
                if seg is None:
                    break
                yield seg, nbytes

    def _put_segment(self, files: Mapping[str, Path]) -> tuple[Segment | None, int, dict[str, Path]]:
        """Pack ``files``, from the first, into one segment of about SEGMENT_TARGET_BYTES and put it. Returns the
        segment (None if none of the files exists any more), the bytes sent, and the files left for the next."""
        with tempfile.TemporaryDirectory(prefix="compile-cache-up-") as tmp:
            archive = Path(tmp) / "segment.tar.zst"
            entries = pack(files, archive, max_packed=SEGMENT_TARGET_BYTES)
            if not entries:
                return None, 0, {}
            names = list(files)
            rest = {n: files[n] for n in names[names.index(entries[-1].path) + 1 :]}
            packed = {e.path: files[e.path] for e in entries}
            sha = sha256_file(archive)
            for bump in range(1, 4):
                if sha not in self.drop:
                    break
                # The very bytes of a damaged object (same files, same mtimes): a create-only write would keep the
                # damaged copy under that name. Other header times give other bytes, hence another name.
                archive.unlink()
                entries = pack(packed, archive, mtime_bump=bump)
                sha = sha256_file(archive)
            size = archive.stat().st_size
            seg = Segment(sha256=sha, size=size, files=entries, written_by=_writer_id(), written_at=time.time())
            written = self.store.put_immutable(seg.object, archive)
        return seg, size if written else 0, rest

    # -- compaction --------------------------------------------------------------------------------------------------
    def _compact_if_due(self) -> None:
        if not self.manifest or len(self.manifest.segments) <= MAX_SEGMENTS:
            return
        try:
            self.compact()
        except (CacheError, OSError) as e:  # the entry stays valid as it was; compaction is an optimisation
            log.warning("compaction of %s skipped: %s", self.key, e)

    def compact(self) -> bool:
        """Repack the manifest's many segments into few, so restores need few requests. Crash-safe: the new
        segments are written first; one compare-and-swap swaps them in (keeping any segment another writer added
        meanwhile); the old objects stay until ``prune`` collects unreferenced ones. False if there was nothing to
        do or another writer compacted first."""
        m = self.manifest
        if m is None or len(m.segments) <= 1:
            return False
        old = {s.sha256 for s in m.segments}
        new_segments = self._repack(m)

        def swapped_in(cur: Manifest | None) -> Manifest | None:
            if cur is None or not old <= {s.sha256 for s in cur.segments}:
                return None  # someone else compacted (or replaced the entry) first
            added = [s for s in cur.segments if s.sha256 not in old]
            return cur.model_copy(update={"segments": new_segments + added, "updated_at": time.time()}, deep=True)

        if not self._swap(swapped_in, "compact"):
            return False
        assert self.manifest is not None
        log.info("compacted %s: %d segments -> %d", self.key, len(old), len(self.manifest.segments))
        return True

    def _repack(self, m: Manifest) -> list[Segment]:
        """Download and unpack (verified) every segment of ``m`` into a temp dir, and put its files as new segments."""
        with tempfile.TemporaryDirectory(prefix="compile-cache-compact-") as tmp:
            base = Path(tmp)
            parts = {}
            for seg in {s.sha256: s for s in m.segments}.values():
                parts[seg.sha256] = base / seg.sha256
                self.store.download(seg.object, parts[seg.sha256])
            roots = {p.split("/", 1)[0]: base / "files" / p.split("/", 1)[0] for p in m.files()}
            staged: Staged | None = None
            for seg in m.segments:
                staged = unpack_into_staging(
                    parts[seg.sha256], seg.files, roots, max_bytes=2**62, max_files=2**31, staged=staged,
                    sha256=seg.sha256, size=seg.size,
                )
            if staged:
                staged.commit()
            files = {p: base / "files" / p for p in m.files()}
            return [seg for seg, _ in self._put_segments(files) if seg is not None]

    # -- which manifest this process may merge into, and healing -----------------------------------------------------
    def _read_or_reset(self) -> tuple[Manifest | None, str | None]:
        """The store's manifest and version if we may merge into it, damaged segments left out (:meth:`_heal`);
        (None, version) if ours replaces it (CAS on that version); EntryRejected if it must be left alone. Merging
        re-signs the whole manifest, so we only merge into what our trust policy verified: never launder a
        tampered or unsigned entry."""
        assert self.trust is not None
        try:
            m, token = read_manifest(self.store, self.key)
        except ObjectTooLarge as e:
            # Reading it would cost what the cap is there to avoid, and a huge one may be a legitimate entry of
            # more files than the cap allows: an operator's call (`verify`, then delete).
            raise EntryRejected(f"the manifest of {self.key} is over the size cap: leaving it as it is ({e})") from e
        except IntegrityError as e:
            # A malformed manifest helps nobody: replace it (CAS on its current version) with ours.
            log.warning("replacing a malformed manifest for %s: %s", self.key, e)
            _, token = self.store.read_versioned(manifest_name(self.key), max_bytes=MAX_MANIFEST_BYTES)
            return None, token
        if m is None:
            return None, None
        if m.signature is not None and self.trust.judge(m).signer not in ("current", "previous"):
            # Another key's entry (a misconfigured replica must not flip-flop the fleet's entry) or a tampered one
            # (an operator's call: `verify`, then delete). Either way, not ours to overwrite.
            raise EntryRejected(
                f"the entry {self.key} is signed and its signature does not verify with this process's "
                "COMPILE_CACHE_SIGNING_KEY or COMPILE_CACHE_VERIFY_KEYS (or none is set): leaving it as it is"
            )
        if m.signature is None and self.signing_key is not None:
            log.warning("replacing the unsigned manifest of %s by a signed one of this process's files", self.key)
            return None, token
        if m.key != self.key or m.fingerprint != fingerprint_of(self.factors):
            log.warning("replacing the manifest of %s: it was written for another key or environment", self.key)
            return None, token
        return self._heal(m), token

    def _heal(self, m: Manifest) -> Manifest:
        """``m`` without the segments a restore found damaged (``drop``, after a scrub of the others): the next
        write leaves them out, and this upload puts their files again (they are no longer known)."""
        if self.drop and not self._scrubbed and self.deadline is None:
            self._scrub(m)
        damaged = [s for s in m.segments if s.sha256 in self.drop]
        self._dropping = bool(damaged)
        if not damaged:
            return m
        log.warning(
            "leaving %d damaged segment(s) out of the manifest of %s (%s); this upload replaces their files",
            len(damaged), self.key, ", ".join(s.sha256[:12] for s in damaged),
        )
        kept = [s for s in m.segments if s.sha256 not in self.drop]
        return m.model_copy(update={"segments": kept, "updated_at": time.time()}, deep=True)


    def _scrub(self, m: Manifest) -> None:
        """A restore stops at its first damaged segments; before leaving those out, check the other objects too
        (size, sha256 and the archive a restore would refuse; streamed, nothing written), so one upload heals the
        whole entry. Only after damage was found, in the background upload (never under the exit flush's
        deadline), once per process."""
        self._scrubbed = True
        for seg in m.segments:
            if seg.sha256 in self.drop:
                continue
            try:
                with self.store.open_read(seg.object) as f:
                    check_object(f, seg.sha256, seg.size, seg.files, self.roots.keys())
            except (IntegrityError, ObjectNotFound):
                self.drop.add(seg.sha256)


    # -- key rotation ------------------------------------------------------------------------------------------------
    def _resign(self) -> None:
        """Key rotation: the manifest in hand verified only with an earlier key (COMPILE_CACHE_VERIFY_KEYS). Write
        it again, content unchanged, signed with the current key, so the fleet can drop the earlier one. A writer
        that wrote first (perhaps re-signed it) is judged as any other."""
        assert self.trust is not None
        trust = self.trust
        if self._swap(lambda cur: cur if cur is not None and trust.needs_resign(cur) else None, "re-sign"):
            log.info("re-signed the entry %s with the current COMPILE_CACHE_SIGNING_KEY", self.key)


def _batches(files: Mapping[str, Path]) -> list[dict[str, Path]]:
    """Group files, in the order they are packed, into batches of at most SEGMENT_MAX_UNPACKED_BYTES (or one larger
    file), each packed into one or more segments. Kernels go first, the FX-graph and AOTAutograd entries that
    refer to them last: a deadline that cuts the upload short publishes usable kernels, not graph entries whose
    kernels are missing (Inductor would rebuild those, but slowly)."""
    out: list[dict[str, Path]] = []
    cur: dict[str, Path] = {}
    size = 0
    for name in sorted(files, key=lambda n: ("/fxgraph/" in n or "/aotautograd/" in n, n)):
        try:
            n = files[name].stat().st_size
        except FileNotFoundError:
            continue
        if cur and size + n > SEGMENT_MAX_UNPACKED_BYTES:
            out.append(cur)
            cur, size = {}, 0
        cur[name] = files[name]
        size += n
    if cur:
        out.append(cur)
    return out


# -- versions: seeding a new key from its lineage, and explaining a miss (docs/versions.md) --------------------------
# Entries of one lineage looked at on a miss: one S3 list page. A lineage holds one entry per (what compiles,
# environment), not one per version (weights-only versions share an entry), so this bounds a rare case.
MAX_LISTED = 1000
_ENTRIES = "entries/"
_MANIFEST_SUFFIX = "/manifest.json"


@dataclass
class _Listed:
    key: str
    part: str
    fingerprint: str
    modified: float


def lineage_entries(store: Store, lineage: str, limit: int = MAX_LISTED) -> list[_Listed]:
    """The entries of ``lineage`` (by key name: ``<lineage>.<model part>.<summary>.<fingerprint>``), newest manifest
    write first; one bounded listing, no manifest read."""
    out: list[_Listed] = []
    for o in store.list(f"{_ENTRIES}{lineage}."):
        if not o.name.endswith(_MANIFEST_SUFFIX):
            continue
        key = o.name[len(_ENTRIES) : -len(_MANIFEST_SUFFIX)]
        lin, part, fp = split_key(key)
        if "/" in key or lin != lineage:
            continue
        out.append(_Listed(key, part, fp, o.modified))
        if len(out) >= limit:
            break
    return sorted(out, key=lambda e: -e.modified)


def _short(value: str, n: int = 24) -> str:
    return value if len(value) <= n else value[: n - 1] + "…"


def _changes(a: Mapping[str, str], b: Mapping[str, str]) -> list[str]:
    """``factor old → new`` for each factor that differs between an entry (a) and this process (b)."""
    out = []
    for line in diff_factors(a, b):
        k = line.split(":", 1)[0]
        out.append(f"{k} {_short(str(a.get(k, '<absent>')))} → {_short(str(b.get(k, '<absent>')))}")
    return out


def _explain(store: Store, key: str, factors: Mapping[str, str], model_factors: Mapping[str, str]) -> str:
    """``<key>: <factor> <theirs> → <ours>, ...`` for one nearby entry (one manifest read)."""
    try:
        m, _ = read_manifest(store, key)
    except (CacheError, OSError) as e:
        return f"{key}: unreadable ({e})"
    if m is None:
        return f"{key}: deleted meanwhile"
    diffs = _changes(m.factors, factors) + (_changes(m.model_factors, model_factors) if m.model_factors else [])
    label = f" (version {m.model_version})" if m.model_version else ""
    return f"{key}{label}: " + (", ".join(diffs[:4]) + (f" and {len(diffs) - 4} more" if len(diffs) > 4 else "")
                                if diffs else "no factor differs")


def restore_or_seed(
    store: Store,
    key: str,
    roots: Mapping[str, Path],
    *,
    factors: Mapping[str, str],
    trust: TrustPolicy | None = None,
    options: RestoreOptions = _DEFAULT_OPTIONS,
    lineage: str = "",
    model_factors: Mapping[str, str] | None = None,
    seed: bool = True,
) -> RestoreResult:
    """:func:`restore` the entry ``key``; on a miss, name the nearest entries of ``lineage`` and what differs
    (``cache_reason``), and with ``seed`` restore the newest entry of the same lineage *and* the same environment
    fingerprint instead (status ``"seeded"``, ``seeded_from``). Inductor's content-addressed keys then decide what
    of it hits; the export strategy reuses only what it can show is valid (see lifecycle).

    A hit costs what :func:`restore` costs: the lineage is listed only on a miss (one bounded listing, at most two
    manifest reads to explain it), on a helper thread, within what is left of ``options.timeout_s``. The seed must
    pass every check an entry of this key would (fingerprint, signature, caps): :func:`restore` runs on it."""
    t0 = time.monotonic()
    r = restore(store, key, roots, factors=factors, trust=trust, options=options)
    if r.status != "miss" or not lineage:
        return r
    _, part, fp = split_key(key)
    survey: dict[str, Any] = {}

    def work() -> None:
        try:
            listed = [e for e in lineage_entries(store, lineage) if e.key != key]
            seeds = [e for e in listed if e.fingerprint == fp]
            # Nearest: the newest entry of the same environment (what compiles differs), and the newest of the same
            # model part (the environment differs) or, lacking one, the newest other entry of the lineage.
            others = [e for e in listed if e.fingerprint != fp]
            nearest = seeds[:1] + ([e for e in others if e.part == part] or others)[:1]
            survey["seeds"] = seeds
            survey["notes"] = [_explain(store, e.key, factors, model_factors or {}) for e in nearest]
        except Exception as e:  # a cache problem must never fail a boot
            survey["error"] = e

    th = threading.Thread(target=work, name="compile-cache-lineage", daemon=True)
    th.start()
    th.join(max(0.0, options.timeout_s - (time.monotonic() - t0)))
    if th.is_alive() or "error" in survey:
        why = (f"exceeded COMPILE_CACHE_RESTORE_TIMEOUT_S={options.timeout_s:g}s" if th.is_alive()
               else f"{type(survey['error']).__name__}: {survey['error']}")
        r.reason = f"no entry; could not list lineage {lineage}: {why}"
        r.seconds = time.monotonic() - t0
        return r
    seeds, notes = survey["seeds"], survey["notes"]
    r.reason = "no entry; " + ("nearest " + "; ".join(notes) if notes else f"no other entry of lineage {lineage}")
    if not seed or not seeds:
        return r
    left = replace(options, timeout_s=max(1.0, options.timeout_s - (time.monotonic() - t0)))
    s = restore(store, seeds[0].key, roots, factors=factors, trust=trust, options=left)
    if s.status != "hit":
        r.reason += f"; seeding from {seeds[0].key} failed ({s.status}: {s.reason})"
        r.seconds = time.monotonic() - t0
        return r
    assert s.manifest is not None
    s.status, s.seeded_from, s.reason, s.token = "seeded", seeds[0].key, r.reason, None
    s.usage_tracked = mark_unread(s.manifest, roots)
    s.seconds = time.monotonic() - t0
    return s


def _local(roots: Mapping[str, Path], path: str) -> Path | None:
    label, _, rel = path.partition("/")
    root = roots.get(label)
    return root / rel if root is not None and rel else None


def mark_unread(manifest: Manifest, roots: Mapping[str, Path]) -> bool:
    """Set the access time of every restored file of ``manifest`` to 0 (its modification time stays), so the next
    read shows: Linux updates an access time older than the change time on the next read even under ``relatime``
    (the default mount option). Returns False where reads cannot be seen (``noatime``), found with a probe file."""
    probe_root = next((r for r in roots.values() if r.is_dir()), None)
    if probe_root is None:
        return False
    probe = probe_root / ".compile_cache-atime-probe"
    try:
        probe.write_bytes(b"probe")
        os.utime(probe, ns=(0, probe.stat().st_mtime_ns))
        probe.read_bytes()
        tracked = probe.stat().st_atime_ns > 0
    except OSError:
        tracked = False
    finally:
        probe.unlink(missing_ok=True)
    if not tracked:
        return False
    for path in manifest.files():
        p = _local(roots, path)
        try:
            if p is not None:
                os.utime(p, ns=(0, p.stat().st_mtime_ns))
        except OSError:
            pass
    return True


def _was_read(roots: Mapping[str, Path], path: str) -> bool:
    p = _local(roots, path)
    try:
        return p is not None and p.stat().st_atime_ns > 0
    except OSError:
        return False
