"""The fault matrix: a bad cache costs a cold compile, never a failed boot or foreign code.

One good entry comes from the session's single cold boot of the tiny predictor (``tiny_seeded_store``), re-signed
here with a test key; every test copies it into a fresh store and breaks the copy. Two levels:

- Store rows run against both stores (``store``: a local directory and the real S3 server) at the level of what
  the lifecycle does: ``restore`` into fresh dirs, then the background ``Uploader`` over the files a cold compile
  leaves (the seed's own files). They assert: the right status, nothing placed in the cache dirs (so nothing can
  be loaded), the store not made worse, ``verify`` names the problem, no secret in any message.
- Boot rows start a fresh process (tests/boot.py) with an empty TORCHINDUCTOR_CACHE_DIR and assert: setup
  succeeds (cold or eager), the outputs equal eager ones computed here, nothing loaded from the entry (no file
  restored, no precompiled function loaded, no FX-graph hit), the store not made
  worse, and neither the signing key nor the S3 secret appears in stderr, the log file or the metrics. A rejected
  entry costs a cold compile (~25 s here), so only a representative subset of rows boots.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import torch
import zstandard

from compile_cache.entry import Entry as CacheEntry
from compile_cache.errors import UnsafeArchive
from compile_cache.key import CacheKey, fingerprint_of
from compile_cache.lease import is_lease_name
from compile_cache.manifest import FileEntry, Manifest, Segment, manifest_name, object_name
from compile_cache.restore import RestoreOptions, restore
from compile_cache.snapshot import STAGING_PREFIX, unpack_into_staging
from compile_cache.stores import LocalStore, Store, open_store
from compile_cache.trust import TrustPolicy
from compile_cache.upload import Uploader
from compile_cache.verify import verify_entry
from tests.conftest import Boot, boot, precompiled
from tests.s3server import apply_s3_env, free_ports
from tests.tiny_predictor import BATCHES, TinyMLP, inputs

TARGET = "tests.tiny_predictor:Predictor"
SIGNING_KEY = "sk-test-" + secrets.token_hex(16)  # distinctive, so a leak into any text is found by substring
KEY = SIGNING_KEY.encode()
OTHER_KEY = b"sk-other-" + secrets.token_hex(16).encode()


# -- the good entry -----------------------------------------------------------------------------------------------
@dataclass
class Good:
    store_dir: Path  # a local store holding exactly the good, signed entry
    key: str
    manifest: Manifest
    cold_dir: Path  # what a cold compile leaves in the Inductor dir (restored from the entry)

    @property
    def factors(self) -> dict[str, str]:
        return dict(self.manifest.factors)


@pytest.fixture(scope="module")
def good(tiny_seeded_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Good:
    d = tmp_path_factory.mktemp("good")
    shutil.copytree(tiny_seeded_store, d / "store")
    st = LocalStore(d / "store")
    (name,) = [o.name for o in st.list("entries/") if o.name.endswith("/manifest.json")]  # not the build lease
    key = name.split("/")[1]
    data, token = st.read_versioned(name)
    m = Manifest.from_bytes(data)
    st.put_conditional(name, m.to_bytes(KEY), token)  # exactly what an uploader with COMPILE_CACHE_SIGNING_KEY writes
    m = Manifest.from_bytes(st.read(name))
    r = restore(CacheEntry(st, key, {"inductor": d / "cold"}, m.factors, TrustPolicy(KEY, require_signed=True)))
    assert r.status == "hit", r.reason
    return Good(d / "store", key, m, d / "cold")


@pytest.fixture(scope="module")
def expected() -> dict[int, list[list[float]]]:
    with torch.no_grad():
        model = TinyMLP()
        return {b: model(inputs(b)).tolist() for b in BATCHES}


def assert_correct(b: Boot, expected: dict[int, list[list[float]]]) -> None:
    assert b.outputs, b.stderr[-2000:]
    for batch, out in zip(BATCHES, b.outputs, strict=True):
        assert torch.allclose(torch.tensor(out), torch.tensor(expected[batch]), atol=1e-5), (batch, out)


# -- a store holding a copy of the good entry, and ways to break it ----------------------------------------------
@dataclass
class Entry:
    store: Store
    key: str
    good: Good
    raw_put: Any  # (name, bytes) -> None: overwrite an object behind the store's back, like an attacker or bit rot
    secrets: tuple[str, ...]  # texts that must never appear anywhere

    @property
    def mname(self) -> str:
        return manifest_name(self.key)

    @property
    def object(self) -> str:
        return self.good.manifest.segments[0].object

    def state(self) -> dict[str, bytes]:
        return {o.name: self.store.read(o.name) for o in self.store.list("")}

    def set_manifest(self, data: bytes, key: str | None = None) -> None:
        self.raw_put(manifest_name(key or self.key), data)


def _fill(st: Store, src: Path) -> None:
    """Copy every object of the local store ``src`` into ``st`` through the store API."""
    for o in LocalStore(src).list(""):
        if o.name.startswith("entries/"):
            st.put_conditional(o.name, (src / o.name).read_bytes(), None)
        else:
            assert st.put_immutable(o.name, src / o.name)


@pytest.fixture
def entry(store: Store, good: Good, request: pytest.FixtureRequest, tmp_path: Path) -> Entry:
    _fill(store, good.store_dir)
    if isinstance(store, LocalStore):

        def raw_put(name: str, data: bytes) -> None:
            p = store.root / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)

        hidden: tuple[str, ...] = (SIGNING_KEY, OTHER_KEY.decode())
    else:
        seaweed = request.getfixturevalue("seaweed")
        client = seaweed.client()

        bucket, prefix = store.bucket, store.prefix  # type: ignore[attr-defined]

        def raw_put(name: str, data: bytes) -> None:
            client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=data)

        hidden = (SIGNING_KEY, OTHER_KEY.decode(), seaweed.secret_key)
    return Entry(store, good.key, good, raw_put, hidden)


def flip_byte(data: bytes, at: int | None = None) -> bytes:
    i = len(data) // 2 if at is None else at
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]


# -- what the lifecycle does around a restore ---------------------------------------------------------------------
@dataclass
class Outcome:
    status: str
    reason: str
    upload_error: str
    bytes_downloaded: int


def restore_then_upload(
    e: Entry,
    roots: dict[str, Path],
    *,
    key: str | None = None,
    factors: dict[str, str] | None = None,
    signing_key: bytes | None = None,
    require_signed: bool = False,
    store: Store | None = None,
    timeout_s: float = 60.0,
    max_bytes: int = 8 * 2**30,
    max_files: int = 200_000,
    upload: bool = True,
) -> Outcome:
    """Setup's steps 1 and 4 (lifecycle.py) with the compile in between replaced by its result: restore; assert
    nothing was placed in the dirs; copy in what a cold compile writes; run the background upload."""
    key, factors, store = key or e.key, factors or e.good.factors, store or e.store
    entry = CacheEntry(store, key, roots, factors, TrustPolicy(signing_key, require_signed=require_signed))
    r = restore(entry, RestoreOptions(timeout_s, max_bytes, max_files))
    assert r.status in ("error", "rejected"), (r.status, r.reason)
    assert_nothing_placed(roots)
    if not upload:
        return Outcome(r.status, r.reason, "", r.bytes_downloaded)
    shutil.copytree(e.good.cold_dir, roots["inductor"], dirs_exist_ok=True)
    up = Uploader(
        entry, e.good.manifest.model_version,
        known=set(r.manifest.files()) if r.manifest else set(), manifest=r.manifest, token=r.token,
        drop=set(r.bad_segments),
    )
    u = up.upload()
    assert u is not None
    out = Outcome(r.status, r.reason, u.error, r.bytes_downloaded)
    assert_no_secrets([out.reason, out.upload_error], e.secrets)
    return out


def assert_nothing_placed(roots: dict[str, Path]) -> None:
    """No file and no staging dir left in any cache dir: nothing of the entry can be loaded."""
    for root in roots.values():
        left = [p for p in root.rglob("*")] if root.exists() else []
        assert left == [], left


def assert_no_secrets(texts: Iterable[str], hidden: Iterable[str]) -> None:
    for t in texts:
        for s in hidden:
            assert s not in t, "a secret leaked into a message, a log or the metrics"


def assert_not_worse(
    e: Entry,
    before: dict[str, bytes],
    *,
    key: str | None = None,
    trust: TrustPolicy | None = None,
    factors: dict[str, str] | None = None,
) -> None:
    """Every object that was there is byte for byte the same; the manifest is unchanged, or only grew by verified
    segments, or was replaced by one that verifies; every new object is listed by the manifest (no garbage)."""
    key = key or e.key
    after = e.state()
    mname = manifest_name(key)
    for name, data in before.items():
        if name != mname:
            assert after.get(name) == data, f"{name} changed or vanished"
    if after.get(mname) != before.get(mname):
        rep = verify_entry(e.store, key, trust or TrustPolicy(), factors=factors)
        if not rep.ok:  # not healed: then it may only have grown by good segments
            old, new = Manifest.from_bytes(before[mname]), Manifest.from_bytes(after[mname])
            assert {s.sha256 for s in old.segments} <= {s.sha256 for s in new.segments}, rep.problems
            for seg in new.segments:
                if seg.sha256 not in {s.sha256 for s in old.segments}:
                    assert hashlib.sha256(after[seg.object]).hexdigest() == seg.sha256
    listed = {s.object for s in Manifest.from_bytes(after[mname]).segments} if mname in after else set()
    for name in set(after) - set(before):
        # A build lease is the record of a boot's build (a failed one says why), not garbage.
        assert name in listed or name == mname or is_lease_name(name), f"unlisted new object {name}"


# -- store rows: both stores --------------------------------------------------------------------------------------
@pytest.mark.serial  # bounds wall time
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_store_unreachable(
    kind: str, good: Good, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    if kind == "local":
        (tmp_path / "not-a-dir").write_text("")  # a store path that cannot be reached (like a vanished mount)
        st: Store = LocalStore(tmp_path / "not-a-dir" / "store")
        hidden: tuple[str, ...] = (SIGNING_KEY,)
    else:
        from compile_cache.stores.s3 import S3Store

        env = request.getfixturevalue("s3_env")
        apply_s3_env(monkeypatch, {**env, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{free_ports(1)[0]}"})
        st = S3Store.from_url(env["COMPILE_CACHE_URL"], connect_timeout=1, read_timeout=2, max_attempts=2)
        hidden = (SIGNING_KEY, env["AWS_SECRET_ACCESS_KEY"])
    e = Entry(st, good.key, good, None, hidden)
    t0 = time.monotonic()
    out = restore_then_upload(e, {"inductor": tmp_path / "ind"}, signing_key=KEY)
    assert out.status == "error" and time.monotonic() - t0 < 15
    assert out.upload_error  # the upload fails too, quietly
    assert not verify_entry(st, good.key, TrustPolicy(KEY)).ok


@pytest.mark.serial  # bounds wall time
def test_store_slower_than_the_restore_deadline(entry: Entry, tmp_path: Path) -> None:
    slow = SlowStore(entry.store, delay=1.5)
    roots = {"inductor": tmp_path / "ind"}
    before = entry.state()
    t0 = time.monotonic()
    out = restore_then_upload(entry, roots, store=slow, timeout_s=0.5, upload=False)
    assert out.status == "error" and "COMPILE_CACHE_RESTORE_TIMEOUT_S" in out.reason
    assert time.monotonic() - t0 < 1.5
    # The helper thread finishes its download later: it must not move anything into place behind the compile.
    for th in threading.enumerate():
        if th.name == "compile-cache-restore":
            th.join(15)
    assert_nothing_placed(roots)
    assert entry.state() == before


def test_truncated_object(entry: Entry, tmp_path: Path) -> None:
    data = entry.store.read(entry.object)
    entry.raw_put(entry.object, data[: len(data) // 2])
    before = entry.state()
    out = restore_then_upload(entry, {"inductor": tmp_path / "ind"}, signing_key=KEY)
    assert out.status == "rejected" and "truncated" in out.reason
    assert_not_worse(entry, before, trust=TrustPolicy(KEY, require_signed=True))
    assert_healed(entry, tmp_path)


def assert_healed(e: Entry, tmp_path: Path) -> None:
    """The cold boot's upload left the damaged segment out and published its files anew (under another name even
    where they pack to the damaged object's original bytes: the cold dir is a copy with the same mtimes): the
    entry verifies and the next container's restore is a hit. The damaged object stays for `prune`."""
    assert e.object not in {s.object for s in Manifest.from_bytes(e.store.read(e.mname)).segments}
    assert verify_entry(e.store, e.key, TrustPolicy(KEY, require_signed=True)).ok
    r = restore(CacheEntry(e.store, e.key, {"inductor": tmp_path / "next"}, e.good.factors, TrustPolicy(KEY)))
    assert r.status == "hit", r.reason
    assert r.files == len(e.good.manifest.files())


def test_one_flipped_byte(entry: Entry, tmp_path: Path) -> None:
    entry.raw_put(entry.object, flip_byte(entry.store.read(entry.object)))
    before = entry.state()
    out = restore_then_upload(entry, {"inductor": tmp_path / "ind"}, signing_key=KEY)
    assert out.status == "rejected" and "sha256" in out.reason
    assert_not_worse(entry, before, trust=TrustPolicy(KEY, require_signed=True))
    assert_healed(entry, tmp_path)


def test_manifest_edited_after_signing(entry: Entry, tmp_path: Path) -> None:
    body = json.loads(entry.store.read(entry.mname))
    body["segments"][0]["written_by"] = "mallory:1"  # any edit; the signature stays the old one
    entry.set_manifest(json.dumps(body).encode())
    before = entry.state()
    out = restore_then_upload(entry, {"inductor": tmp_path / "ind"}, signing_key=KEY)
    assert out.status == "rejected" and "signature does not verify" in out.reason
    assert "leaving it as it is" in out.upload_error  # the uploader never re-signs what it could not verify
    assert entry.state() == before
    assert not verify_entry(entry.store, entry.key, TrustPolicy(KEY)).ok


def test_wrong_signing_key(entry: Entry, tmp_path: Path) -> None:
    before = entry.state()
    out = restore_then_upload(entry, {"inductor": tmp_path / "ind"}, signing_key=OTHER_KEY, require_signed=True)
    assert out.status == "rejected" and "signature does not verify" in out.reason
    assert out.upload_error  # a replica with another key must not flip-flop the fleet's entry
    assert entry.state() == before
    rep = verify_entry(entry.store, entry.key, TrustPolicy(OTHER_KEY))
    assert not rep.ok
    assert_no_secrets([str(rep)], entry.secrets)


def test_unsigned_entry_while_signing_is_required(entry: Entry, tmp_path: Path) -> None:
    entry.set_manifest(entry.good.manifest.to_bytes(None))
    before = entry.state()
    out = restore_then_upload(entry, {"inductor": tmp_path / "ind"}, signing_key=KEY, require_signed=True)
    assert out.status == "rejected" and "unsigned" in out.reason
    assert out.upload_error == ""
    # The uploader replaced the unsigned manifest by a signed one of its own files (never signing the old one).
    assert_not_worse(entry, before, trust=TrustPolicy(KEY, require_signed=True), factors=entry.good.factors)
    assert verify_entry(entry.store, entry.key, TrustPolicy(KEY, require_signed=True)).ok


def test_entry_with_a_foreign_fingerprint(entry: Entry, tmp_path: Path) -> None:
    g = entry.good
    factors2 = {**g.factors, "compile.fullgraph": str(g.factors["compile.fullgraph"] != "True")}
    key2 = CacheKey(g.manifest.model_version, factors2).name
    assert key2 != g.key
    # Copied as is under the other key (the key field inside still names the original) ...
    entry.set_manifest(entry.store.read(entry.mname), key=key2)
    out = restore_then_upload(entry, {"inductor": tmp_path / "a"}, key=key2, factors=factors2, upload=False)
    assert out.status == "rejected" and "written for key" in out.reason
    # ... and with the key field rewritten too (unsigned: whoever did it had no key): the fingerprint decides.
    body = g.manifest.model_dump(mode="json")
    body.update(key=key2, signature=None)
    entry.set_manifest(json.dumps(body).encode(), key=key2)
    before = entry.state()
    out = restore_then_upload(entry, {"inductor": tmp_path / "b"}, key=key2, factors=factors2)
    assert out.status == "rejected" and "foreign" in out.reason
    assert_not_worse(entry, before, key=key2, factors=factors2)  # replaced by one of the right environment
    rep = verify_entry(entry.store, g.key, TrustPolicy(), factors=factors2)
    assert not rep.ok and any("foreign" in p for p in rep.problems)


# -- crafted archives (what a writer without the key could publish; readers without REQUIRE_SIGNED load it) -----
def craft(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return zstandard.ZstdCompressor().compress(buf.getvalue())


def regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def publish_crafted(e: Entry, tmp: Path, archive: bytes, files: list[FileEntry]) -> None:
    """Put ``archive`` as a content-addressed object and make the entry's manifest list only it (unsigned)."""
    sha = hashlib.sha256(archive).hexdigest()
    (tmp / "crafted").write_bytes(archive)
    e.store.put_immutable(object_name(sha), tmp / "crafted")
    g = e.good.manifest
    m = Manifest(
        key=e.key, model_version=g.model_version, fingerprint=fingerprint_of(g.factors), factors=g.factors,
        segments=[Segment(sha256=sha, size=len(archive), files=files)],
    )
    e.set_manifest(m.to_bytes(None))


def fe(name: str, data: bytes) -> FileEntry:
    return FileEntry(path=name, size=len(data), sha256=hashlib.sha256(data).hexdigest())


def test_archive_with_a_dotdot_path(entry: Entry, tmp_path: Path) -> None:
    evil = b"import os; os.system('echo owned')\n"
    for name in ("inductor/../../evil.py", "inductor/fxgraph/../../../evil.py", "/tmp/evil.py"):
        archive = craft([regular(name, evil)])
        publish_crafted(entry, tmp_path, archive, [fe(name, evil)])
        assert any("escape" in p for p in verify_entry(entry.store, entry.key, TrustPolicy()).problems)
        before = entry.state()
        roots = {"inductor": tmp_path / "x" / "y" / "ind"}
        out = restore_then_upload(entry, roots)
        assert out.status == "rejected" and "escape" in out.reason, out.reason
        assert not list(tmp_path.rglob("evil.py")) and not Path("/tmp/evil.py").exists()
        assert_not_worse(entry, before)
        assert_crafted_dropped(entry, archive)
        shutil.rmtree(tmp_path / "x")


def assert_crafted_dropped(e: Entry, archive: bytes) -> None:
    """The cold boot's upload left the refused segment out of the manifest and published its own files."""
    listed = {s.sha256 for s in Manifest.from_bytes(e.store.read(e.mname)).segments}
    assert hashlib.sha256(archive).hexdigest() not in listed and listed
    assert verify_entry(e.store, e.key, TrustPolicy()).ok


def test_archive_with_a_symlink(entry: Entry, tmp_path: Path) -> None:
    for kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        link = tarfile.TarInfo("inductor/fxgraph/ab/entry")
        link.type, link.linkname = kind, "/etc/passwd"
        payload = b"written through the link"
        members = [(link, None), regular("inductor/fxgraph/ab/entry2", payload)]
        files = [FileEntry(path=link.name, size=0, sha256="0" * 64), fe("inductor/fxgraph/ab/entry2", payload)]
        archive = craft(members)
        publish_crafted(entry, tmp_path, archive, files)
        assert any("not a regular file" in p for p in verify_entry(entry.store, entry.key, TrustPolicy()).problems)
        before = entry.state()
        roots = {"inductor": tmp_path / f"ind-{kind.decode()}"}
        out = restore_then_upload(entry, roots)
        assert out.status == "rejected" and "not a regular file" in out.reason
        assert_not_worse(entry, before)
        assert_crafted_dropped(entry, archive)


def test_archive_bomb_over_the_caps(entry: Entry, tmp_path: Path) -> None:
    cap = 16 * 2**20
    zeros = bytes(64 * 2**20)  # 64 MiB of zeros: a few KB compressed
    bomb = craft([regular("inductor/fxgraph/ab/big", zeros)])
    assert len(bomb) < 100_000
    # An honest manifest declares the size: refused before anything is downloaded.
    publish_crafted(entry, tmp_path, bomb, [fe("inductor/fxgraph/ab/big", zeros)])
    out = restore_then_upload(entry, {"inductor": tmp_path / "a"}, max_bytes=cap, upload=False)
    assert out.status == "rejected" and "caps" in out.reason and out.bytes_downloaded == 0
    # A lying manifest (declares 1 KiB): refused at the member's header, before a byte is written.
    publish_crafted(entry, tmp_path, bomb, [FileEntry(path="inductor/fxgraph/ab/big", size=1024, sha256="0" * 64)])
    before = entry.state()
    out = restore_then_upload(entry, {"inductor": tmp_path / "b"}, max_bytes=cap)
    assert out.status == "rejected" and "size" in out.reason
    assert_not_worse(entry, before)
    # Too many files: the file cap.
    many = [regular(f"inductor/k/{i}", b"x") for i in range(50)]
    publish_crafted(entry, tmp_path, craft(many), [fe(f"inductor/k/{i}", b"x") for i in range(50)])
    out = restore_then_upload(entry, {"inductor": tmp_path / "c"}, max_files=10, upload=False)
    assert out.status == "rejected" and "caps" in out.reason
    rep = verify_entry(entry.store, entry.key, TrustPolicy(), options=RestoreOptions(max_files=10))
    assert any("caps" in p for p in rep.problems)


# -- local faults: disk full, read-only -----------------------------------------------------------------------------
@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Any]:
    mounted: list[Path] = []

    def mount(name: str, size: str, *, read_only: bool = False, opts: str = "") -> Path:
        p = tmp_path / name
        p.mkdir()
        o = f"size={size}" + (f",{opts}" if opts else "")
        cp = subprocess.run(["mount", "-t", "tmpfs", "-o", o, "tmpfs", str(p)], capture_output=True)
        if cp.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {cp.stderr.decode().strip()}")
        mounted.append(p)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(p)], check=True)
        return p

    yield mount
    for p in reversed(mounted):
        subprocess.run(["umount", "-l", str(p)], capture_output=True)


def test_disk_full_during_restore(entry: Entry, tmp_path: Path, tmpfs: Any) -> None:
    unpacked = sum(f.size for f in entry.good.manifest.files().values())
    full = tmpfs("full", "256k")  # a real ENOSPC: the entry unpacks to ~0.8 MB
    assert unpacked > 256 * 1024
    before = entry.state()
    out = restore_then_upload(entry, {"inductor": full}, signing_key=KEY, upload=False)
    assert out.status == "error" and "No space left" in out.reason, out.reason
    assert entry.state() == before
    # A read-only cache dir, and the known leak: a second root failing after the first root's staging dir exists.
    ro = tmpfs("ro", "1m", read_only=True)
    out = restore_then_upload(entry, {"inductor": ro}, signing_key=KEY, upload=False)
    assert out.status == "error" and "Read-only" in out.reason, out.reason
    rw = tmp_path / "rw"
    out = restore_then_upload(entry, {"inductor": rw, "triton": ro / "t"}, signing_key=KEY, upload=False)
    assert out.status == "error"
    assert not any(p.name.startswith(STAGING_PREFIX) for p in rw.iterdir())


def test_commit_needs_no_new_inode(tmp_path: Path, tmpfs: Any) -> None:
    """The directories are made while unpacking (into staging, which a failure discards); moving them into place
    is renames only. So a disk whose inodes ran out after the unpack still takes the whole commit."""
    root = tmpfs("small", "4m", opts="nr_inodes=1000")
    data = {f"inductor/d{i}/f": bytes([i]) * 1000 for i in range(40)}
    (tmp_path / "seg").write_bytes(craft([regular(n, b) for n, b in data.items()]))
    files = [fe(n, b) for n, b in data.items()]
    staged = unpack_into_staging(tmp_path / "seg", files, {"inductor": root}, max_bytes=10**6, max_files=100)
    used = os.statvfs(root).f_files - os.statvfs(root).f_ffree
    subprocess.run(["mount", "-o", f"remount,nr_inodes={used}", str(root)], check=True)
    assert os.statvfs(root).f_ffree == 0
    with pytest.raises(OSError, match="No space left"):  # the disk is full indeed
        (root / "probe").mkdir()
    assert staged.commit() == 40
    assert sorted(p.name for p in root.iterdir()) == sorted(f"d{i}" for i in range(40))  # staging dir gone
    assert all((root / n.partition("/")[2]).read_bytes() == b for n, b in data.items())


def test_commit_rolls_back_when_a_move_fails(tmp_path: Path) -> None:
    """A regular file where a directory must go stops the commit midway: the subtrees already moved go back, the
    files moved into an existing directory are removed, and what was there before stays as it was."""
    root = tmp_path / "root"
    (root / "d0").mkdir(parents=True)
    (root / "d0" / "other").write_bytes(b"theirs")  # an existing directory: the commit merges into it
    (root / "d20").write_bytes(b"a file, not a directory")  # in the way of the 14th move (sorted order)
    data = {f"inductor/d{i}/f": bytes([i]) * 1000 for i in range(40)}
    (tmp_path / "seg").write_bytes(craft([regular(n, b) for n, b in data.items()]))
    staged = unpack_into_staging(
        tmp_path / "seg", [fe(n, b) for n, b in data.items()], {"inductor": root}, max_bytes=10**6, max_files=100
    )
    with pytest.raises(OSError):
        staged.commit()
    assert sorted(p.name for p in root.iterdir()) == ["d0", "d20"]
    assert sorted(p.name for p in (root / "d0").iterdir()) == ["other"]
    assert (root / "d20").read_bytes() == b"a file, not a directory"


# -- the overlapping segments two racing writers can publish ------------------------------------------------------
def test_overlapping_segments_restore(tmp_path: Path) -> None:
    """The CAS loser merges its whole segment, so one path can be listed twice: the first copy wins (as in
    Manifest.files()), the second is verified but not written; restore used to reject such an entry for good."""
    st = LocalStore(tmp_path / "store")
    factors = {"torch": "t"}
    m = Manifest(key="k", model_version="v", fingerprint=fingerprint_of(factors), factors=factors)
    for files in ({"inductor/x": b"1", "inductor/y": b"2"}, {"inductor/x": b"1", "inductor/z": b"3"}):
        archive = craft([regular(n, b) for n, b in files.items()])
        (tmp_path / "seg").write_bytes(archive)
        sha = hashlib.sha256(archive).hexdigest()
        st.put_immutable(object_name(sha), tmp_path / "seg")
        m = m.with_segment(Segment(sha256=sha, size=len(archive), files=[fe(n, b) for n, b in files.items()]))
    st.put_conditional(manifest_name("k"), m.to_bytes(None), None)
    r = restore(CacheEntry(st, "k", {"inductor": tmp_path / "ind"}, factors, TrustPolicy()))
    assert r.status == "hit", r.reason
    assert sorted(p.name for p in (tmp_path / "ind").iterdir()) == ["x", "y", "z"]
    assert verify_entry(st, "k", TrustPolicy(), factors=factors).ok


def test_unpack_refuses_reserved_and_device_names(tmp_path: Path) -> None:
    dev = tarfile.TarInfo("inductor/dev")
    dev.type = tarfile.CHRTYPE
    for members, files in (
        ([(dev, None)], [FileEntry(path="inductor/dev", size=0, sha256="0" * 64)]),
        ([regular(f"inductor/{STAGING_PREFIX}x/f", b"1")], [fe(f"inductor/{STAGING_PREFIX}x/f", b"1")]),
    ):
        (tmp_path / "seg").write_bytes(craft(members))
        with pytest.raises(UnsafeArchive):
            unpack_into_staging(tmp_path / "seg", files, {"inductor": tmp_path / "d"}, max_bytes=99, max_files=9)
        assert list((tmp_path / "d").iterdir()) == []


# -- boot rows -------------------------------------------------------------------------------------------------------
def boot_env(tmp_path: Path, url: str, **extra: str) -> dict[str, str]:
    return {
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "fresh-inductor"),
        "COMPILE_CACHE_URL": url,
        "COMPILE_CACHE_LOG_FILE": str(tmp_path / "log.txt"),
        "COMPILE_CACHE_METRICS_FILE": str(tmp_path / "metrics.json"),
        **extra,
    }


def s3_boot_env(env: dict[str, str], **override: str) -> dict[str, str]:
    return {**env, "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull, **override}


def run_boot(tmp_path: Path, env: dict[str, str], hidden: Iterable[str]) -> Boot:
    b = boot(TARGET, env, *({"batch": n} for n in BATCHES))
    texts = [b.stderr, json.dumps(b.metrics)]
    for name in ("log.txt", "metrics.json"):
        if (tmp_path / name).exists():
            texts.append((tmp_path / name).read_text())
    assert_no_secrets(texts, hidden)
    return b


def assert_bad_entry_not_loaded(b: Boot, expected: dict[int, list[list[float]]], *statuses: str) -> None:
    m = b.metrics
    assert m["cache"] in statuses, (m["cache"], m["cache_reason"])
    assert m["fxgraph_hits"] == 0 and m["aotautograd_hits"] == 0 and m["files_restored"] == 0
    pc = m["parts"]["model"].get("precompiled")  # none where the part could not precompile at all (a full disk)
    assert pc is None or (pc["loaded"] == 0 and pc["adopted"] == 0), pc
    assert_correct(b, expected)


def local_entry(good: Good, tmp_path: Path) -> Entry:
    shutil.copytree(good.store_dir, tmp_path / "store")
    st = LocalStore(tmp_path / "store")

    def raw_put(name: str, data: bytes) -> None:
        (st.root / name).write_bytes(data)

    return Entry(st, good.key, good, raw_put, (SIGNING_KEY, OTHER_KEY.decode()))


def test_done_when_every_object_has_a_flipped_byte(good: Good, tmp_path: Path, expected: dict) -> None:
    """After a good cold boot, one flipped byte in every object of the store."""
    e = local_entry(good, tmp_path)
    names = [o.name for o in e.store.list("")]
    assert len(names) >= 2 and e.mname in names
    for name in names:
        e.raw_put(name, flip_byte(e.store.read(name)))
    before = e.state()
    b = run_boot(tmp_path, boot_env(tmp_path, e.store.url, COMPILE_CACHE_SIGNING_KEY=SIGNING_KEY), e.secrets)
    assert_bad_entry_not_loaded(b, expected, "error", "rejected")
    assert b.metrics["compiles"] > 0 and not b.metrics["eager_fallback"]  # a cold compile, not eager
    assert_not_worse(e, before, trust=TrustPolicy(KEY, require_signed=True))


def test_a_damaged_object_heals_at_the_next_boots_upload(good: Good, tmp_path: Path, expected: dict) -> None:
    """Through the lifecycle: one segment's object damaged in the store; the boot that finds it compiles cold and
    its upload leaves that segment out (republishing its files); the container after it gets a hit. Without
    this, every replica would boot cold until someone pruned the entry."""
    e = local_entry(good, tmp_path)
    e.raw_put(e.object, flip_byte(e.store.read(e.object)))
    env = boot_env(tmp_path, e.store.url, COMPILE_CACHE_SIGNING_KEY=SIGNING_KEY)
    b = run_boot(tmp_path, env, e.secrets)
    assert_bad_entry_not_loaded(b, expected, "rejected")
    assert b.metrics["bytes_uploaded"] > 0
    assert verify_entry(e.store, e.key, TrustPolicy(KEY, require_signed=True)).ok
    b = run_boot(tmp_path, {**env, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "next-container")}, e.secrets)
    assert b.metrics["cache"] == "hit", b.metrics["cache_reason"]
    assert b.metrics["compiles"] == 0 and precompiled(b.metrics)["built"] == 0  # every shape loaded, none built
    assert precompiled(b.metrics)["loaded"] >= len(BATCHES)
    assert_correct(b, expected)


def test_boot_with_a_wrong_s3_secret_403(
    good: Good, tmp_path: Path, expected: dict, s3_env: dict[str, str], seaweed: Any
) -> None:
    st = _s3_store_with_good_entry(s3_env, good)
    before = {o.name: st.read(o.name) for o in st.list("")}
    wrong = "wrong-" + secrets.token_hex(8)
    env = boot_env(tmp_path, s3_env["COMPILE_CACHE_URL"], **s3_boot_env(s3_env, AWS_SECRET_ACCESS_KEY=wrong))
    b = run_boot(tmp_path, env, (wrong, seaweed.secret_key, SIGNING_KEY))
    assert_bad_entry_not_loaded(b, expected, "error")
    assert "403" in b.metrics["cache_reason"] and b.metrics["upload_state"] == "error"
    assert {o.name: st.read(o.name) for o in st.list("")} == before


@pytest.mark.serial  # bounds wall time
def test_boot_with_an_s3_store_slower_than_the_deadline(
    good: Good, tmp_path: Path, expected: dict, s3_env: dict[str, str], seaweed: Any
) -> None:
    st = _s3_store_with_good_entry(s3_env, good)
    before = {o.name: st.read(o.name) for o in st.list("")}
    up = urlsplit(seaweed.endpoint)
    proxy = SlowProxy((up.hostname, up.port), delay=2.5)  # a real socket that passes every request on 2.5 s late
    try:
        env = boot_env(
            tmp_path, s3_env["COMPILE_CACHE_URL"],
            **s3_boot_env(s3_env, AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{proxy.port}"),
            COMPILE_CACHE_RESTORE_TIMEOUT_S="1",
        )
        b = run_boot(tmp_path, env, (seaweed.secret_key, SIGNING_KEY))
    finally:
        proxy.close()
    assert_bad_entry_not_loaded(b, expected, "error")
    assert "COMPILE_CACHE_RESTORE_TIMEOUT_S" in b.metrics["cache_reason"] and b.metrics["restore_s"] < 2.5
    assert {o.name: st.read(o.name) for o in st.list("")} == before


def test_boot_with_a_dotdot_archive(good: Good, tmp_path: Path, expected: dict) -> None:
    e = local_entry(good, tmp_path)
    evil = b"print('owned')\n"
    name = "inductor/../../escaped.py"
    publish_crafted(e, tmp_path, craft([regular(name, evil)]), [fe(name, evil)])
    before = e.state()
    b = run_boot(tmp_path, boot_env(tmp_path, e.store.url), e.secrets)
    assert_bad_entry_not_loaded(b, expected, "rejected")
    assert not list(tmp_path.rglob("escaped.py"))
    assert_not_worse(e, before)


def test_boot_with_the_cache_dir_on_a_full_disk(good: Good, tmp_path: Path, expected: dict, tmpfs: Any) -> None:
    e = local_entry(good, tmp_path)
    full = tmpfs("full", "256k")
    before = e.state()
    env = boot_env(tmp_path, e.store.url, TORCHINDUCTOR_CACHE_DIR=str(full))
    b = run_boot(tmp_path, env, e.secrets)
    assert_bad_entry_not_loaded(b, expected, "error")
    assert "No space left" in b.metrics["cache_reason"]
    assert not any(p.name.startswith(STAGING_PREFIX) for p in full.iterdir())
    assert e.state() == before


def test_torch_compile_raising(good: Good, tmp_path: Path, expected: dict) -> None:
    e = local_entry(good, tmp_path)
    before = e.state()
    b = run_boot(tmp_path, boot_env(tmp_path, e.store.url, COMPILE_CACHE_BACKEND="nonexistent"), e.secrets)
    m = b.metrics
    assert "torch.compile raised" in m["eager_fallback"] and m["fxgraph_hits"] == 0
    assert m["cache"] == "miss"  # the backend is a key factor: the good entry is not even looked at
    assert_correct(b, expected)
    assert_not_worse(e, before)


def test_first_compiled_call_raising(good: Good, tmp_path: Path, expected: dict) -> None:
    # tests/tiny_predictor.py registers "tiny_broken": torch.compile succeeds, the first compiled call raises.
    e = local_entry(good, tmp_path)
    before = e.state()
    b = run_boot(tmp_path, boot_env(tmp_path, e.store.url, COMPILE_CACHE_BACKEND="tiny_broken"), e.secrets)
    m = b.metrics
    assert "compiled call raised" in m["eager_fallback"] and m["fxgraph_hits"] == 0
    assert_correct(b, expected)
    assert_not_worse(e, before)


# -- a corrupt file already in the local Inductor dir (no store involved) -------------------------------------------
# What Torch's own caches do with a damaged file is a question for the cache dir restore (jit_restore="dir"): a
# precompiled function reads no FX graph. So these boots set it, and their warm dir comes from a cold boot that set it.
DIR_RESTORE = {"COMPILE_CACHE_JIT_RESTORE": "dir", "COMPILE_CACHE_DISABLE": "1"}


@pytest.fixture(scope="module")
def dir_warm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Inductor dir one cold boot under jit_restore="dir" leaves: FX graphs and the kernels they load."""
    d = tmp_path_factory.mktemp("dir-warm")
    b = boot(TARGET, {**DIR_RESTORE, "TORCHINDUCTOR_CACHE_DIR": str(d / "ind")}, {"batch": 1})
    assert b.metrics["fxgraph_misses"] == len(BATCHES) and not b.metrics["eager_fallback"]
    return d / "ind"


@pytest.mark.parametrize("damage", ["fxgraph-truncated", "kernel-so-emptied"])
def test_corrupt_file_in_the_local_inductor_dir(dir_warm: Path, tmp_path: Path, expected: dict, damage: str) -> None:
    """What Torch does with a damaged file in a warm dir, with the store off (measured, torch 2.13 CPU):
    a truncated FX-graph pickle is a logged cache miss and Torch recompiles; an emptied kernel .so is NOT
    recompiled: the compile raises BackendCompilerFailed and only our eager fallback keeps the boot alive."""
    warm = tmp_path / "warm"
    shutil.copytree(dir_warm, warm)
    if damage == "fxgraph-truncated":
        victims = [p for p in (warm / "fxgraph").rglob("*") if p.is_file()]
        for p in victims:
            os.truncate(p, p.stat().st_size // 2)
    else:
        victims = list(warm.glob("*/*.main.so"))  # the model's kernels (the others are Inductor's ISA probes)
        for p in victims:
            os.truncate(p, 0)
    assert victims
    b = run_boot(
        tmp_path,
        boot_env(tmp_path, str(tmp_path / "unused"), TORCHINDUCTOR_CACHE_DIR=str(warm), **DIR_RESTORE),
        (),
    )
    assert_correct(b, expected)
    m = b.metrics
    if damage == "fxgraph-truncated":
        assert "UnpicklingError" in b.stderr and m["fxgraph_misses"] > 0 and not m["eager_fallback"]
    else:
        assert "BackendCompilerFailed" in m["eager_fallback"] and m["fxgraph_hits"] == 0


def test_restore_repairs_an_emptied_kernel_in_a_warm_dir(good: Good, tmp_path: Path, expected: dict) -> None:
    """With the store on, the restore's verified copy replaces a local file of the wrong size (snapshot.commit)."""
    e = local_entry(good, tmp_path)
    warm = tmp_path / "warm"
    shutil.copytree(good.cold_dir, warm)
    emptied = list(warm.glob("*/*.main.so"))
    assert emptied
    for p in emptied:
        os.truncate(p, 0)
    b = run_boot(tmp_path, boot_env(tmp_path, e.store.url, TORCHINDUCTOR_CACHE_DIR=str(warm)), e.secrets)
    m = b.metrics
    assert m["cache"] == "hit" and m["compiles"] == 0 and not m["eager_fallback"]
    assert precompiled(m) == {"loaded": len(BATCHES), "adopted": 0, "built": 0, "fallback": ""}
    assert all(p.stat().st_size > 0 for p in emptied)
    assert_correct(b, expected)


# -- helpers: an S3 copy of the good entry, a slow store, a slow TCP proxy ----------------------------------------
def _s3_store_with_good_entry(s3_env: dict[str, str], good: Good) -> Store:
    mp = pytest.MonkeyPatch()
    try:
        apply_s3_env(mp, s3_env)
        st = open_store(s3_env["COMPILE_CACHE_URL"])
    finally:
        mp.undo()
    _fill(st, good.store_dir)
    return st


class SlowStore(Store):
    """Delegates to ``inner``, ``delay`` seconds late on every read."""

    def __init__(self, inner: Store, delay: float) -> None:
        self.inner, self.delay, self.url = inner, delay, inner.url

    def read_versioned(self, name: str, *, max_bytes: int | None = None) -> tuple[bytes, str]:
        time.sleep(self.delay)
        return self.inner.read_versioned(name, max_bytes=max_bytes)

    def download(self, name: str, dest: Path, *, progress: Any = None) -> int:
        time.sleep(self.delay)
        return self.inner.download(name, dest, progress=progress)

    def put_immutable(self, name: str, src: Path) -> bool:
        return self.inner.put_immutable(name, src)

    def put_conditional(self, name: str, data: bytes, if_match: str | None) -> str:
        return self.inner.put_conditional(name, data, if_match)

    def list(self, prefix: str = "") -> Iterator[Any]:
        return self.inner.list(prefix)

    def delete(self, name: str) -> None:
        self.inner.delete(name)


class SlowProxy:
    """A TCP proxy on 127.0.0.1 that forwards each chunk a client sends ``delay`` seconds late; ``to_client``
    counts the bytes it passed from the server to the client."""

    def __init__(self, upstream: tuple[str | None, int | None], delay: float) -> None:
        self.upstream, self.delay = (upstream[0] or "127.0.0.1", upstream[1] or 80), delay
        self.to_client = 0
        self._count = threading.Lock()
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True, name="slow-proxy").start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.srv.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, server, self.delay), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, 0.0, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, delay: float, count: bool = False) -> None:
        try:
            while data := src.recv(1 << 16):
                time.sleep(delay)
                dst.sendall(data)
                if count:
                    with self._count:
                        self.to_client += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.srv.close()
