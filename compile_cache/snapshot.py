"""Snapshots of cache directories: find what is new, pack it into a segment, unpack a segment safely.

A segment is a zstd-compressed tar of regular files named ``<root>/<relative path>`` (root: ``inductor``, and on GPU
``triton`` when Triton's cache lives elsewhere). Unpacking trusts nothing: every member must be a regular file with a
safe relative name that the manifest lists with the same size, and its content must match: through the object's
sha256, computed while the segment streams in (a restore), or through each member's own (``verify``, and any archive
unpacked without the object's hash); caps bound bytes and file count; files land in a staging directory first and
are moved into place only when the whole segment verified.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import tarfile
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import zstandard

from .errors import CacheError, IntegrityError, UnsafeArchive
from .manifest import FileEntry

__all__ = [
    "scan", "pack", "unpack_into_staging", "check_archive", "check_object", "Staged", "STAGING_PREFIX", "sha256_file",
    "read_member",
]

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


def pack(
    files: Mapping[str, Path], dest: Path, *, mtime_bump: int = 0, max_packed: int | None = None
) -> list[FileEntry]:
    """Write ``files`` (store path → local path), in the mapping's order, as a zstd tar to ``dest``; return their
    entries. ``mtime_bump`` seconds are added to every member's mtime, so the same files pack to other bytes. With
    ``max_packed``, no file is added once ``dest`` holds that many compressed bytes: the entries, a prefix of
    ``files``, say which went in.

    A file that vanished since the scan is left out (Inductor may clean up a temp file).
    """
    entries: list[FileEntry] = []
    cctx = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
    with open(dest, "wb") as raw, cctx.stream_writer(raw) as zw, tarfile.open(fileobj=zw, mode="w|") as tar:
        for name, src in files.items():
            if max_packed is not None and entries and raw.tell() >= max_packed:
                break  # (what the compressor still holds, a block or two, is not counted yet: about is enough)
            try:
                f = open(src, "rb")
            except FileNotFoundError:
                continue
            with f:
                st = os.fstat(f.fileno())
                info = tarfile.TarInfo(name)
                info.size, info.mode = st.st_size, 0o644
                info.mtime = int(st.st_mtime) + mtime_bump
                reader = _Source(f, None, None, hash_always=True)  # hashed as tarfile reads it: one read per byte
                tar.addfile(info, reader)  # type: ignore[arg-type]
                entries.append(FileEntry(path=name, size=reader.n, sha256=reader.h.hexdigest()))  # type: ignore[union-attr]
    return entries


def _safe_member_name(name: str, roots: Collection[str]) -> list[str]:
    """The parts of a member name, if it is a canonical relative path under one of the roots (what ``scan``
    writes: no empty, ``.`` or ``..`` part, no leading or trailing slash); UnsafeArchive otherwise."""
    parts = name.split("/")
    if len(parts) < 2 or parts[0] not in roots or "\0" in name or any(p in _BAD_PARTS for p in parts):
        raise UnsafeArchive(f"archive member {name!r} would escape the cache dir")
    if any(p.startswith(STAGING_PREFIX) for p in parts):
        raise UnsafeArchive(f"archive member {name!r} uses a reserved name")
    return parts


_BAD_PARTS = frozenset(("", ".", ".."))


@dataclass
class Staged:
    """Verified files waiting in a staging dir per root; ``commit`` moves them into place, ``discard`` drops them.

    A staging dir holds its files in the tree they will have in the root, so the directories are made while the
    restore still downloads (several segments at a time) and ``commit`` moves whole subtrees with one rename
    each: into an empty cache dir, a handful of renames, however many files and directories the entry has."""

    staging: dict[str, Path]
    files: list[tuple[str, str]]  # (store path, staged file)
    roots: Mapping[str, Path]

    def commit(self) -> int:
        """Move every staged file into its root, keeping files that already exist with the same size; return how
        many moved. A local file of another size than its verified copy is damaged (a crash or a full disk while
        it was written): Torch would load such a kernel as it is (tests/test_faults.py), so the copy replaces it.

        All or nothing: if a move fails (a regular file where a directory must go, a read-only dir), what was
        moved so far goes back before the error propagates. Renames within one filesystem need no new inode, so
        a disk that filled up after the unpack cannot stop a commit halfway."""
        trees: list[tuple[str, str]] = []  # (destination, staged) of subtrees moved in one rename
        files: list[str] = []  # files moved one by one (their directory existed already)
        kept = 0

        def merge(src: str, dest: str) -> None:
            nonlocal kept
            with os.scandir(src) as it:
                entries = sorted(it, key=lambda e: e.name)
            for e in entries:
                d = os.path.join(dest, e.name)
                if e.is_dir(follow_symlinks=False):
                    try:
                        os.rename(e.path, d)  # atomically refused if ``d`` is a non-empty directory: merge into it
                        trees.append((d, e.path))
                    except OSError as err:
                        if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                            raise
                        merge(e.path, d)
                    continue
                try:
                    st = os.stat(d)
                    if stat.S_ISREG(st.st_mode) and st.st_size == e.stat(follow_symlinks=False).st_size:
                        kept += 1
                        continue
                except (FileNotFoundError, NotADirectoryError):
                    pass
                os.replace(e.path, d)
                files.append(d)

        try:
            for label, staging in self.staging.items():
                merge(str(staging), str(self.roots[label]))
        except BaseException:
            for f in reversed(files):
                with contextlib.suppress(OSError):
                    os.unlink(f)
            for dest, staged in reversed(trees):
                with contextlib.suppress(OSError):
                    os.rename(dest, staged)  # back into staging, which discard removes
            raise
        finally:
            self.discard()
        return len(self.files) - kept

    def discard(self) -> None:
        for d in self.staging.values():
            shutil.rmtree(d, ignore_errors=True)


def unpack_into_staging(
    archive: Path | BinaryIO,
    expected: Iterable[FileEntry],
    roots: Mapping[str, Path],
    *,
    max_bytes: int,
    max_files: int,
    staged: Staged | None = None,
    sha256: str | None = None,
    size: int | None = None,
) -> Staged:
    """Decompress and verify ``archive`` (a file, or a stream such as an HTTP body) into staging dirs inside each
    root (same filesystem, so commit is a rename). Every member must be a regular file the manifest lists
    (``expected``) with the same size. Raises UnsafeArchive, IntegrityError or OSError (disk full, read-only dir),
    having removed everything it wrote, staging dirs included; pass ``staged`` to accumulate several segments (an
    error then discards all of them).

    With ``sha256`` and ``size`` (the object's, from the manifest), the compressed bytes are hashed as they are
    read, in the same pass, and must match before this returns: a download streams straight into staging, never
    through memory or a temp file, and nothing reaches the cache dir before the object is proven whole. Those
    bytes are then exactly what the writer packed (it hashed every member while packing), so the members' own
    hashes are not computed again. Without them, every member's sha256 is checked instead. An archive refused
    midway whose object does not match its sha256 raises that mismatch: the bytes are damaged, whatever they
    garbled."""
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
        total = sum(os.stat(p).st_size for _, p in staged.files)
        with open(archive, "rb") if isinstance(archive, Path) else contextlib.nullcontext(archive) as raw:
            written, _ = _unpack_object(
                _Source(raw, sha256, size), expected, roots, max_bytes=max_bytes, max_files=max_files, seen=seen,
                total=total, staging=staged.staging, hash_members=sha256 is None,
            )
        staged.files += [(n, p) for n, p in written if p is not None]
    except BaseException:
        staged.discard()
        raise
    return staged


def _unpack_object(source: _Source, *args: Any, **kw: Any) -> tuple[list[tuple[str, str | None]], int]:
    """:func:`_unpack_checked`, then the rest of the object, whose size and sha256 must match.

    An archive refused midway is either damaged bytes (a flipped bit can garble a tar header as well as a file) or
    a writer's bad archive. With the object's sha256 known, the rest is read first: a wrong size or sha256 is the
    error raised (chained to the archive's); an intact object keeps the archive's own error."""
    try:
        result = _unpack_checked(source, *args, **kw)
    except IntegrityError as refused:
        if source.want is not None:
            try:
                source.finish()
            except IntegrityError as damaged:
                raise damaged from refused
            except OSError:  # the store failed while draining: the archive's error is all that is known
                pass
        raise
    source.finish()
    return result


def check_object(
    f: BinaryIO, sha256: str, size: int, files: Iterable[FileEntry] | None = None, labels: Collection[str] = ()
) -> None:
    """Read the stream ``f`` to its end; IntegrityError unless it is ``size`` bytes with this sha256 and, given
    the segment's ``files``, an archive of exactly those that a restore into roots ``labels`` would unpack
    (UnsafeArchive otherwise). One pass, nothing written, members not hashed again (the object's hash covers
    them)."""
    source = _Source(f, sha256, size)
    if files is None:
        source.finish()
        return
    files = list(files)
    _unpack_object(
        source, files, labels, max_bytes=sum(x.size for x in files), max_files=len(files), seen=set(), total=0,
        staging=None, hash_members=False,
    )


def read_member(f: BinaryIO, name: str, files: Iterable[FileEntry], max_size: int = 1 << 20) -> bytes:
    """One file of a segment's archive (stream ``f``), read up to that member and no further, for a look at a
    small file without unpacking the entry (``inspect`` reading an export failure record). ``files`` is the
    segment's listing from the manifest: the member must be in it, with its size and sha256 (the manifest vouches
    for the content, as it does on a restore). Raises IntegrityError or UnsafeArchive."""
    want = {x.path: x for x in files}
    entry = want.get(name)
    if entry is None:
        raise IntegrityError(f"{name!r} is not listed in the segment")
    if entry.size > max_size:
        raise UnsafeArchive(f"{name!r} is {entry.size} bytes, more than the {max_size} this reads")
    try:
        zr = zstandard.ZstdDecompressor().stream_reader(f, read_size=_CHUNK, closefd=False)
        for member, regular, size, content in _TarReader(zr, _tar_bound(want.values())).members():
            if member != name:
                for _ in content() if regular else ():
                    pass
                continue
            if not regular or size != entry.size:
                raise IntegrityError(f"archive member {name!r} is not the file the manifest lists")
            data = b"".join(content())
            if hashlib.sha256(data).hexdigest() != entry.sha256:
                raise IntegrityError(f"archive member {name!r} does not match its sha256")
            return data
    except CacheError:
        raise
    except (tarfile.TarError, zstandard.ZstdError, EOFError, ValueError) as e:
        raise IntegrityError(f"archive is corrupt: {type(e).__name__}: {e}") from e
    raise IntegrityError(f"archive lacks {name!r}, which the manifest lists")


class _Source:
    """Bytes read through to their consumer (the decompressor; ``pack``'s tar writer), counted, and hashed when an
    expected sha256 is given (or ``hash_always``). ``finish`` reads what the consumer left (the end of the object)
    and checks both."""

    def __init__(self, f: BinaryIO, sha256: str | None, size: int | None, hash_always: bool = False) -> None:
        self.f, self.want, self.size = f, sha256, size
        self.what = f"object {sha256[:12]}" if sha256 else "archive"
        self.h = hashlib.sha256() if sha256 is not None or hash_always else None
        self.n = 0

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n if n is not None and n >= 0 else _CHUNK)
        self.n += len(b)
        if self.size is not None and self.n > self.size:
            raise IntegrityError(f"{self.what} is longer than the {self.size} bytes the manifest says")
        if self.h is not None:
            self.h.update(b)
        return b

    def finish(self) -> None:
        while self.read(_CHUNK):
            pass
        if self.size is not None and self.n != self.size:
            raise IntegrityError(f"{self.what} is {self.n} bytes, manifest says {self.size} (truncated?)")
        if self.h is not None and self.h.hexdigest() != self.want:
            raise IntegrityError(f"{self.what} does not match its sha256")


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
    with open(archive, "rb") as raw:
        _, total = _unpack_checked(
            _Source(raw, None, None), expected, labels, max_bytes=max_bytes, max_files=max_files,
            seen=set() if seen is None else seen, total=total, staging=None,
        )
    return total


def _unpack_checked(
    source: _Source,
    expected: Iterable[FileEntry],
    labels: Collection[str],
    *,
    max_bytes: int,
    max_files: int,
    seen: set[str],
    total: int,
    staging: Mapping[str, Path] | None,
    hash_members: bool = True,
) -> tuple[list[tuple[str, str | None]], int]:
    """The one place that decides whether an archive is safe (restore and ``verify`` share it). Writes each
    member under ``staging[root label]`` (or only reads it when ``staging`` is None), hashing it when
    ``hash_members`` (without the object's own sha256, nothing else vouches for its content); ``seen`` and ``total``
    carry earlier segments' files and bytes for the caps. Returns ([(store path, written file)], new total);
    files written before an error are left for the caller to discard with their staging dir."""
    want = {f.path: f for f in expected}
    written: list[tuple[str, str | None]] = []
    here: set[str] = set()
    made: set[str] = set()
    try:
        zr = zstandard.ZstdDecompressor().stream_reader(source, read_size=_CHUNK, closefd=False)
        for name, regular, size, content in _TarReader(zr, _tar_bound(want.values())).members():
            parts = _safe_member_name(name, labels)
            if not regular:
                raise UnsafeArchive(f"archive member {name!r} is not a regular file (links/devices refused)")
            entry = want.get(name)
            if entry is None:
                raise IntegrityError(f"archive member {name!r} is not listed in the manifest")
            if name in here:
                raise IntegrityError(f"archive member {name!r} appears twice")
            if size != entry.size:
                raise IntegrityError(f"archive member {name!r} has size {size}, manifest says {entry.size}")
            # Two writers racing on one key can publish segments that overlap (the CAS loser merges its whole
            # segment): an earlier segment's copy wins, as in Manifest.files(); this one is only verified.
            again = name in seen
            if not again:
                total += size
                if total > max_bytes or len(seen) + 1 > max_files:
                    raise UnsafeArchive(
                        f"restore exceeds the caps ({max_bytes} bytes / {max_files} files): refusing to unpack"
                    )
            here.add(name)
            # Staged in the tree the root will have (see Staged), each directory made once. Plain strings and
            # file descriptors: this runs once per file of a restore, with the GIL held, while other segments
            # wait for it.
            dest = None
            if staging is not None and not again:
                dest = os.path.join(staging[parts[0]], *parts[1:])
                parent = os.path.dirname(dest)
                if parent not in made:
                    os.makedirs(parent, exist_ok=True)
                    made.add(parent)
            h = hashlib.sha256() if hash_members else None
            fd = os.open(dest, _CREATE, 0o666) if dest is not None else -1
            try:
                for chunk in content():
                    if h is not None:
                        h.update(chunk)
                    if fd >= 0:
                        _write_all(fd, chunk)
            finally:
                if fd >= 0:
                    os.close(fd)
            if h is not None and h.hexdigest() != entry.sha256:
                raise IntegrityError(f"archive member {name!r} does not match its sha256")
            if not again:
                seen.add(name)
                written.append((name, dest))
    except CacheError:  # ours (IntegrityError is a ValueError too), and a store failing midway: as they are
        raise
    except (tarfile.TarError, zstandard.ZstdError, EOFError, ValueError) as e:  # ValueError: bad numbers, UTF-8
        raise IntegrityError(f"archive is corrupt: {type(e).__name__}: {e}") from e
    missing = set(want) - here
    if missing:
        raise IntegrityError(f"archive lacks {len(missing)} file(s) the manifest lists, e.g. {sorted(missing)[0]!r}")
    return written, total


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def _write_all(fd: int, data: bytes) -> None:
    n = os.write(fd, data)
    if n < len(data):  # rare for a regular file (a signal, a huge write): finish it
        view = memoryview(data)[n:]
        while view:
            view = view[os.write(fd, view) :]


def _tar_bound(files: Iterable[FileEntry]) -> int:
    """Most decompressed bytes an honest archive of ``files`` needs: each file padded to 512, its header, a PAX
    header for a long name, and the end marker. Reading past it is a bomb, whatever the zstd frame claims."""
    return sum(-(-f.size // 512) * 512 + 2048 + 2 * len(f.path.encode()) for f in files) + 2048


class _TarReader:
    """The members of a segment's tar, read by ``tarfile`` in stream mode: one forward pass over the decompressor
    (which reads the object's bytes through their sha256 as they arrive), never more than ``bound`` decompressed
    bytes (plus one read-ahead buffer) in all. Only regular files come out as such; a member that is not one
    comes out flagged, for the caller to refuse, and headers tarfile would act on (links, long names, global or
    sparse headers) are refused where they are parsed (:class:`_Header`). Why the standard library's reader and not
    one of our own: docs/benchmarks.md (Restore throughput, the tar reader)."""

    def __init__(self, zr: BinaryIO, bound: int) -> None:
        self.zr, self.left = zr, bound + _TAR_BUFSIZE + tarfile.RECORDSIZE

    def read(self, n: int = -1) -> bytes:
        b = self.zr.read(n if n >= 0 else _TAR_BUFSIZE)
        self.left -= len(b)
        if self.left < 0:
            raise UnsafeArchive("archive unpacks to more than its files need: refusing it (a decompression bomb?)")
        return b

    def members(self) -> Iterator[tuple[str, bool, int, Callable[[], Iterator[bytes]]]]:
        """(name, is a regular file, size, content chunks) per member; the first one that is not regular ends it."""
        with tarfile.open(fileobj=self, mode="r|", bufsize=_TAR_BUFSIZE, tarinfo=_Header) as tar:  # type: ignore[call-overload]
            for ti in tar:
                if ti.type not in _REGULAR or any(k.startswith("GNU.") for k in ti.pax_headers):  # GNU.*: sparse
                    yield ti.name, False, ti.size, lambda: iter(())
                    return
                f = tar.extractfile(ti)

                def content(f: Any = f) -> Iterator[bytes]:
                    while chunk := f.read(_CHUNK):
                        yield chunk

                yield ti.name, True, ti.size, content


class _Header(tarfile.TarInfo):
    """tarfile's header parser held to what ``pack`` writes. A damaged or truncated header is an error (tarfile
    takes one after the first member for the end of the archive), and any header but a regular file's or a PAX
    extended header (links, devices, directories, GNU long names, global or sparse headers) is refused as it is
    parsed, so tarfile never acts on it; a PAX header is capped at _MAX_PAX bytes before tarfile reads it."""

    @classmethod
    def frombuf(cls, buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo:
        try:
            info = super().frombuf(buf, encoding, errors)
        except tarfile.EOFHeaderError:  # a zero block: the end of the archive
            raise
        except tarfile.HeaderError as e:
            raise IntegrityError(f"archive is corrupt: {e}") from e
        if info.type == tarfile.XHDTYPE:
            if info.size > _MAX_PAX:
                raise UnsafeArchive(f"PAX header of {info.size} bytes refused")
        elif info.type not in _REGULAR:
            raise UnsafeArchive(f"archive member {info.name!r} is not a regular file (links/devices refused)")
        return info


_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE)
_TAR_BUFSIZE = 64 * 1024  # tarfile slices its buffer on every read: a larger one costs more per header
_MAX_PAX = 64 * 1024
_CHUNK = 1 << 20

