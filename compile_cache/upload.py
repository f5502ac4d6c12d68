"""Upload after a boot: publish what is new in the local cache dirs to the entry, as delta segments.

Store-agnostic and torch-free. Scan the dirs, subtract what the manifest already lists, pack the rest into segments,
put each segment (immutable, content-addressed), then compare-and-swap the manifest to include it. Concurrent
writers merge. Compaction, healing (damaged segments left out), key rotation and version labels write the manifest
through the same compare-and-swap (Uploader._swap). The protocol is in the module docs of stores.base and manifest.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from .entry import Entry
from .errors import (
    CacheError,
    EntryRejected,
    IntegrityError,
    ObjectNotFound,
    ObjectTooLarge,
    PreconditionFailed,
    StoreError,
)
from .lineage import was_read
from .manifest import MAX_MANIFEST_BYTES, Manifest, Segment, manifest_name
from .restore import RestoreResult, read_manifest
from .segments import put_segments
from .snapshot import Staged, check_object, scan, unpack_into_staging

__all__ = ["UploadResult", "Uploader"]

log = logging.getLogger("compile_cache")

MAX_SEGMENTS = 64  # a writer that sees more compacts the manifest (see Uploader.compact)
_CAS_ATTEMPTS = 20  # tries of one manifest write against other writers (Uploader._swap)


@dataclass
class UploadResult:
    bytes_uploaded: int = 0
    files: int = 0
    segments: int = 0
    seconds: float = 0.0
    complete: bool = True  # False when a deadline stopped it before everything new was published
    error: str = ""


@dataclass
class Uploader:
    """Publishes what is new in the entry's roots to the entry. One per process; uploads are serialised.

    ``known`` is what the store is believed to hold already (from the restore or the last upload): if the local
    dirs hold nothing beyond it, an upload costs no request at all. The entry's trust policy says which manifests
    it may merge into, hence sign (with its signing key): only those a restore would load, never an unsigned one
    (replaced instead) nor one signed with a key it does not hold (left alone). ``model_version`` labels the entry.
    """

    entry: Entry
    model_version: str
    known: set[str] = field(default_factory=set)
    manifest: Manifest | None = None
    token: str | None = None
    total: UploadResult = field(default_factory=UploadResult)
    deadline: float | None = None  # time.monotonic() value; set by the exit flush to bound every upload
    lock: threading.Lock = field(default_factory=threading.Lock)
    on_progress: Callable[[UploadResult], None] | None = None
    drop: set[str] = field(default_factory=set)  # damaged segments to leave out (RestoreResult.bad_segments)
    # Versions (docs/versions.md): the seed's manifest when the restore seeded (the new manifest references the
    # seed's segments this process read).
    seed: Manifest | None = None
    seed_usage_tracked: bool = False
    _dropping: bool = False  # the manifest in hand left some out and is not written yet
    _scrubbed: bool = False  # the other segments' objects were checked once (see _scrub)
    # Files restored from an entry nothing verified (unsigned, loaded under COMPILE_CACHE_ALLOW_UNSIGNED): this
    # process never publishes them under its signature, nor references such a seed's segments.
    unverified: set[str] = field(default_factory=set)
    _seed_kept: list[Segment] | None = None
    # The parts this process compiled, by name (what serves each: Manifest.parts), set once they are: the manifest
    # says which parts an entry covers (a part that fell back to eager is not covered).
    parts: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for m in (self.manifest, self.seed):
            if m is not None and self._signing_key is not None and m.signature is None:
                self.unverified |= set(m.files())

    @classmethod
    def after_restore(cls, r: RestoreResult, entry: Entry, model_version: str) -> Uploader:
        """The uploader of ``entry`` after its restore ``r``: it knows what the restore brought, and leaves out what
        it found damaged; after a seeding, it starts from the seed (a manifest of its own is written later)."""
        if r.status == "seeded":
            assert r.manifest is not None
            return cls(entry, model_version, seed=r.manifest, seed_usage_tracked=r.usage_tracked)
        m = r.manifest
        return cls(entry, model_version, known=set(m.files()) if m else set(), manifest=m, token=r.token,
                   drop=set(r.bad_segments))

    @property
    def _signing_key(self) -> bytes | None:
        return self.entry.trust.signing_key

    def pending(self) -> dict[str, Path]:
        seeded = self.seed.files() if self.seed is not None else {}
        skip = self.known | self.unverified
        return {n: p for n, p in scan(self.entry.roots).items() if n not in skip and n not in seeded}

    # -- versions --------------------------------------------------------------------------------------------------
    def _seed_segments(self) -> list[Segment]:
        """The seed's segments the new entry references: those holding a file this process read since the restore
        (all of them where reads cannot be seen). Decided once, at the first upload (after warm-up): an entry
        holds what its version used, so entries do not grow from version to version with files none reads."""
        if self.seed is None or (self._signing_key is not None and self.seed.signature is None):
            return []  # an unsigned seed (COMPILE_CACHE_ALLOW_UNSIGNED) is never published under our signature
        if self._seed_kept is None:
            segs = self.seed.segments
            if self.seed_usage_tracked:
                segs = [s for s in segs if any(was_read(self.entry.roots, f.path) for f in s.files)]
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
            key=self.entry.key,
            model_version=self.model_version,
            fingerprint=self.entry.fingerprint,
            factors=dict(self.entry.factors),
            lineage=self.entry.lineage,
            model_factors=dict(self.entry.model_factors),
            segments=self._seed_segments(),
            seeded_from=self.seed.key if self.seed is not None else "",
        )

    def _labelled(self, m: Manifest) -> Manifest:
        """``m`` with this version's label and the parts this process compiled (``parts``)."""
        m = m if self.model_version in m.labels() else m.with_label(self.model_version)
        return m if self.parts.keys() <= m.parts.keys() else m.with_parts(self.parts)

    def _meta_due(self) -> bool:
        """Whether the manifest must be written with no new file: a seeded entry not published yet, or an entry
        that does not list this version's label. Decided from what is in hand: a warm boot of a known version asks
        the store nothing."""
        if self.manifest is None:
            return self.seed is not None
        return self.model_version not in self.manifest.labels() or not self.parts.keys() <= self.manifest.parts.keys()

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
            data = m.to_bytes(self._signing_key)
            try:
                self.token = self.entry.store.put_conditional(manifest_name(self.entry.key), data, self.token)
            except PreconditionFailed:  # someone wrote first: judge and merge into theirs
                self.manifest, self.token = self._read_or_reset()
                continue
            self.manifest = Manifest.from_bytes(data)
            self._dropping = False
            return True
        raise StoreError(f"could not {what} the manifest of {self.entry.key} after {_CAS_ATTEMPTS} attempts")

    # -- delta upload ------------------------------------------------------------------------------------------------
    def _upload_files(self, new: Mapping[str, Path], r: UploadResult, deadline: float | None) -> bool:
        """Put ``new`` as segments, publishing each as it lands; False if the deadline stopped it first."""
        for seg, nbytes in put_segments(self.entry.store, new, self.drop, stop=lambda: self._out_of_time(deadline)):
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
        if base.fingerprint != self.entry.fingerprint:
            raise EntryRejected(f"the store's entry {self.entry.key} has a foreign fingerprint: not merging into it")
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

    # -- compaction --------------------------------------------------------------------------------------------------
    def _compact_if_due(self) -> None:
        if not self.manifest or len(self.manifest.segments) <= MAX_SEGMENTS:
            return
        try:
            self.compact()
        except (CacheError, OSError) as e:  # the entry stays valid as it was; compaction is an optimisation
            log.warning("compaction of %s skipped: %s", self.entry.key, e)

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
        log.info("compacted %s: %d segments -> %d", self.entry.key, len(old), len(self.manifest.segments))
        return True

    def _repack(self, m: Manifest) -> list[Segment]:
        """Download and unpack (verified) every segment of ``m`` into a temp dir, and put its files as new segments."""
        with tempfile.TemporaryDirectory(prefix="compile-cache-compact-") as tmp:
            base = Path(tmp)
            parts = {}
            for seg in {s.sha256: s for s in m.segments}.values():
                parts[seg.sha256] = base / seg.sha256
                self.entry.store.download(seg.object, parts[seg.sha256])
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
            return [seg for seg, _ in put_segments(self.entry.store, files, self.drop) if seg is not None]

    # -- which manifest this process may merge into, and healing -----------------------------------------------------
    def _read_or_reset(self) -> tuple[Manifest | None, str | None]:
        """The store's manifest and version if we may merge into it, damaged segments left out (:meth:`_heal`);
        (None, version) if ours replaces it (CAS on that version); EntryRejected if it must be left alone. Merging
        re-signs the whole manifest, so we only merge into what our trust policy verified: never launder a
        tampered or unsigned entry."""
        try:
            m, token = read_manifest(self.entry.store, self.entry.key)
        except ObjectTooLarge as e:
            # Reading it would cost what the cap is there to avoid, and a huge one may be a legitimate entry of
            # more files than the cap allows: an operator's call (`verify`, then delete).
            raise EntryRejected(f"the manifest of {self.entry.key} is over the size cap: leaving it as it is ({e})") from e
        except IntegrityError as e:
            # A malformed manifest helps nobody: replace it (CAS on its current version) with ours.
            log.warning("replacing a malformed manifest for %s: %s", self.entry.key, e)
            _, token = self.entry.store.read_versioned(manifest_name(self.entry.key), max_bytes=MAX_MANIFEST_BYTES)
            return None, token
        if m is None:
            return None, None
        if m.signature is not None and self.entry.trust.judge(m).signer not in ("current", "previous"):
            # Another key's entry (a misconfigured replica must not flip-flop the fleet's entry) or a tampered one
            # (an operator's call: `verify`, then delete). Either way, not ours to overwrite.
            raise EntryRejected(
                f"the entry {self.entry.key} is signed and its signature does not verify with this process's "
                "COMPILE_CACHE_SIGNING_KEY or COMPILE_CACHE_VERIFY_KEYS (or none is set): leaving it as it is"
            )
        if m.signature is None and self._signing_key is not None:
            log.warning("replacing the unsigned manifest of %s by a signed one of this process's files", self.entry.key)
            return None, token
        if m.key != self.entry.key or m.fingerprint != self.entry.fingerprint:
            log.warning("replacing the manifest of %s: it was written for another key or environment", self.entry.key)
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
            len(damaged), self.entry.key, ", ".join(s.sha256[:12] for s in damaged),
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
                with self.entry.store.open_read(seg.object) as f:
                    check_object(f, seg.sha256, seg.size, seg.files, self.entry.roots.keys())
            except (IntegrityError, ObjectNotFound):
                self.drop.add(seg.sha256)


    # -- key rotation ------------------------------------------------------------------------------------------------
    def _resign(self) -> None:
        """Key rotation: the manifest in hand verified only with an earlier key (COMPILE_CACHE_VERIFY_KEYS). Write
        it again, content unchanged, signed with the current key, so the fleet can drop the earlier one. A writer
        that wrote first (perhaps re-signed it) is judged as any other."""
        trust = self.entry.trust
        if self._swap(lambda cur: cur if cur is not None and trust.needs_resign(cur) else None, "re-sign"):
            log.info("re-signed the entry %s with the current COMPILE_CACHE_SIGNING_KEY", self.entry.key)

