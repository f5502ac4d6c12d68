"""Packing new files into segments and putting them in a store: the write half of the segment format (the read
half, verified unpacking, is snapshot.unpack_into_staging). Store-agnostic and torch-free.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path

from .manifest import Segment
from .snapshot import pack, sha256_file
from .stores.base import Store

__all__ = ["SEGMENT_TARGET_BYTES", "SEGMENT_MAX_UNPACKED_BYTES", "put_segments"]

# New files go into segments of about SEGMENT_TARGET_BYTES in the store (compressed) and at most
# SEGMENT_MAX_UNPACKED_BYTES of files (or one larger file): an entry that compresses well still takes few requests
# (a cut by unpacked bytes alone makes many small objects, and each costs a request), and a large one still several
# segments to restore at a time. docs/benchmarks.md ("Segments and restore parallelism") compares the two cuts.
SEGMENT_TARGET_BYTES = 8 * 2**20
SEGMENT_MAX_UNPACKED_BYTES = 64 * 2**20


def _writer_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def put_segments(
    store: Store, files: Mapping[str, Path], avoid: Collection[str] = (), stop: Callable[[], bool] = lambda: False
) -> Iterator[tuple[Segment | None, int]]:
    """Pack and put ``files`` as segments, kernels first (see _batches): (segment, bytes sent) each. ``stop`` is
    asked before each one is packed; if it says so, (None, 0) ends the sequence. ``avoid``: sha256s of damaged
    objects, which a new segment must not be written as."""
    for batch in _batches(files):
        while batch:
            if stop():
                yield None, 0
                return
            seg, nbytes, batch = _put_segment(store, batch, avoid)
            if seg is None:
                break
            yield seg, nbytes


def _put_segment(
    store: Store, files: Mapping[str, Path], avoid: Collection[str]
) -> tuple[Segment | None, int, dict[str, Path]]:
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
            if sha not in avoid:
                break
            # The very bytes of a damaged object (same files, same mtimes): a create-only write would keep the
            # damaged copy under that name. Other header times give other bytes, hence another name.
            archive.unlink()
            entries = pack(packed, archive, mtime_bump=bump)
            sha = sha256_file(archive)
        size = archive.stat().st_size
        seg = Segment(sha256=sha, size=size, files=entries, written_by=_writer_id(), written_at=time.time())
        written = store.put_immutable(seg.object, archive)
    return seg, size if written else 0, rest


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
