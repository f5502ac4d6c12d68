"""Snapshots of cache directories: find what is new, pack it into a segment, unpack a segment safely.

A segment is a zstd-compressed tar of regular files named ``<root>/<relative path>`` (root: ``inductor``, and on GPU
``triton`` when Triton's cache lives elsewhere). Unpacking trusts nothing: every member must be a regular file with a
safe relative name that the manifest lists with the same size and sha256; caps bound bytes and file count; files
land in a staging directory first and are moved into place only when the whole segment verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import tarfile
import uuid
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import zstandard

from .errors import IntegrityError, UnsafeArchive
from .manifest import FileEntry

__all__ = ["scan", "pack", "unpack_into_staging", "check_archive", "Staged", "STAGING_PREFIX", "sha256_file"]

STAGING_PREFIX = ".compile_cache-staging-"
# Not worth shipping: locks, temp files, bytecode, our own log dir, and precompiled headers (150 MB that only speed
# up building new kernels; a warm boot builds none).
_SKIP_DIRS = {"locks", "precompiled_headers", "__pycache__", "compile_cache"}
_SKIP_SUFFIXES = (".lock", ".tmp", ".incomplete")
_ZSTD_LEVEL = 3


def _skipped(rel: PurePosixPath) -> bool:
    return (
        any(p in _SKIP_DIRS or p.startswith(".") for p in rel.parts)
        or rel.name.endswith(_SKIP_SUFFIXES)
        or ".tmp" in rel.name
    )


def scan(roots: Mapping[str, Path]) -> dict[str, Path]:
    """Every shippable regular file under the roots, as ``{"<root>/<rel>": absolute path}``."""
    out: dict[str, Path] = {}
    for label, root in roots.items():
        if not root.is_dir():
            continue
        for dirpath, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith(".")]
            for fn in files:
                p = Path(dirpath) / fn
                rel = PurePosixPath(p.relative_to(root).as_posix())
                if _skipped(rel) or p.is_symlink() or not p.is_file():
                    continue
                out[f"{label}/{rel}"] = p
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class _HashingReader:
    """Reads a file while hashing it, so packing reads every byte once."""

    def __init__(self, f) -> None:  # type: ignore[no-untyped-def]
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        b = self.f.read(size)
        self.h.update(b)
        self.n += len(b)
        return b


def pack(files: Mapping[str, Path], dest: Path) -> list[FileEntry]:
    """Write ``files`` (store path → local path) as a zstd tar to ``dest``; return their entries.

    A file that vanished since the scan is left out (Inductor may clean up a temp file).
    """
    entries: list[FileEntry] = []
    cctx = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
    with open(dest, "wb") as raw, cctx.stream_writer(raw) as zw, tarfile.open(fileobj=zw, mode="w|") as tar:
        for name in sorted(files):
            src = files[name]
            try:
                f = open(src, "rb")
            except FileNotFoundError:
                continue
            with f:
                st = os.fstat(f.fileno())
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = st.st_size, 0o644, int(st.st_mtime)
                reader = _HashingReader(f)
                tar.addfile(info, reader)  # type: ignore[arg-type]
                entries.append(FileEntry(path=name, size=reader.n, sha256=reader.h.hexdigest()))
    return entries


def _safe_member_name(name: str, roots: Iterable[str]) -> PurePosixPath:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or not p.parts or p.parts[0] not in roots or len(p.parts) < 2:
        raise UnsafeArchive(f"archive member {name!r} would escape the cache dir")
    if any(part.startswith(STAGING_PREFIX) for part in p.parts):
        raise UnsafeArchive(f"archive member {name!r} uses a reserved name")
    return p


@dataclass
class Staged:
    """Verified files waiting in a staging dir per root; ``commit`` moves them into place, ``discard`` drops them."""

    staging: dict[str, Path]
    files: list[tuple[str, Path]]  # (store path, staged file)
    roots: Mapping[str, Path]

    def commit(self) -> int:
        """Move every staged file into its root, keeping files that already exist with the same size; return how
        many moved. A local file of another size than its verified copy is damaged (a crash or a full disk while
        it was written): Torch would load such a kernel as it is (tests/test_faults.py), so the copy replaces it.

        All or nothing: if a move fails (a full disk can refuse a new directory, a read-only one anything), the
        files moved so far and the directories made for them are removed again before the error propagates."""
        moved: list[Path] = []
        made: list[Path] = []
        try:
            for name, staged in self.files:
                label, _, rel = name.partition("/")
                dest = self.roots[label] / rel
                if dest.is_file() and dest.stat().st_size == staged.stat().st_size:
                    continue
                d = dest.parent
                while d != self.roots[label] and not d.exists():
                    made.append(d)
                    d = d.parent
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged, dest)
                moved.append(dest)
        except BaseException:
            for f in moved:
                f.unlink(missing_ok=True)
            for d in sorted(made, key=lambda d: len(d.parts), reverse=True):
                with contextlib.suppress(OSError):
                    d.rmdir()  # only if empty: never a directory something else wrote into meanwhile
            raise
        finally:
            self.discard()
        return len(moved)

    def discard(self) -> None:
        for d in self.staging.values():
            shutil.rmtree(d, ignore_errors=True)


def unpack_into_staging(
    archive: Path | bytes,
    expected: Iterable[FileEntry],
    roots: Mapping[str, Path],
    *,
    max_bytes: int,
    max_files: int,
    staged: Staged | None = None,
) -> Staged:
    """Decompress and verify ``archive`` into staging dirs inside each root (same filesystem, so commit is a
    rename). Every member must be listed in ``expected`` with the same size and sha256. Raises UnsafeArchive,
    IntegrityError or OSError (disk full, read-only dir), having removed everything it wrote, staging dirs
    included; pass ``staged`` to accumulate several segments (an error then discards all of them)."""
    if staged is None:
        staged = Staged({}, [], roots)
    try:
        for label, root in roots.items():
            if label not in staged.staging:
                root.mkdir(parents=True, exist_ok=True)
                d = root / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
                d.mkdir()
                staged.staging[label] = d
        seen = {n for n, _ in staged.files}
        total = sum(p.stat().st_size for _, p in staged.files)
        written, _ = _unpack_checked(
            archive, expected, roots, max_bytes=max_bytes, max_files=max_files, seen=seen, total=total,
            staging=staged.staging,
        )
        staged.files += [(n, p) for n, p in written if p is not None]
    except BaseException:
        staged.discard()
        raise
    return staged


def check_archive(
    archive: Path,
    expected: Iterable[FileEntry],
    labels: Collection[str],
    *,
    max_bytes: int,
    max_files: int,
    seen: set[str] | None = None,
    total: int = 0,
) -> int:
    """Dry run of :func:`unpack_into_staging`: the same checks, nothing written. Returns the unpacked byte count
    so far; to check several segments against one cap, pass the same ``seen`` set and the returned ``total``."""
    _, total = _unpack_checked(
        archive, expected, labels, max_bytes=max_bytes, max_files=max_files,
        seen=set() if seen is None else seen, total=total, staging=None,
    )
    return total


def _unpack_checked(
    archive: Path | bytes,
    expected: Iterable[FileEntry],
    labels: Collection[str],
    *,
    max_bytes: int,
    max_files: int,
    seen: set[str],
    total: int,
    staging: Mapping[str, Path] | None,
) -> tuple[list[tuple[str, Path | None]], int]:
    """The one place that decides whether an archive is safe (restore and ``verify`` share it). Writes each
    member under ``staging[root label]`` (or only hashes it when ``staging`` is None); ``seen`` and ``total``
    carry earlier segments' files and bytes for the caps. Returns ([(store path, written file)], new total);
    files written before an error are left for the caller to discard with their staging dir."""
    want = {f.path: f for f in expected}
    written: list[tuple[str, Path | None]] = []
    here: set[str] = set()
    try:
        dctx = zstandard.ZstdDecompressor()
        # An archive is a file, or the bytes of a small segment already verified in memory (restore).
        opened = io.BytesIO(archive) if isinstance(archive, bytes | bytearray) else open(archive, "rb")
        with opened as raw, dctx.stream_reader(raw) as zr, tarfile.open(fileobj=zr, mode="r|") as tar:
            for m in tar:
                p = _safe_member_name(m.name, labels)
                if not m.isreg():
                    raise UnsafeArchive(f"archive member {m.name!r} is not a regular file (links/devices refused)")
                entry = want.get(m.name)
                if entry is None:
                    raise IntegrityError(f"archive member {m.name!r} is not listed in the manifest")
                if m.name in here:
                    raise IntegrityError(f"archive member {m.name!r} appears twice")
                if m.size != entry.size:
                    raise IntegrityError(f"archive member {m.name!r} has size {m.size}, manifest says {entry.size}")
                # Two writers racing on one key can publish segments that overlap (the CAS loser merges its whole
                # segment): an earlier segment's copy wins, as in Manifest.files(); this one is only verified.
                again = m.name in seen
                if not again:
                    total += m.size
                    if total > max_bytes or len(seen) + 1 > max_files:
                        raise UnsafeArchive(
                            f"restore exceeds the caps ({max_bytes} bytes / {max_files} files): refusing to unpack"
                        )
                src = tar.extractfile(m)
                assert src is not None
                here.add(m.name)
                # Staged flat (one file per name, no directory tree): directory creation and removal dominate a
                # restore's time on slow-metadata filesystems; the tree is made once, at commit.
                dest = staging[p.parts[0]] / f"{len(seen):08d}" if staging is not None and not again else None
                h = hashlib.sha256()
                with open(dest, "xb") if dest is not None else contextlib.nullcontext() as out:
                    while chunk := src.read(1 << 20):
                        h.update(chunk)
                        if out is not None:
                            out.write(chunk)
                if h.hexdigest() != entry.sha256:
                    raise IntegrityError(f"archive member {m.name!r} does not match its sha256")
                if not again:
                    seen.add(m.name)
                    written.append((m.name, dest))
    except (tarfile.TarError, zstandard.ZstdError, EOFError) as e:
        name = "segment" if isinstance(archive, bytes | bytearray) else archive.name
        raise IntegrityError(f"archive {name} is corrupt: {e}") from e
    missing = set(want) - here
    if missing:
        raise IntegrityError(f"archive lacks {len(missing)} file(s) the manifest lists, e.g. {sorted(missing)[0]!r}")
    return written, total
