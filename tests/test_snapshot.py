"""Snapshot round trip and the delta/merge protocol of restore and upload, on the local store (no torch compile needed)."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest
import zstandard

from compile_cache.entry import Entry
from compile_cache.errors import IntegrityError, UnsafeArchive
from compile_cache.manifest import FileEntry, Manifest, manifest_name
from compile_cache.restore import restore
from compile_cache.snapshot import pack, read_member, scan, unpack_into_staging
from compile_cache.stores import LocalStore
from compile_cache.stores.base import Store
from compile_cache.trust import TrustPolicy
from compile_cache.upload import Uploader

FACTORS = {"torch": "t", "python": "p", "device": "cpu", "cpu.isa": "X"}


def entry_at(store: Store, key: str, root: Path, factors: dict[str, str] = FACTORS) -> Entry:
    """The entry ``key`` restored into / uploaded from ``root``, unsigned (no signing key)."""
    return Entry(store, key, {"inductor": root}, factors, TrustPolicy())


def make_cache(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def test_scan_skips_locks_temp_and_headers(tmp_path: Path) -> None:
    make_cache(
        tmp_path,
        {
            "fxgraph/ab/entry": b"1",
            "ab/kernel.so": b"2",
            "locks/x.lock": b"",
            "precompiled_headers/h.gch": b"big",
            "ab/.123.tmp": b"",
            "compile_cache/log.txt": b"log",
        },
    )
    assert sorted(scan({"inductor": tmp_path})) == ["inductor/ab/kernel.so", "inductor/fxgraph/ab/entry"]


def test_pack_unpack_round_trip(tmp_path: Path) -> None:
    src = make_cache(tmp_path / "src", {"a/b.so": os.urandom(5000), "fxgraph/x/y": b"graph"})
    files = scan({"inductor": src})
    entries = pack(files, tmp_path / "seg.tar.zst")
    assert sorted(e.path for e in entries) == sorted(files)
    dest = tmp_path / "dest"
    staged = unpack_into_staging(tmp_path / "seg.tar.zst", entries, {"inductor": dest}, max_bytes=10**6, max_files=10)
    assert not (dest / "a" / "b.so").exists()  # nothing in place before commit
    assert staged.commit() == 2
    assert (dest / "a" / "b.so").read_bytes() == (src / "a" / "b.so").read_bytes()
    assert [p.name for p in dest.iterdir() if p.name.startswith(".")] == []  # staging removed


def test_read_member_reads_one_file_checked_against_the_listing(tmp_path: Path) -> None:
    root = make_cache(tmp_path / "c", {"a/first": os.urandom(5000), "aoti/k.failed.json": b"{}", "z/last": b"z"})
    entries = pack({f"inductor/{p}": root / p for p in ("a/first", "aoti/k.failed.json", "z/last")},
                   tmp_path / "seg.tar.zst")
    with open(tmp_path / "seg.tar.zst", "rb") as f:
        assert read_member(f, "inductor/aoti/k.failed.json", entries) == b"{}"
    forged = [e if e.path != "inductor/z/last" else e.model_copy(update={"sha256": "0" * 64}) for e in entries]
    with open(tmp_path / "seg.tar.zst", "rb") as f, pytest.raises(IntegrityError, match="sha256"):
        read_member(f, "inductor/z/last", forged)
    with open(tmp_path / "seg.tar.zst", "rb") as f, pytest.raises(IntegrityError, match="not listed"):
        read_member(f, "inductor/nope", entries)


def test_unpack_refuses_a_member_the_manifest_does_not_list(tmp_path: Path) -> None:
    src = make_cache(tmp_path / "src", {"a": b"1", "b": b"2"})
    entries = pack(scan({"inductor": src}), tmp_path / "seg")
    with pytest.raises(IntegrityError, match="not listed"):
        unpack_into_staging(tmp_path / "seg", entries[:1], {"inductor": tmp_path / "d"}, max_bytes=99, max_files=9)
    assert not any((tmp_path / "d").rglob("a"))


def _segment(tmp_path: Path, files: dict[str, bytes]) -> tuple[bytes, list, str]:
    src = make_cache(tmp_path / "src", files)
    entries = pack(scan({"inductor": src}), tmp_path / "seg")
    data = (tmp_path / "seg").read_bytes()
    return data, entries, hashlib.sha256(data).hexdigest()


def test_streamed_unpack_long_names_and_one_pass_verification(tmp_path: Path) -> None:
    """A stream (as an HTTP body) unpacks in one pass with the object's sha256: long names (PAX records) and
    nested directories come out as they went in, written through a chunked reader."""
    deep = "fxgraph/" + "/".join(["d" * 60] * 3) + "/entry"  # 200+ characters: a PAX path record
    files = {deep: os.urandom(3 * 2**20 + 7), "ab/k.so": os.urandom(1000), "ab/empty": b""}
    data, entries, sha = _segment(tmp_path, files)
    dest = tmp_path / "dest"
    staged = unpack_into_staging(
        _Trickle(data), entries, {"inductor": dest}, max_bytes=10**8, max_files=10, sha256=sha, size=len(data)
    )
    assert staged.commit() == 3
    assert {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*") if p.is_file()} == files


@pytest.mark.parametrize("damage", ["flip", "append", "truncate"])
def test_streamed_unpack_rejects_a_changed_object(tmp_path: Path, damage: str) -> None:
    """Member hashes are skipped when the object's own sha256 is given: a byte changed inside an incompressible
    file (stored raw by zstd, so it still decompresses and parses) must be caught by the object hash, and
    nothing reaches the cache dir."""
    payload = os.urandom(100_000)
    data, entries, sha = _segment(tmp_path, {"ab/k.so": payload, "fxgraph/e": b"graph"})
    at = data.index(payload[40_000:40_032])  # inside the raw block that holds the kernel
    bad = {
        "flip": data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :],
        "append": data + b"more",
        "truncate": data[:-1],
    }[damage]
    dest = tmp_path / "dest"
    with pytest.raises(IntegrityError):
        unpack_into_staging(
            io.BytesIO(bad), entries, {"inductor": dest}, max_bytes=10**6, max_files=9, sha256=sha, size=len(data)
        )
    assert [p for p in dest.rglob("*")] == []  # staging discarded, nothing in place
    if damage == "flip":  # the same bytes without the object's hash: the member's own sha256 catches it
        with pytest.raises(IntegrityError, match="does not match its sha256"):
            unpack_into_staging(io.BytesIO(bad), entries, {"inductor": dest}, max_bytes=10**6, max_files=9)


def test_a_damaged_header_is_blamed_on_the_object_not_the_writer(tmp_path: Path) -> None:
    """A flipped bit inside a compressed block can garble a tar header rather than a file. The object's sha256
    names the cause (damaged in storage or transit) whatever the bytes garbled; the same archive published with
    its own hash (a writer's bad archive) is refused for what it is."""
    data, entries, sha = _segment(tmp_path, {f"ab/k{i}.so": bytes(range(256)) * (i + 3) for i in range(6)})
    dest = tmp_path / "dest"

    def unpack(b: bytes, **check: object) -> None:
        staged = unpack_into_staging(io.BytesIO(b), entries, {"inductor": dest}, max_bytes=10**6, max_files=9, **check)
        staged.discard()  # a flip that changed nothing checked

    for i in range(len(data)):  # the first flip that garbles a header (found without the object's hash)
        bad = data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :]
        try:
            unpack(bad)
        except IntegrityError as e:
            if "checksum" in str(e):
                break
    else:
        pytest.fail("no flipped bit garbles a tar header")
    with pytest.raises(IntegrityError, match=r"^object [0-9a-f]{12} does not match its sha256"):
        unpack(bad, sha256=sha, size=len(data))
    with pytest.raises(IntegrityError, match=r"^archive is corrupt: .*checksum"):
        unpack(bad, sha256=hashlib.sha256(bad).hexdigest(), size=len(bad))
    assert [p for p in dest.rglob("*")] == []


def _four_segments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[LocalStore, dict, Path, Manifest]:
    """An entry of four files in four segments: (store, files, the dir they came from, its manifest)."""
    from compile_cache import segments

    monkeypatch.setattr(segments, "SEGMENT_MAX_UNPACKED_BYTES", 5000)
    store = LocalStore(tmp_path / "store")
    files = {f"k{i}/kernel.so": os.urandom(4000) for i in range(4)}
    cold = make_cache(tmp_path / "cold", files)
    Uploader(entry_at(store, "k", cold), "v").upload()
    m = Manifest.from_bytes(store.read(manifest_name("k")))
    assert len(m.segments) == 4
    return store, files, cold, m


def _one_upload_heals(store: LocalStore, cold: Path, found: str, also: str, dest: Path) -> None:
    """As a restore that stopped before reading ``also`` reports only ``found`` (which one runs first is up to the
    threads), the upload finds the other too, drops both, and the next restore is a hit with every file."""
    up = Uploader(entry_at(store, "k", cold), "v", drop={found})
    assert not up.upload().error
    assert up.drop == {found, also}
    r = restore(entry_at(store, "k", dest))
    assert r.status == "hit" and r.files == 4, r.reason


def test_one_upload_heals_every_damaged_segment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A restore stops at its first damaged object (segments not started yet are never read); the upload checks
    the other objects before it drops what is damaged, so the next restore is a hit, not another cold boot."""
    store, files, cold, m = _four_segments(tmp_path, monkeypatch)
    for seg in (m.segments[1], m.segments[3]):  # damage the second and the fourth
        path = store.root / seg.object
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data))
    r = restore(entry_at(store, "k", tmp_path / "a"))
    assert r.status == "rejected" and m.segments[1].sha256 in r.bad_segments
    _one_upload_heals(store, cold, m.segments[1].sha256, m.segments[3].sha256, tmp_path / "b")
    assert {str(p.relative_to(tmp_path / "b")): p.read_bytes() for p in (tmp_path / "b").rglob("*.so")} == files


def test_one_upload_drops_every_refused_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Archives whose objects match their hashes but that a restore refuses (a writer without the signing key
    published links): the upload's check of the other objects reads the archives too, so both go in one upload."""
    from compile_cache.manifest import Segment

    store, _, cold, m = _four_segments(tmp_path, monkeypatch)
    segments = list(m.segments)
    for i in (1, 3):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            link = tarfile.TarInfo(f"inductor/k{i}/link")
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(link)
        data = zstandard.ZstdCompressor().compress(buf.getvalue())
        sha = hashlib.sha256(data).hexdigest()
        seg = Segment(sha256=sha, size=len(data), files=[FileEntry(path=link.name, size=0, sha256="0" * 64)])
        (store.root / seg.object).parent.mkdir(parents=True, exist_ok=True)
        (store.root / seg.object).write_bytes(data)
        segments[i] = seg
    (store.root / manifest_name("k")).write_bytes(m.model_copy(update={"segments": segments}).to_bytes(None))
    r = restore(entry_at(store, "k", tmp_path / "a"))
    assert r.status == "rejected" and "not a regular file" in r.reason and segments[1].sha256 in r.bad_segments
    _one_upload_heals(store, cold, segments[1].sha256, segments[3].sha256, tmp_path / "b")


def _info(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mtime = size, kind, 1_700_000_000
    return info


def _unpack_tar(tmp_path: Path, tar: bytes, listed: list[FileEntry]) -> None:
    """Unpack the raw tar ``tar`` (compressed here) against a manifest that lists ``listed``; whatever it raises,
    nothing may be left in the cache dir."""
    (tmp_path / "seg").write_bytes(zstandard.ZstdCompressor().compress(tar))
    try:
        unpack_into_staging(tmp_path / "seg", listed, {"inductor": tmp_path / "d"}, max_bytes=10**6, max_files=9).discard()
    finally:
        assert list((tmp_path / "d").iterdir()) == []


def _tar(*infos: tarfile.TarInfo, fmt: int = tarfile.PAX_FORMAT, **kw: object) -> tuple[bytes, list[FileEntry]]:
    """A tar of these members (each regular one holding ``size`` bytes of "x") and a manifest listing every one."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, **kw) as tar:  # type: ignore[call-overload]
        for info in infos:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isreg() else None)
    listed = [FileEntry(path=i.name, size=i.size, sha256=hashlib.sha256(b"x" * i.size).hexdigest()) for i in infos]
    return buf.getvalue(), listed


def test_unpack_reads_names_as_writers_split_them(tmp_path: Path) -> None:
    """Long and non-ASCII names come back whole from a ustar prefix+name split and from PAX records, and old-style
    regular files (type NUL) are regular files."""
    names = ["inductor/" + "d" * 90 + "/" + "e" * 40, "inductor/fxgraph/é/ß", "inductor/" + "f/" * 120 + "g"]
    for fmt in (tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT):
        infos = [_info(n, 3, tarfile.AREGTYPE if n.endswith("ß") else tarfile.REGTYPE) for n in names]
        tar, listed = _tar(*(infos if fmt == tarfile.PAX_FORMAT else infos[:1]), fmt=fmt)
        shutil.rmtree(tmp_path / "d", ignore_errors=True)
        (tmp_path / "seg").write_bytes(zstandard.ZstdCompressor().compress(tar))
        staged = unpack_into_staging(tmp_path / "seg", listed, {"inductor": tmp_path / "d"}, max_bytes=99, max_files=9)
        assert staged.commit() == len(listed)
        assert sorted(f"inductor/{p.relative_to(tmp_path / 'd').as_posix()}" for p in (tmp_path / "d").rglob("*")
                      if p.is_file()) == sorted(x.path for x in listed)


def _gnu_long_name() -> tuple[bytes, list[FileEntry]]:
    return _tar(_info("inductor/" + "n" * 120, 1), fmt=tarfile.GNU_FORMAT)


def _sparse_record() -> tuple[bytes, list[FileEntry]]:
    info = _info("inductor/s", 1)
    info.pax_headers = {"GNU.sparse.size": "1"}
    return _tar(info)


@pytest.mark.parametrize(
    "archive",
    [
        *(lambda k=k: _tar(_info("inductor/x", 0, k)) for k in (
            tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE,
            tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE,
        )),
        _gnu_long_name,
        lambda: _tar(_info("inductor/x", 1), pax_headers={"comment": "global"}),  # a global PAX header first
        _sparse_record,
    ],
    ids=["dir", "symlink", "hardlink", "chardev", "blockdev", "fifo", "contiguous", "gnu-sparse", "gnu-long-name",
         "pax-global", "pax-sparse"],
)
def test_unpack_refuses_every_header_but_a_regular_file(tmp_path: Path, archive: Any) -> None:
    """Only regular files and PAX extended headers (what pack writes) pass, even when the manifest lists the
    member: links and devices never land, and headers a reader would act on (GNU long names, global or sparse
    headers) are refused before they are acted on."""
    tar, listed = archive()
    with pytest.raises(UnsafeArchive, match="not a regular file"):
        _unpack_tar(tmp_path, tar, listed)


def test_unpack_refuses_malformed_headers(tmp_path: Path) -> None:
    """A damaged header anywhere, a bad number, a missing end and an oversized PAX header are refused; a damaged
    header after the first member is not taken for the end of the archive."""
    tar, listed = _tar(_info("inductor/a", 10), _info("inductor/b", 10))
    _unpack_tar(tmp_path, tar, listed)  # intact: unpacks (and the helper's check sees the staging dir gone)
    second = 1024  # the second member's header: after the first's header and its one block of data
    assert tar[second:].startswith(b"inductor/b")
    for at in (0, second):
        damaged = tar[: at + 3] + bytes([tar[at + 3] ^ 1]) + tar[at + 4 :]
        with pytest.raises(IntegrityError, match="archive is corrupt: .*checksum"):
            _unpack_tar(tmp_path, damaged, listed)

    def with_size(field: bytes) -> bytes:  # the second header with this size field and a correct checksum
        h = bytearray(tar[second : second + 512])
        h[124:136], h[148:156] = field, b" " * 8
        h[148:156] = b"%06o\0 " % sum(h)
        return tar[:second] + bytes(h) + tar[second + 512 :]

    for bad in (b"0000000001 9", b"0000000001x\0"):
        with pytest.raises(IntegrityError, match="archive is corrupt"):
            _unpack_tar(tmp_path, with_size(bad), listed)
    with pytest.raises(IntegrityError, match="archive is corrupt"):  # no end-of-archive blocks
        _unpack_tar(tmp_path, tar[: second + 1024], listed)
    big = _info("inductor/a", 1)
    big.pax_headers = {"comment": "c" * (64 * 1024)}
    with pytest.raises(UnsafeArchive, match="PAX header"):
        _unpack_tar(tmp_path, *_tar(big))


@pytest.mark.parametrize("name", ["inductor//a", "inductor/./a", "inductor/a/", "inductor", "/inductor/a", "x/a"])
def test_unpack_refuses_names_that_are_not_canonical(tmp_path: Path, name: str) -> None:
    """Member names must be exactly what scan writes: every one is refused before anything is written, even when
    a (crafted) manifest lists it."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = 1
        tar.addfile(info, io.BytesIO(b"1"))
    (tmp_path / "seg").write_bytes(zstandard.ZstdCompressor().compress(buf.getvalue()))
    entry = FileEntry(path=name, size=1, sha256=hashlib.sha256(b"1").hexdigest())
    with pytest.raises(UnsafeArchive, match="escape"):
        unpack_into_staging(tmp_path / "seg", [entry], {"inductor": tmp_path / "d"}, max_bytes=99, max_files=9)
    assert list((tmp_path / "d").iterdir()) == []


class _Trickle(io.RawIOBase):
    """A stream that returns at most 4093 bytes per read, as a network body may."""

    def __init__(self, data: bytes) -> None:
        self.buf = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        return self.buf.read(min(n if n >= 0 else 4093, 4093))


def test_restore_then_upload_is_a_delta(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    c1 = make_cache(tmp_path / "c1", {"k/one.so": b"one" * 100, "fxgraph/a/b": b"g1"})
    up = Uploader(entry_at(store, "key1", c1), "v1")
    r = up.upload()
    assert r is not None and r.files == 2 and r.bytes_uploaded > 0
    assert up.upload().bytes_uploaded == 0  # nothing new: no bytes

    c2 = tmp_path / "c2"
    rr = restore(entry_at(store, "key1", c2))
    assert rr.status == "hit" and rr.files == 2
    assert (c2 / "k" / "one.so").read_bytes() == b"one" * 100
    make_cache(c2, {"k/two.so": b"two"})
    up2 = Uploader(entry_at(store, "key1", c2), "v1", known=set(rr.manifest.files()),
                   manifest=rr.manifest, token=rr.token)
    r2 = up2.upload()
    assert r2.files == 1  # only the new file
    m = Manifest.from_bytes(store.read(manifest_name("key1")))
    assert sorted(m.files()) == ["inductor/fxgraph/a/b", "inductor/k/one.so", "inductor/k/two.so"]


def test_concurrent_writers_merge(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    a = Uploader(entry_at(store, "k", make_cache(tmp_path / "a", {"a.so": b"a"})), "v1")
    b = Uploader(entry_at(store, "k", make_cache(tmp_path / "b", {"b.so": b"b"})), "v1")
    a._read_or_reset()  # both read "no manifest" ...
    b._read_or_reset()
    assert a.upload().files == 1 and b.upload().files == 1  # ... and the second merges instead of overwriting
    m = Manifest.from_bytes(store.read(manifest_name("k")))
    assert sorted(m.files()) == ["inductor/a.so", "inductor/b.so"]


def test_restore_statuses(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    assert restore(entry_at(store, "nope", tmp_path / "c")).status == "miss"
    Uploader(entry_at(store, "k", make_cache(tmp_path / "a", {"a.so": b"a"})), "v1").upload()
    foreign = {**FACTORS, "torch": "other"}
    r = restore(entry_at(store, "k", tmp_path / "c", foreign))
    assert r.status == "rejected" and "foreign" in r.reason
    assert not (tmp_path / "c" / "a.so").exists()


def test_compaction_repacks_many_segments_into_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import compile_cache.upload as upload

    monkeypatch.setattr(upload, "MAX_SEGMENTS", 4)
    store = LocalStore(tmp_path / "store")
    cache = tmp_path / "c"
    up = Uploader(entry_at(store, "k", cache), "v1")
    for i in range(5):  # five boots, each compiling one new kernel: five segments ...
        make_cache(cache, {f"k/{i}.so": os.urandom(100)})
        up.upload()
    m = Manifest.from_bytes(store.read(manifest_name("k")))
    assert len(m.segments) == 1  # ... compacted by the writer that saw more than MAX_SEGMENTS
    assert sorted(m.files()) == [f"inductor/k/{i}.so" for i in range(5)]
    r = restore(entry_at(store, "k", tmp_path / "fresh"))
    assert r.status == "hit" and r.files == 5
    assert (tmp_path / "fresh" / "k" / "4.so").read_bytes() == (cache / "k" / "4.so").read_bytes()


def test_pack_stops_at_its_compressed_budget_and_says_what_went_in(tmp_path: Path) -> None:
    src = make_cache(tmp_path / "src", {f"k/{i:02d}.so": os.urandom(100_000) for i in range(20)})
    files = {n: src / n.split("/", 1)[1] for n in sorted(scan({"inductor": src}), reverse=True)}  # not name order
    entries = pack(files, tmp_path / "seg", max_packed=500_000)
    assert [e.path for e in entries] == list(files)[: len(entries)]  # a prefix, in the order given
    # Random bytes do not compress: about 500 KB of them, give or take what the compressor still held (a block).
    assert 3 <= len(entries) <= 9
    assert 500_000 <= (tmp_path / "seg").stat().st_size < 1_000_000
    staged = unpack_into_staging(tmp_path / "seg", entries, {"inductor": tmp_path / "d"}, max_bytes=10**7, max_files=99)
    assert staged.commit() == len(entries)


def test_segments_are_sized_by_what_they_weigh_in_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Segments hold about SEGMENT_TARGET_BYTES of compressed bytes, and at most SEGMENT_MAX_UNPACKED_BYTES of files:
    files that compress well take few objects (few requests to restore), random ones take many."""
    import compile_cache.segments as segments

    monkeypatch.setattr(segments, "SEGMENT_TARGET_BYTES", 400_000)
    monkeypatch.setattr(segments, "SEGMENT_MAX_UNPACKED_BYTES", 10**7)
    store = LocalStore(tmp_path / "store")
    kernel = b"".join(b"out[%d] = a[%d] * b[%d];\n" % (i, i, i) for i in range(3000))  # ~85 KB, compresses
    padded = {f"k/{i:02d}.so": kernel + bytes(200_000) for i in range(30)}  # 8.5 MB of files
    noise = {f"n/{i:02d}.so": os.urandom(100_000) for i in range(30)}  # 3 MB, incompressible
    cache = make_cache(tmp_path / "c", {**padded, **noise, "fxgraph/g/entry": b"graph"})
    r = Uploader(entry_at(store, "k", cache), "v1").upload()
    assert r is not None and not r.error and r.files == 61
    m = Manifest.from_bytes(store.read(manifest_name("k")))
    sizes = [(seg.size, seg.unpacked_bytes, [f.path for f in seg.files]) for seg in m.segments]
    # The 30 compressible files (8.5 MB) share one object; the first random ones join it up to its target.
    assert len([s for s in sizes if any("/k/" in p for p in s[2])]) == 1
    # 3 MB of random files take objects of at most the target, give or take what the compressor held (a block or two).
    random_only = [s for s in sizes if all("/n/" in p for p in s[2])]
    assert len(random_only) >= 4 and all(s[0] < 400_000 + 300_000 for s in random_only)
    # Kernels first, graph entries last, whatever the cuts.
    assert [p for s in sizes for p in s[2]][-1] == "inductor/fxgraph/g/entry"
    rr = restore(entry_at(store, "k", tmp_path / "fresh"))
    assert rr.status == "hit" and rr.files == 61
    assert (tmp_path / "fresh" / "n" / "07.so").read_bytes() == noise["n/07.so"]

    monkeypatch.setattr(segments, "SEGMENT_MAX_UNPACKED_BYTES", 2_000_000)  # the cap on files cuts compressible ones
    r = Uploader(entry_at(store, "k2", make_cache(tmp_path / "c2", padded)), "v1").upload()
    assert r is not None and r.segments == 5  # 30 files of 285 KB, 7 to a batch


def test_a_deadline_stops_the_upload_between_segments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The deadline is checked before each segment is packed: past it, what is published stays and the rest waits
    for a later upload; an upload that beats it is complete, even when the deadline passes right after."""
    import time

    store, _, cold, _ = _four_segments(tmp_path, monkeypatch)  # published; three more files come now
    make_cache(cold, {f"more/{i}.so": os.urandom(4000) for i in range(3)})
    up = Uploader(entry_at(store, "k", cold), "v")
    up.on_progress = lambda r: setattr(up, "deadline", time.monotonic() - 1)  # out of time after the first
    r = up.upload(deadline=time.monotonic() + 3600)
    assert r is not None and not r.complete and r.segments == 1 and r.files == 1
    assert len(up.pending()) == 2  # left for a later upload

    up.deadline = None
    up.on_progress = lambda r: setattr(up, "deadline", time.monotonic() - 1)  # passes after the last one too
    monkeypatch.setattr("compile_cache.segments.SEGMENT_MAX_UNPACKED_BYTES", 10**6)
    r = up.upload()
    assert r is not None and r.complete and r.segments == 1 and r.files == 2 and up.pending() == {}


def test_restore_options_defaults_are_the_settings_defaults() -> None:
    """A restore called without options (scripts, tools) applies the caps and deadline a boot applies by default."""
    from compile_cache.config import Settings
    from compile_cache.restore import RestoreOptions

    defaults = Settings.model_construct()
    assert RestoreOptions.from_settings(defaults) == RestoreOptions()
    custom = defaults.model_copy(update={"restore_timeout_s": 5.0, "max_restore_bytes": 10, "max_restore_files": 3})
    assert RestoreOptions.from_settings(custom) == RestoreOptions(timeout_s=5.0, max_bytes=10, max_files=3)
