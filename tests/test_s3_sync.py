"""The compile cache through a real S3 server (SeaweedFS, auth on): boots, delta uploads, failure as a cold boot,
and many replicas writing and reading one key at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import urllib.request
import uuid
from pathlib import Path

import pytest

from compile_cache.entry import Entry
from compile_cache.manifest import Manifest, manifest_name
from compile_cache.restore import restore
from compile_cache.stores import open_store
from compile_cache.trust import TrustPolicy
from tests.conftest import ROOT, boot, precompiled
from tests.s3server import SeaweedServer, apply_s3_env
from tests.tiny_predictor import BATCHES, close, eager

TARGET = "tests.tiny_predictor:Predictor"
FACTORS = {"torch": "t", "python": "p", "device": "cpu", "cpu.isa": "X"}



def s3_boot(env: dict[str, str], inductor: Path, **extra: str) -> dict:
    full = {**env, "TORCHINDUCTOR_CACHE_DIR": str(inductor), "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull, **extra}
    b = boot(TARGET, full, {"batch": 4})
    assert close(b.outputs[0], eager(4))
    return b.metrics | {"stderr": b.stderr}


def test_boots_through_s3_miss_hit_and_delta(s3_env: dict[str, str], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A cold boot uploads to the bucket; a new container hits, loads every precompiled function and uploads
    nothing: the bucket is byte for byte what the cold boot left, so every later container sees the same entry.
    (A wrong S3 secret is a boot row of tests/test_faults.py.)"""
    cold = s3_boot(s3_env, tmp_path / "c1")
    assert cold["cache"] == "miss" and cold["bytes_uploaded"] > 0
    assert cold["store"].startswith("s3://")
    apply_s3_env(monkeypatch, s3_env)
    store = open_store(s3_env["COMPILE_CACHE_URL"])
    after_cold = {o.name: store.read(o.name) for o in store.list("")}
    assert manifest_name(cold["key"]) in after_cold

    warm = s3_boot(s3_env, tmp_path / "c2")  # a new container: empty inductor dir, same bucket
    assert warm["cache"] == "hit" and warm["compiles"] == 0 and warm["bytes_downloaded"] > 0  # no Dynamo
    assert precompiled(warm)["loaded"] == len(BATCHES)
    assert warm["bytes_uploaded"] == 0
    assert {o.name: store.read(o.name) for o in store.list("")} == after_cold  # the delta is empty


WRITER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from compile_cache.entry import Entry
    from compile_cache.stores import open_store
    from compile_cache.trust import TrustPolicy
    from compile_cache.upload import Uploader
    i, base = int(sys.argv[1]), Path(sys.argv[2])
    cache = base / f"cache{{i}}"
    (cache / "k").mkdir(parents=True)
    (cache / "k" / f"kernel{{i}}.so").write_bytes(os.urandom(20000 + i))
    (cache / "k" / "shared.so").write_bytes(b"same in every replica")
    store = open_store(os.environ["COMPILE_CACHE_URL"])
    up = Uploader(Entry(store, "fleet-key", {{"inductor": cache}}, {factors!r}, TrustPolicy()), "v1")
    r = up.upload()
    assert r is not None and not r.error, r
    print("OK", r.files)
    """
)


def test_16_replicas_upload_to_one_key_and_merge(s3_env: dict[str, str], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(root=str(ROOT), factors=FACTORS))
    env = {**os.environ, **s3_env, "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    procs = [subprocess.Popen([sys.executable, str(script), str(i), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(16)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and out.startswith("OK"), err[-2000:]

    apply_s3_env(monkeypatch, s3_env)
    store = open_store(s3_env["COMPILE_CACHE_URL"])
    m = Manifest.from_bytes(store.read(manifest_name("fleet-key")))
    expected = {f"inductor/k/kernel{i}.so" for i in range(16)} | {"inductor/k/shared.so"}
    assert set(m.files()) == expected  # the union: no writer's files were lost
    # Every referenced object exists and verifies: a full restore checks every sha256.
    r = restore(Entry(store, "fleet-key", {"inductor": tmp_path / "restored"}, FACTORS, TrustPolicy()))
    assert r.status == "hit" and r.files == 17
    for i in range(16):
        got = (tmp_path / "restored" / "k" / f"kernel{i}.so").read_bytes()
        assert got == (tmp_path / f"cache{i}" / "k" / f"kernel{i}.so").read_bytes()


READER = textwrap.dedent(
    """
    import os, sys, json
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from compile_cache.entry import Entry
    from compile_cache.restore import restore
    from compile_cache.stores import open_store
    from compile_cache.trust import TrustPolicy
    store = open_store(os.environ["COMPILE_CACHE_URL"])
    r = restore(Entry(store, "fleet-key", {{"inductor": Path(sys.argv[1])}}, {factors!r}, TrustPolicy()))
    print(json.dumps({{"status": r.status, "files": r.files, "reason": r.reason}}))
    """
)


def test_16_concurrent_restores_of_one_key(s3_env: dict[str, str], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from compile_cache.upload import Uploader

    apply_s3_env(monkeypatch, s3_env)
    src = tmp_path / "src"
    for i in range(40):
        (src / "k").mkdir(parents=True, exist_ok=True)
        (src / "k" / f"f{i}.so").write_bytes(os.urandom(50_000))
    store = open_store(s3_env["COMPILE_CACHE_URL"])
    r = Uploader(Entry(store, "fleet-key", {"inductor": src}, FACTORS, TrustPolicy()), "v1").upload()
    assert r is not None and r.files == 40

    script = tmp_path / "reader.py"
    script.write_text(READER.format(root=str(ROOT), factors=FACTORS))
    env = {**os.environ, **s3_env, "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / f"dst{i}")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(16)]
    for i, p in enumerate(procs):
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        res = json.loads(out.strip().splitlines()[-1])
        assert res["status"] == "hit" and res["files"] == 40, res
        assert (tmp_path / f"dst{i}" / "k" / "f7.so").read_bytes() == (src / "k" / "f7.so").read_bytes()


def test_restore_benchmark_command_runs_side_by_side(tmp_path: Path) -> None:
    """`scripts/bench_restore.py` (the restore benchmark) on a small entry: it starts its own SeaweedFS server,
    restores (asserting a hit each round) and prints the ratio to a raw GET of the same bytes, both measured."""
    out = subprocess.run(
        [sys.executable, "scripts/bench_restore.py", "--mb", "4", "--rounds", "2", "--json", "--dest", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout)
    assert res["entry_bytes"] > 4 * 10**6 * 0.5 and res["files"] > 10 and res["segments"] >= 1
    assert res["raw_get_mb_s"] > 0 and res["restore_mb_s"] > 0
    assert abs(res["ratio"] - res["restore_mb_s"] / res["raw_get_mb_s"]) < 0.01
    assert res["raw_get_to_file_mb_s"] > 0
    assert abs(res["ratio_to_file"] - res["restore_mb_s"] / res["raw_get_to_file_mb_s"]) < 0.01
    assert res["dest_fs"] != "unknown at ?"
    assert res["pages_released"] is True  # the default: each step's page cache dropped before the next one
    assert list(tmp_path.iterdir()) == []  # every restored copy and downloaded file removed again
    assert res["compressible"] is False and res["entry_bytes"] < res["unpacked_bytes"] < 1.2 * res["entry_bytes"]
    assert abs(res["restore_unpacked_mb_s"] / res["restore_mb_s"] - res["unpacked_bytes"] / res["entry_bytes"]) < 0.05

    out = subprocess.run(  # an entry that compresses like CPU kernels: few objects, each unpacking to much more
        [sys.executable, "scripts/bench_restore.py", "--mb", "40", "--rounds", "1", "--json", "--compressible"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout)
    assert res["compressible"] is True and res["unpacked_bytes"] > 10 * res["entry_bytes"]
    assert res["segments"] == 1  # 40 MB of files in 2 MB of objects: one segment (by its stored size)


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "scripts/bench_restore.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def _loopback_root_qdisc() -> str:
    return subprocess.run(["tc", "qdisc", "show", "dev", "lo"], capture_output=True, text=True, check=True).stdout


def _why_no_link() -> str | None:
    """Why `--link` cannot run on this machine, or None."""
    if sys.platform != "linux":
        return "it uses Linux's tc"
    if os.geteuid() != 0:
        return "it needs root"
    import shutil

    if shutil.which("tc") is None:
        return "tc (iproute2) is not installed"
    if not _loopback_root_qdisc().startswith("qdisc noqueue"):
        return "the loopback device has a queueing discipline already"
    return None


def test_restore_benchmark_link_rejects_what_it_cannot_shape() -> None:
    """`--link` shapes only the server the bench starts, with a rate tc understands; both refused before anything
    starts."""
    out = _bench("--link", "2gbit", "--url", "s3://bucket/prefix")
    assert out.returncode == 2 and "cannot shape the way to --url" in out.stderr, out.stderr
    out = _bench("--link", "fast")
    assert out.returncode == 2 and "give a rate as tc spells it" in out.stderr, out.stderr


def test_restore_benchmark_over_a_limited_link(tmp_path: Path) -> None:
    """`--link RATE`: every timed step's bytes go through the limited class (tc's own byte count), the limit holds
    (unlimited, this machine's raw GET runs at 500+ MB/s), and the qdisc is gone when the bench ends. A loopback
    device shaped by someone else is left alone."""
    why = _why_no_link()
    if why:
        pytest.skip(f"--link cannot run here: {why}")
    out = _bench("--mb", "8", "--rounds", "2", "--json", "--dest", str(tmp_path), "--link", "400mbit")
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout)
    assert res["link"] == "400mbit"
    assert res["link_bytes"] >= 2 * 3 * res["entry_bytes"]  # 2 rounds of raw GET, GET to file and restore
    assert res["raw_get_mb_s"] < 3 * 50 and res["restore_mb_s"] < 3 * 50  # 400 Mbit/s is 50 MB/s
    assert _loopback_root_qdisc().startswith("qdisc noqueue")

    subprocess.run(["tc", "qdisc", "add", "dev", "lo", "root", "handle", "5:", "htb"], check=True)
    try:
        out = _bench("--mb", "1", "--rounds", "1", "--link", "1gbit")
        assert out.returncode == 1 and "already has a queueing discipline (qdisc htb 5:)" in out.stderr, out.stderr
        assert "qdisc htb 5:" in _loopback_root_qdisc()
    finally:
        subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], check=True)


def _resident_pages(path: Path) -> int:
    """How many of ``path``'s pages are in the page cache: mincore(2) on a private mapping (which faults none in)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    size = path.stat().st_size
    vec = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            first = ctypes.c_char.from_buffer(mm)
            rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(first)), ctypes.c_size_t(size), vec)
            del first  # the mapping cannot close while a ctypes object points into it
        finally:
            mm.close()
    if rc != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return sum(v & 1 for v in vec)


def test_restore_benchmark_drops_each_steps_page_cache(tmp_path: Path) -> None:
    """The bench's _release: on a disk, files written back and kept with their pages dropped; on tmpfs (where the
    pages are the files) removed; with --keep-pages untouched and still cached."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench_restore
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    import mmap
    import shutil
    import tempfile

    # The disk case needs a disk: pages of a file on tmpfs cannot be dropped (a CI may mount /tmp as tmpfs).
    disk = tmp_path
    if bench_restore._fs_type(tmp_path).startswith("tmpfs "):
        (ROOT / ".cache").mkdir(exist_ok=True)
        disk = Path(tempfile.mkdtemp(prefix="test-release-", dir=ROOT / ".cache"))
    assert not bench_restore._fs_type(disk).startswith("tmpfs "), "no disk-backed directory to test on"
    data = os.urandom(100_000)
    pages = -(-len(data) // mmap.PAGESIZE)
    files = {}
    try:
        for case in ("disk", "tmpfs", "keep"):
            base = (disk if case == "disk" else tmp_path) / case
            (base / "ab").mkdir(parents=True)
            files[case] = base / "ab" / "c.so"
            files[case].write_bytes(data)
            assert _resident_pages(files[case]) == pages  # just written: every page cached (the check sees them)
            bench_restore._release(base, keep=case == "keep", tmpfs=case == "tmpfs")
        assert _resident_pages(files["disk"]) == 0 and files["disk"].read_bytes() == data
        assert not (tmp_path / "tmpfs").exists()
        assert _resident_pages(files["keep"]) == pages and files["keep"].read_bytes() == data
    finally:
        if disk != tmp_path:
            shutil.rmtree(disk)


def test_the_test_server_has_volumes_for_hundreds_of_buckets(seaweed: SeaweedServer) -> None:
    """Each S3 test takes a fresh bucket, and SeaweedFS gives each bucket volumes of its own. With weed's default
    budget (free disk / 1 GiB) a CI disk ran out after a few dozen buckets and PutObject answered HTTP 500.
    Measured on the shared server: what three buckets cost, against what is left."""
    def free_volumes() -> int:
        url = f"http://127.0.0.1:{seaweed.ports['master']}/dir/status"
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(json.load(r)["Topology"]["Free"])

    client = seaweed.client()
    before = free_volumes()
    for _ in range(3):
        bucket = seaweed.make_bucket(f"t-{uuid.uuid4().hex[:16]}")
        client.put_object(Bucket=bucket, Key="cc/object", Body=b"x" * 4096)
    after = free_volumes()
    per_bucket = max(1, before - after) / 3
    assert after / per_bucket >= 300, (before, after)  # the full suite makes under 60
