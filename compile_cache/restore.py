"""Restore at boot: one entry from a store into the local cache dirs, within a deadline and caps.

Store-agnostic and torch-free. Read the manifest (size-capped), check it (key, fingerprint, signature:
trust.TrustPolicy), stream every segment through its sha256 check and the decompressor into staging (one pass,
several segments at a time), then move into place. Any failure leaves the cache dir as it was and returns a status
the lifecycle turns into a cold boot. The protocol is in the module docs of stores.base and manifest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Settings
from .entry import Entry
from .errors import EntryRejected, IntegrityError, ObjectNotFound, ObjectTooLarge, StoreError
from .manifest import MAX_MANIFEST_BYTES, Manifest, Segment, manifest_name
from .snapshot import Staged, unpack_into_staging
from .stores.base import Store
from .trust import Signer

__all__ = ["RestoreOptions", "RestoreResult", "restore", "read_manifest"]

log = logging.getLogger("compile_cache")


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# Segments restored at a time, each streamed, hashed, decompressed and written by its own thread. Where the store
# shares the CPU, the CPU is the limit and the count hardly matters (docs/benchmarks.md, "Segments and restore
# parallelism"). Against a remote store each stream is limited by its connection, so four at least; one per core up
# to eight (the S3 connection pool) beyond that.
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
    # this process leaves them out of the manifest (Uploader.drop, via Uploader.after), so a damaged object does not keep every
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


def _default(setting: str) -> Any:
    """The default of a Settings field: written once, in config.py."""
    return Settings.model_fields[setting].default


@dataclass(frozen=True)
class RestoreOptions:
    """How long a restore may take and how much it may load. The defaults are the settings' defaults; a boot builds
    them from its settings (:meth:`from_settings`). Which manifests may load at all is the trust policy's call."""

    timeout_s: float = _default("restore_timeout_s")  # COMPILE_CACHE_RESTORE_TIMEOUT_S
    max_bytes: int = _default("max_restore_bytes")  # COMPILE_CACHE_MAX_RESTORE_BYTES: unpacked bytes
    max_files: int = _default("max_restore_files")  # COMPILE_CACHE_MAX_RESTORE_FILES
    max_manifest_bytes: int = MAX_MANIFEST_BYTES

    @classmethod
    def from_settings(cls, settings: Settings) -> RestoreOptions:
        return cls(settings.restore_timeout_s, settings.max_restore_bytes, settings.max_restore_files)


def restore(entry: Entry, options: RestoreOptions | None = None) -> RestoreResult:
    """Restore ``entry`` into its roots. Never raises for a cache problem: the status says what happened.

    The entry's trust policy decides which manifests may be loaded. Runs on a helper thread so the deadline holds
    even if the store hangs; past it, the helper is told to stop and must not move anything into place (the cache
    dir stays as it was). ``options``: the deadline and caps (default: the settings' defaults).
    """
    options = options or RestoreOptions()
    run = _Run(entry, options)
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

    entry: Entry
    options: RestoreOptions
    cancel: threading.Event = field(default_factory=threading.Event)  # set past the deadline
    commit_lock: threading.Lock = field(default_factory=threading.Lock)  # held while moving files into place
    bad: set[str] = field(default_factory=set)  # segments found missing or damaged
    result: RestoreResult | None = None

    def restore(self) -> RestoreResult:
        e, opts = self.entry, self.options
        key = e.key
        try:
            manifest, token = read_manifest(e.store, key, opts.max_manifest_bytes)
        except ObjectTooLarge as e:
            raise EntryRejected(f"manifest too large: {e}") from e
        if manifest is None:
            return RestoreResult("miss", "no entry for this key")
        manifest.check(key=key, factors=e.factors)
        verdict = e.trust.check(manifest)
        if verdict.signer == "previous":
            log.info("the entry %s %s", key, verdict.reason)
        elif verdict.signer == "unsigned" and e.trust.signing_key is not None:
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
                with self.entry.store.open_read(seg.object) as body:
                    return unpack_into_staging(body, seg.files, self.entry.roots, **check), seg.size
            part = tmp / f"{index}-{seg.sha256}"  # large: parallel ranged GETs into a file, then one verified pass
            n = self.entry.store.download(seg.object, part)
            try:
                return unpack_into_staging(part, seg.files, self.entry.roots, **check), n
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

