"""A signing key means signed entries only; key rotation; the warning when a shared store is trusted blindly;
bounded manifest reads.

The good entry is test_faults.py's: the session's one cold boot of the tiny predictor, re-signed with its test key
(``KEY``). Store-level tests run against both stores (a local directory, the real S3 server) at the level of what
the lifecycle does (restore, then the background upload). Boot tests start fresh processes (tests/boot.py, and the
real Cog runtime through scripts/predict) and compare every output with the eager model's.
"""

from __future__ import annotations

import json
import os
import pickle
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from compile_cache.config import DEFAULT_STORE_URL, Settings
from compile_cache.entry import Entry as CacheEntry
from compile_cache.errors import ConfigError, ObjectTooLarge
from compile_cache.manifest import MAX_MANIFEST_BYTES, Manifest, Segment, object_name
from compile_cache.restore import RestoreOptions, restore
from compile_cache.snapshot import pack, sha256_file
from compile_cache.stores import LocalStore, Store, open_store
from compile_cache.stores.s3 import S3Store
from compile_cache.trust import TrustPolicy, warn_if_unverified
from compile_cache.upload import Uploader
from compile_cache.verify import verify_entry
from tests import test_faults as tf
from tests.conftest import ROOT
from tests.s3server import apply_s3_env
from tests.tiny_predictor import close, eager

# test_faults.py's fixtures, shared: the good entry, a copy of it in each store, the eager outputs.
good, entry, expected = tf.good, tf.entry, tf.expected
Entry, Good = tf.Entry, tf.Good
KEY, OTHER_KEY, SIGNING_KEY = tf.KEY, tf.OTHER_KEY, tf.SIGNING_KEY
NEW_SIGNING_KEY = "sk-new-" + secrets.token_hex(16)
NEW_KEY = NEW_SIGNING_KEY.encode()
WARNING = "UNVERIFIED cache"


def roots(tmp_path: Path, name: str) -> dict[str, Path]:
    return {"inductor": tmp_path / name}


def restore_with(e: Entry, trust: TrustPolicy, dest: dict[str, Path], **kw: Any) -> Any:
    return restore(CacheEntry(e.store, e.key, dest, e.good.factors, trust), **kw)


def upload_with(e: Entry, trust: TrustPolicy, dest: dict[str, Path], r: Any) -> Any:
    """The lifecycle's background upload after the restore ``r`` into ``dest``."""
    up = Uploader(
        CacheEntry(e.store, e.key, dest, e.good.factors, trust), e.good.manifest.model_version,
        known=set(r.manifest.files()) if r.manifest else set(), manifest=r.manifest, token=r.token,
    )
    u = up.upload()
    assert u is not None
    return u


def manifest_now(e: Entry) -> Manifest:
    return Manifest.from_bytes(e.store.read(e.mname))


def swap_a_pickle(e: Entry, tmp: Path) -> tuple[bytes, str]:
    """The attack of someone who can write to the store but holds no key: rewrite one precompiled function (a file
    torch unpickles), repack its segment (every sha256 matching), write a new manifest listing it, without a
    signature. Returns the swapped file's new content and its path in the entry."""
    g = e.good.manifest
    i, victim = next((i, f.path) for i, s in enumerate(g.segments) for f in s.files
                     if "/precompile/" in f.path and f.path.endswith(".bin"))
    evil = pickle.dumps({"swapped": "by someone without the key"})
    (tmp / "evil").write_bytes(evil)
    files = {}
    for f in g.segments[i].files:
        label, rel = f.path.split("/", 1)
        assert label == "inductor"
        files[f.path] = tmp / "evil" if f.path == victim else e.good.cold_dir / rel
    archive = tmp / "repacked.tar.zst"
    entries = pack(files, archive)
    seg = Segment(sha256=sha256_file(archive), size=archive.stat().st_size, files=entries)
    assert e.store.put_immutable(object_name(seg.sha256), archive)
    segments = [seg if j == i else s for j, s in enumerate(g.segments)]
    e.set_manifest(g.model_copy(update={"segments": segments}).to_bytes(None))
    return evil, victim


# -- a key means signed-only: both stores --------------------------------------------------------------------------
def test_a_key_refuses_an_unsigned_manifest(entry: Entry, tmp_path: Path) -> None:
    entry.set_manifest(entry.good.manifest.to_bytes(None))  # the signature stripped
    before = entry.state()
    keyed = TrustPolicy(KEY)
    r = restore_with(entry, keyed, roots(tmp_path, "a"))
    assert r.status == "rejected" and "unsigned" in r.reason and "COMPILE_CACHE_ALLOW_UNSIGNED" in r.reason
    assert r.bytes_downloaded == 0
    tf.assert_nothing_placed(roots(tmp_path, "a"))
    rep = verify_entry(entry.store, entry.key, trust=keyed)
    assert not rep.ok and any("unsigned" in p for p in rep.problems)
    # The cold boot's upload replaces the unsigned manifest by a signed one of its own files, never signing it.
    shutil.copytree(entry.good.cold_dir, tmp_path / "a", dirs_exist_ok=True)
    u = upload_with(entry, keyed, roots(tmp_path, "a"), r)
    assert u.error == "" and u.files == len(entry.good.manifest.files())
    tf.assert_not_worse(entry, before, trust=keyed)
    assert manifest_now(entry).signed_with(KEY)


def test_the_opt_out_loads_unsigned_entries_and_signs_none_of_their_files(entry: Entry, tmp_path: Path) -> None:
    """COMPILE_CACHE_ALLOW_UNSIGNED (migrating a store written without a key): an unsigned entry loads, but this
    process never publishes what it restored from it under its signature; a file it compiled itself, it does."""
    entry.set_manifest(entry.good.manifest.to_bytes(None))
    migrating = TrustPolicy(KEY, allow_unsigned=True)
    dest = roots(tmp_path, "a")
    r = restore_with(entry, migrating, dest)
    assert r.status == "hit" and r.signer == "unsigned" and r.files == len(entry.good.manifest.files())
    assert verify_entry(entry.store, entry.key, trust=migrating).ok
    u = upload_with(entry, migrating, dest, r)  # nothing new: no request, the entry stays as it was
    assert (u.error, u.files, u.bytes_uploaded) == ("", 0, 0) and manifest_now(entry).signature is None
    (dest["inductor"] / "fxgraph" / "new-shape").parent.mkdir(parents=True, exist_ok=True)
    (dest["inductor"] / "fxgraph" / "new-shape").write_bytes(b"compiled by this process")
    u = upload_with(entry, migrating, dest, r)
    m = manifest_now(entry)
    assert u.error == "" and u.files == 1 and m.signed_with(KEY)
    assert set(m.files()) == {"inductor/fxgraph/new-shape"}  # none of the unverified files got signed
    # A manifest signed with another key stays refused, opt-out or not.
    entry.set_manifest(entry.good.manifest.to_bytes(OTHER_KEY))
    r = restore_with(entry, migrating, roots(tmp_path, "b"))
    assert r.status == "rejected" and "does not verify" in r.reason


def test_a_key_refuses_a_manifest_signed_with_another_key(entry: Entry, tmp_path: Path) -> None:
    entry.set_manifest(entry.good.manifest.to_bytes(OTHER_KEY))
    before = entry.state()
    r = restore_with(entry, TrustPolicy(KEY), roots(tmp_path, "a"))
    assert r.status == "rejected" and "does not verify" in r.reason and r.bytes_downloaded == 0
    tf.assert_nothing_placed(roots(tmp_path, "a"))
    shutil.copytree(entry.good.cold_dir, tmp_path / "a", dirs_exist_ok=True)
    u = upload_with(entry, TrustPolicy(KEY), roots(tmp_path, "a"), r)
    assert "leaving it as it is" in u.error  # another key's entry is not ours to overwrite
    assert entry.state() == before
    tf.assert_no_secrets([r.reason, u.error], entry.secrets)


def test_the_swapped_pickle_attack_is_refused(entry: Entry, tmp_path: Path) -> None:
    evil, victim = swap_a_pickle(entry, tmp_path)
    # Without a key the attack works (this is what signing is for): the swapped pickle lands in the cache dir.
    r = restore_with(entry, TrustPolicy(), roots(tmp_path, "blind"))
    assert r.status == "hit", r.reason
    assert (tmp_path / "blind" / victim.split("/", 1)[1]).read_bytes() == evil
    # With the key, refused before a byte of any segment is read; nothing placed.
    r = restore_with(entry, TrustPolicy(KEY), roots(tmp_path, "keyed"))
    assert r.status == "rejected" and "unsigned" in r.reason and r.bytes_downloaded == 0
    tf.assert_nothing_placed(roots(tmp_path, "keyed"))
    # Signed with a key the fleet does not hold: the same.
    entry.set_manifest(Manifest.from_bytes(entry.store.read(entry.mname)).to_bytes(OTHER_KEY))
    r = restore_with(entry, TrustPolicy(KEY, verify_keys=(NEW_KEY,)), roots(tmp_path, "other"))
    assert r.status == "rejected" and "does not verify" in r.reason
    tf.assert_nothing_placed(roots(tmp_path, "other"))


# -- rotation: both stores -----------------------------------------------------------------------------------------
def test_rotation_restores_with_the_old_key_and_re_signs_at_the_next_upload(entry: Entry, tmp_path: Path) -> None:
    """The entry is signed with KEY (the old key); the fleet moves to NEW_KEY."""
    rotating = TrustPolicy(NEW_KEY, verify_keys=(KEY,))
    new_only = TrustPolicy(NEW_KEY)
    before = entry.state()
    dest = roots(tmp_path, "a")
    r = restore_with(entry, rotating, dest)
    assert r.status == "hit" and r.signer == "previous" and r.files == len(entry.good.manifest.files())
    # The old key dropped before the entry was re-signed: refused.
    r2 = restore_with(entry, new_only, roots(tmp_path, "b"))
    assert r2.status == "rejected" and "does not verify" in r2.reason
    # The next upload, with no new file, re-signs the manifest (content unchanged) with the current key.
    u = upload_with(entry, rotating, dest, r)
    assert (u.error, u.files, u.segments, u.bytes_uploaded) == ("", 0, 0, 0)
    after = entry.state()
    assert {n: d for n, d in after.items() if n != entry.mname} == {n: d for n, d in before.items() if n != entry.mname}
    m = manifest_now(entry)
    assert m.signed_with(NEW_KEY) and not m.signed_with(KEY)
    assert m.model_dump(exclude={"signature"}) == entry.good.manifest.model_dump(exclude={"signature"})
    # Now the old key can go.
    r3 = restore_with(entry, new_only, roots(tmp_path, "c"))
    assert r3.status == "hit" and r3.signer == "current"
    assert verify_entry(entry.store, entry.key, trust=new_only).ok
    u = upload_with(entry, rotating, roots(tmp_path, "c"), r3)  # nothing to re-sign any more: no write
    assert (u.error, u.files) == ("", 0) and entry.state()[entry.mname] == after[entry.mname]


# -- bounded reads: both stores ------------------------------------------------------------------------------------
def _rchar() -> int:
    """Bytes this process has read through read(2) and friends, all threads (Linux /proc/self/io)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def test_an_oversized_manifest_is_refused_before_it_is_read(
    entry: Entry, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A validly signed manifest padded with whitespace past the cap: it would parse and verify, and is refused on
    its size alone. Bytes counted: a local store's reads by this process, an S3 store's bytes on the wire."""
    data = entry.good.manifest.to_bytes(KEY)
    padded = b"{" + b" " * (MAX_MANIFEST_BYTES + 8 * 2**20) + data[1:]
    assert Manifest.from_bytes(padded).signed_with(KEY)  # well-formed and signed: only its size is wrong
    entry.set_manifest(padded)
    before = entry.state()
    if isinstance(entry.store, LocalStore):
        store, counted = entry.store, _rchar
    else:
        seaweed = request.getfixturevalue("seaweed")
        env = request.getfixturevalue("s3_env")
        host, port = seaweed.endpoint.rsplit("//", 1)[1].split(":")
        proxy = tf.SlowProxy((host, int(port)), delay=0.0)  # counts what the server sends the client
        request.addfinalizer(proxy.close)
        apply_s3_env(monkeypatch, {**env, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{proxy.port}"})
        store = S3Store(entry.store.bucket, entry.store.prefix)  # type: ignore[attr-defined]

        def counted() -> int:
            return proxy.to_client

    e = Entry(store, entry.key, entry.good, entry.raw_put, entry.secrets)
    for cap in (64 * 1024, MAX_MANIFEST_BYTES):
        n0 = counted()
        r = restore_with(e, TrustPolicy(KEY), roots(tmp_path, f"r{cap}"), options=RestoreOptions(max_manifest_bytes=cap))
        n = counted() - n0
        assert r.status == "rejected" and "too large" in r.reason and f"cap of {cap} bytes" in r.reason, r.reason
        assert n <= cap + 64 * 1024, (cap, n)  # at most the cap (an S3 Range) and the headers: never the manifest
    tf.assert_nothing_placed(roots(tmp_path, f"r{MAX_MANIFEST_BYTES}"))
    n0 = counted()
    rep = verify_entry(store, entry.key, trust=TrustPolicy(KEY))
    assert not rep.ok and "over the cap" in rep.problems[0] and counted() - n0 <= MAX_MANIFEST_BYTES + 64 * 1024
    shutil.copytree(entry.good.cold_dir, tmp_path / "cold")  # what the cold compile leaves; its upload:
    u = upload_with(e, TrustPolicy(KEY), roots(tmp_path, "cold"), r)
    assert "over the size cap" in u.error and entry.state() == before


# -- the warning: function level ------------------------------------------------------------------------------------
def test_warning_for_a_store_others_can_write_without_a_key(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    shared = isinstance(store, S3Store)
    assert bool(store.outside_writers()) == shared
    for trust, warns in ((TrustPolicy(), shared), (TrustPolicy(KEY), False), (TrustPolicy(require_signed=True), False)):
        caplog.clear()
        assert warn_if_unverified(store, trust) is warns
        lines = [r.getMessage() for r in caplog.records if WARNING in r.getMessage()]
        assert len(lines) == (1 if warns else 0)
        if warns:
            assert "can run code in this container" in lines[0] and "COMPILE_CACHE_SIGNING_KEY" in lines[0]
            assert "\n" not in lines[0]


def test_no_warning_for_the_local_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the project dir, as under Cog
    st = open_store(DEFAULT_STORE_URL)
    assert isinstance(st, LocalStore) and st.root == tmp_path / ".cache" / "compile-store"
    assert st.outside_writers() == "" and not warn_if_unverified(st, TrustPolicy())


def test_a_store_on_a_mounted_volume_counts_as_shared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory mounted into the container (a host dir, a volume) is not the container's own filesystem."""
    (tmp_path / "host").mkdir()
    (tmp_path / "vol").mkdir()
    cp = subprocess.run(["mount", "--bind", str(tmp_path / "host"), str(tmp_path / "vol")], capture_output=True)
    if cp.returncode != 0:
        pytest.skip(f"cannot bind-mount here (needs root): {cp.stderr.decode().strip()}")
    try:
        monkeypatch.chdir(tmp_path)
        assert f"mounted at {tmp_path / 'vol'}" in LocalStore(tmp_path / "vol" / "store").outside_writers()
        assert LocalStore(tmp_path / "store").outside_writers() == ""
    finally:
        subprocess.run(["umount", "-l", str(tmp_path / "vol")], capture_output=True)


def test_settings_for_signing() -> None:
    s = Settings.from_env({"COMPILE_CACHE_SIGNING_KEY": "new", "COMPILE_CACHE_VERIFY_KEYS": " old1 , old2,, "})
    assert TrustPolicy.from_settings(s) == TrustPolicy(b"new", (b"old1", b"old2"), False, False)
    with pytest.raises(ConfigError, match="COMPILE_CACHE_VERIFY_KEYS is set without COMPILE_CACHE_SIGNING_KEY"):
        Settings.from_env({"COMPILE_CACHE_VERIFY_KEYS": "old1"})
    with pytest.raises(ConfigError, match="contradict"):
        Settings.from_env({"COMPILE_CACHE_ALLOW_UNSIGNED": "1", "COMPILE_CACHE_REQUIRE_SIGNED": "1"})
    assert "old1" not in repr(s) and "old1" not in str(s.model_dump())  # a secret, like the signing key


def test_store_capped_reads(store: Store, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    token = store.put_conditional("m", data, None)
    assert store.read_versioned("m", max_bytes=len(data)) == (data, token)
    with pytest.raises(ObjectTooLarge, match=f"{len(data)} bytes, over the cap of {len(data) - 1} bytes"):
        store.read_versioned("m", max_bytes=len(data) - 1)
    # The capped read's version token is the one compare-and-swap takes.
    _, tok = store.read_versioned("m", max_bytes=2**20)
    store.put_conditional("m", b"", tok)
    assert store.read_versioned("m", max_bytes=0)[0] == b""  # an empty object (S3 answers a Range on it with 416)


# -- boots: fresh processes -------------------------------------------------------------------------------------------
def test_boot_with_a_key_refuses_another_keys_s3_entry_and_serves_cold(
    good: Good, tmp_path: Path, expected: dict, s3_env: dict[str, str], seaweed: Any
) -> None:
    st = tf._s3_store_with_good_entry(s3_env, good)
    e = Entry(st, good.key, good, None, (SIGNING_KEY, OTHER_KEY.decode(), seaweed.secret_key))
    data, token = st.read_versioned(e.mname)
    st.put_conditional(e.mname, Manifest.from_bytes(data).to_bytes(OTHER_KEY), token)
    before = e.state()
    env = tf.boot_env(tmp_path, s3_env["COMPILE_CACHE_URL"], **tf.s3_boot_env(s3_env), COMPILE_CACHE_SIGNING_KEY=SIGNING_KEY)
    b = tf.run_boot(tmp_path, env, e.secrets)
    tf.assert_bad_entry_not_loaded(b, expected, "rejected")
    assert "does not verify" in b.metrics["cache_reason"] and b.metrics["compiles"] > 0
    assert WARNING not in b.stderr  # a key is set
    assert b.metrics["upload_state"] == "error" and e.state() == before  # not ours to overwrite


def test_boot_warns_once_for_s3_without_a_key(
    good: Good, tmp_path: Path, expected: dict, s3_env: dict[str, str], seaweed: Any
) -> None:
    tf._s3_store_with_good_entry(s3_env, good)
    env = tf.boot_env(tmp_path, s3_env["COMPILE_CACHE_URL"], **tf.s3_boot_env(s3_env))
    b = tf.run_boot(tmp_path, env, (SIGNING_KEY, seaweed.secret_key))
    assert b.metrics["cache"] == "hit", b.metrics["cache_reason"]  # loaded, unverified: what the warning is about
    tf.assert_correct(b, expected)
    lines = [ln for ln in b.stderr.splitlines() if WARNING in ln]
    assert len(lines) == 1 and "S3 bucket" in lines[0] and "can run code in this container" in lines[0]
    assert "COMPILE_CACHE_SIGNING_KEY" in lines[0]


def test_boot_from_a_local_store_without_a_key_stays_quiet(good: Good, tmp_path: Path, expected: dict) -> None:
    e = tf.local_entry(good, tmp_path)
    b = tf.run_boot(tmp_path, tf.boot_env(tmp_path, e.store.url), e.secrets)
    assert b.metrics["cache"] == "hit", b.metrics["cache_reason"]
    tf.assert_correct(b, expected)
    assert WARNING not in b.stderr and WARNING not in (tmp_path / "log.txt").read_text()


def test_boot_during_a_rotation_re_signs_the_entry(good: Good, tmp_path: Path, expected: dict) -> None:
    e = tf.local_entry(good, tmp_path)
    env = tf.boot_env(
        tmp_path, e.store.url, COMPILE_CACHE_SIGNING_KEY=NEW_SIGNING_KEY, COMPILE_CACHE_VERIFY_KEYS=SIGNING_KEY
    )
    b = tf.run_boot(tmp_path, env, (*e.secrets, NEW_SIGNING_KEY))
    assert b.metrics["cache"] == "hit" and b.metrics["compiles"] == 0, b.metrics["cache_reason"]
    tf.assert_correct(b, expected)
    assert b.metrics["bytes_uploaded"] == 0 and b.metrics["upload_state"] == "done"
    m = manifest_now(e)
    assert m.signed_with(NEW_KEY) and not m.signed_with(KEY)
    r = restore_with(e, TrustPolicy(NEW_KEY), roots(tmp_path, "next"))
    assert r.status == "hit", r.reason


def test_scripts_predict_with_a_key_refuses_the_swapped_pickle_and_serves_cold(good: Good, tmp_path: Path) -> None:
    """`make predict` is scripts/predict in the real Cog runtime: here with the tiny predictor, a signing key and a
    store where someone without the key swapped a pickle and published an unsigned manifest. It reports
    `cache: rejected`, loads nothing of the entry, compiles cold and prints the right output; its upload replaces
    the attacker's manifest by a signed one of the files it compiled itself."""
    e = tf.local_entry(good, tmp_path)
    swap_a_pickle(e, tmp_path)
    swapped = manifest_now(e)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPILE_CACHE_", "TORCHINDUCTOR_"))}
    env.update(COMPILE_CACHE_URL=str(e.store.root), COMPILE_CACHE_SIGNING_KEY=SIGNING_KEY, PYTHONPATH=str(ROOT),
               COMPILE_CACHE_METRICS_FILE=str(tmp_path / "metrics.json"), COMPILE_CACHE_LOG_FILE=str(tmp_path / "log.txt"))
    cp = subprocess.run(
        [sys.executable, "scripts/predict", "--predictor", "tests/tiny_predictor.py:Predictor", "-i", "batch=1",
         "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert cp.returncode == 0, cp.stderr[-4000:]
    assert "cache: rejected" in cp.stderr, cp.stderr[-4000:]
    out = json.loads(cp.stdout.strip().splitlines()[-1])
    assert close(out, eager(1))
    texts = [cp.stdout, cp.stderr, *((tmp_path / n).read_text() for n in ("metrics.json", "log.txt"))]
    tf.assert_no_secrets(texts, e.secrets)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["cache"] == "rejected" and "unsigned" in m["cache_reason"], m["cache_reason"]
    assert m["fxgraph_hits"] == 0 and m["aotautograd_hits"] == 0 and m["files_restored"] == 0
    pc = m["parts"]["model"]["precompiled"]
    assert pc["loaded"] == 0 and pc["adopted"] == 0, pc
    assert m["compiles"] > 0 and not m["eager_fallback"]
    assert WARNING not in cp.stderr
    new = manifest_now(e)
    assert new.signed_with(KEY) and not {s.sha256 for s in swapped.segments} & {s.sha256 for s in new.segments}
    assert verify_entry(e.store, e.key, trust=TrustPolicy(KEY)).ok
