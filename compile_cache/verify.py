"""Check one entry in a store without loading any of it: the engine of ``python -m compile_cache verify KEY``.

It checks what a restore checks, and reports every problem instead of stopping at the first: the manifest parses
(within the size cap) and was written for this key; its fingerprint matches the key (and the given factors); a
restore under the same trust policy would load it (trust.TrustPolicy: signing key, earlier keys, signed-only);
every object exists with its recorded size and sha256; every archive's members are safe (relative
names, regular files only, caps) and match the manifest. Archives are checked by the restore's own code in dry-run
mode (:func:`snapshot.check_archive`): nothing is written outside a temporary download directory.

No torch and no boto3 here (the store passed in may use boto3). Messages never contain the signing key.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CacheError, IntegrityError, ObjectNotFound
from .key import diff_factors, fingerprint_of
from .manifest import MAX_MANIFEST_SEGMENTS, Manifest, manifest_name
from .restore import RestoreOptions
from .snapshot import check_archive, sha256_file
from .stores.base import Progress, Store
from .trust import TrustPolicy

__all__ = ["VerifyReport", "verify_entry"]

# The root labels a segment may use (compiler.cache_roots): "triton" only appears on GPU hosts, but a CPU host may
# verify a GPU entry.
ROOT_LABELS = ("inductor", "triton")
_KEY_FINGERPRINT = re.compile(r"\.([0-9a-f]{12})$")


@dataclass
class VerifyReport:
    """What ``verify_entry`` found. ``ok`` is True when there is no problem; ``notes`` say what was not checked."""

    key: str
    store: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    segments: int = 0
    files: int = 0
    bytes_stored: int = 0  # compressed objects, as listed
    bytes_unpacked: int = 0  # as listed

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        head = "OK" if self.ok else f"FAILED ({len(self.problems)} problem(s))"
        lines = [
            f"{head}  {self.key} in {self.store}",
            f"  {self.segments} segment(s), {self.files} file(s), {self.bytes_stored / 1e6:.1f} MB stored, "
            f"{self.bytes_unpacked / 1e6:.1f} MB unpacked",
        ]
        lines += [f"  PROBLEM  {p}" for p in self.problems]
        lines += [f"  note     {n}" for n in self.notes]
        return "\n".join(lines)


def verify_entry(
    store: Store,
    key: str,
    trust: TrustPolicy,
    *,
    factors: Mapping[str, str] | None = None,
    options: RestoreOptions | None = None,
    labels: Collection[str] = ROOT_LABELS,
    progress: Progress | None = None,
) -> VerifyReport:
    """Check the entry ``key`` in ``store``; never raises for what it finds (store trouble is a problem too).

    ``trust``: the policy a restore would judge it by. ``factors``: an environment's fingerprint factors to compare
    with; without them (a person verifying a key by name has no environment, hence no entry.Entry), the manifest's
    fingerprint is compared with the one the key name ends with. ``options``: the caps (default: the settings'
    defaults). ``progress`` gets the bytes downloaded.
    """
    options = options or RestoreOptions()
    max_bytes, max_files = options.max_bytes, options.max_files
    rep = VerifyReport(key, store.url)
    try:
        data = store.read(manifest_name(key), max_bytes=options.max_manifest_bytes)
    except ObjectNotFound:
        rep.problems.append(f"no entry: {manifest_name(key)} does not exist")
        return rep
    except (CacheError, OSError) as e:
        rep.problems.append(f"cannot read the manifest: {type(e).__name__}: {e}")
        return rep
    try:
        m = Manifest.from_bytes(data)
    except IntegrityError as e:
        rep.problems.append(str(e))
        return rep
    files = m.files()
    rep.segments, rep.files = len(m.segments), len(files)
    rep.bytes_stored, rep.bytes_unpacked = m.total_bytes, sum(f.size for f in files.values())

    _check_identity(m, key, factors, rep)
    verdict = trust.judge(m)
    if not verdict.loads:
        rep.problems.append(verdict.reason)
    elif verdict.reason:
        rep.notes.append(verdict.reason)
    if len(m.segments) > MAX_MANIFEST_SEGMENTS:
        rep.problems.append(f"manifest lists {len(m.segments)} segments, more than {MAX_MANIFEST_SEGMENTS}")
    # As restore counts: every segment is unpacked, files listed twice (overlapping segments) included.
    nbytes = sum(s.unpacked_bytes for s in m.segments)
    nfiles = sum(len(s.files) for s in m.segments)
    if nbytes > max_bytes or nfiles > max_files:
        rep.problems.append(
            f"entry is larger than the caps: {nbytes} bytes / {nfiles} files "
            f"(caps {max_bytes} / {max_files}); a restore refuses it"
        )
    _check_objects(store, m, labels, max_bytes, max_files, progress, rep)
    return rep


def _check_identity(m: Manifest, key: str, factors: Mapping[str, str] | None, rep: VerifyReport) -> None:
    if m.key != key:
        rep.problems.append(f"manifest was written for key {m.key!r}, not {key!r} (copied under another key?)")
    named = _KEY_FINGERPRINT.search(key)
    if named and named.group(1) != m.fingerprint:
        rep.problems.append(f"manifest fingerprint {m.fingerprint} is not the one the key names ({named.group(1)})")
    if factors is None:
        rep.notes.append("fingerprint not compared with an environment (no factors given)")
    elif fingerprint_of(factors) != m.fingerprint:
        diff = "; ".join(diff_factors(m.factors, factors)[:4])
        rep.problems.append(f"manifest fingerprint is foreign to the given environment ({diff})")


def _check_objects(
    store: Store,
    m: Manifest,
    labels: Collection[str],
    max_bytes: int,
    max_files: int,
    progress: Progress | None,
    rep: VerifyReport,
) -> None:
    seen: set[str] = set()
    total = 0
    with tempfile.TemporaryDirectory(prefix="compile-cache-verify-") as tmp:
        for i, seg in enumerate(m.segments):
            where = f"segment {i} (object {seg.object})"
            part = Path(tmp) / seg.sha256
            try:
                store.download(seg.object, part, progress=progress)
            except ObjectNotFound:
                rep.problems.append(f"{where}: object is missing")
                continue
            except (CacheError, OSError) as e:
                rep.problems.append(f"{where}: cannot download: {type(e).__name__}: {e}")
                continue
            size = part.stat().st_size
            if size != seg.size:
                rep.problems.append(f"{where}: {size} bytes, manifest says {seg.size} (truncated or replaced)")
            elif sha256_file(part) != seg.sha256:
                rep.problems.append(f"{where}: content does not match its sha256 (corrupt or replaced)")
            else:
                try:
                    total = check_archive(
                        part, seg.files, labels, max_bytes=max_bytes, max_files=max_files, seen=seen, total=total
                    )
                except IntegrityError as e:  # UnsafeArchive included
                    rep.problems.append(f"{where}: {e}")
            part.unlink(missing_ok=True)
