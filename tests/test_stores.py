"""Every store case runs against both stores (a local directory and a real S3 server, SeaweedFS)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest

from compile_cache.errors import ObjectNotFound, PreconditionFailed, StoreError
from compile_cache.stores import Store, open_store
from tests.s3server import apply_s3_env


def _file(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _race(n: int, fn) -> list:
    """Run fn(i) on n threads released together; return their results (exceptions included)."""
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)
        except Exception as e:  # noqa: BLE001 - the test inspects it
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# -- reads ------------------------------------------------------------------------------------------------------------
def test_read_missing(store: Store, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound):
        store.read("nope/missing")
    with pytest.raises(FileNotFoundError):
        store.read_versioned("missing")
    with pytest.raises(ObjectNotFound):
        store.download("missing", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not store.exists("missing")


# -- immutable writes -------------------------------------------------------------------------------------------------
def test_put_immutable_first_writer_wins(store: Store, tmp_path: Path) -> None:
    assert store.put_immutable("blobs/a", _file(tmp_path, "one", b"first")) is True
    assert store.put_immutable("blobs/a", _file(tmp_path, "two", b"second")) is False
    assert store.read("blobs/a") == b"first"
    assert store.exists("blobs/a")


def test_put_immutable_empty_file(store: Store, tmp_path: Path) -> None:
    assert store.put_immutable("empty", _file(tmp_path, "e", b"")) is True
    assert store.read("empty") == b""
    assert store.download("empty", tmp_path / "out") == 0
    assert (tmp_path / "out").read_bytes() == b""


# -- conditional writes -----------------------------------------------------------------------------------------------
def test_put_conditional_create_only_once(store: Store) -> None:
    token = store.put_conditional("manifest.json", b"v1", None)
    assert token
    with pytest.raises(PreconditionFailed):
        store.put_conditional("manifest.json", b"v2", None)
    assert store.read_versioned("manifest.json") == (b"v1", token)


def test_put_conditional_compare_and_swap(store: Store) -> None:
    t1 = store.put_conditional("m", b"v1", None)
    t2 = store.put_conditional("m", b"v2", t1)
    assert t2 != t1
    with pytest.raises(PreconditionFailed):
        store.put_conditional("m", b"stale", t1)
    data, token = store.read_versioned("m")
    assert (data, token) == (b"v2", t2)
    store.put_conditional("m", b"v3", token)
    assert store.read("m") == b"v3"


def test_racing_creates_have_one_winner(store: Store) -> None:
    results = _race(8, lambda i: store.put_conditional("race", f"writer {i}".encode(), None))
    winners = [i for i, r in enumerate(results) if isinstance(r, str)]
    assert len(winners) == 1, results
    assert all(isinstance(r, PreconditionFailed) for i, r in enumerate(results) if i != winners[0]), results
    assert store.read("race") == f"writer {winners[0]}".encode()


def test_cas_merge_loop_loses_no_update(store: Store) -> None:
    def add(i: int) -> int:
        attempts = 0
        while True:
            attempts += 1
            try:
                data, token = store.read_versioned("list.json")
                items, if_match = json.loads(data), token
            except ObjectNotFound:
                items, if_match = [], None
            try:
                store.put_conditional("list.json", json.dumps(sorted({*items, i})).encode(), if_match)
                return attempts
            except PreconditionFailed:
                continue

    results = _race(8, add)
    assert all(isinstance(r, int) for r in results), results
    assert json.loads(store.read("list.json")) == list(range(8))


# -- downloads --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 100_000, 40 * 2**20 + 12345], ids=["1B", "100KB", "40MiB"])
def test_download(store: Store, tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    assert store.put_immutable("blob", _file(tmp_path, "src", data))
    seen: list[int] = []
    n = store.download("blob", tmp_path / "out", progress=seen.append)
    assert n == size == sum(seen)
    assert hashlib.sha256((tmp_path / "out").read_bytes()).digest() == hashlib.sha256(data).digest()


def test_open_read_streams_in_chunks(store: Store, tmp_path: Path) -> None:
    data = os.urandom(3 * 2**20 + 5)
    store.put_immutable("blob", _file(tmp_path, "src", data))
    chunks = []
    with store.open_read("blob") as f:
        while chunk := f.read(2**20):
            assert len(chunk) <= 2**20
            chunks.append(chunk)
    assert b"".join(chunks) == data and len(chunks) >= 4
    with pytest.raises(ObjectNotFound):
        store.open_read("missing")


def test_s3_body_cut_midway_is_a_store_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GET whose body stops short of its Content-Length (a dropped connection) is the store's one-line
    StoreError, which a restore turns into a cold boot; botocore raises it from the body's read, after the
    response was accepted, so no retry hides it. The endpoint is a socket that answers every request so."""
    import socket

    from compile_cache.stores.s3 import S3Store

    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 100000\r\nETag: "e"\r\n\r\n' + b"x" * 1000)

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{srv.getsockname()[1]}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret")
        store = S3Store.from_url("s3://bucket/cc", read_timeout=5, max_attempts=1)
        with store.open_read("objects/x") as body, pytest.raises(StoreError) as info:
            while body.read(2**16):
                pass
        msg = str(info.value)
        assert "GetObject s3://bucket/cc/objects/x" in msg and "\n" not in msg and "very-secret" not in msg
    finally:
        stop.set()
        srv.close()


def test_download_refuses_existing_dest(store: Store, tmp_path: Path) -> None:
    store.put_immutable("blob", _file(tmp_path, "src", b"x"))
    (tmp_path / "out").write_bytes(b"mine")
    with pytest.raises(FileExistsError):
        store.download("blob", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == b"mine"


# -- list / delete / names --------------------------------------------------------------------------------------------
def test_list_with_prefix(store: Store, tmp_path: Path) -> None:
    for name in ["a/1", "a/2", "ab/3", "b/4"]:
        store.put_immutable(name, _file(tmp_path, "src", name.encode()))
    assert sorted(o.name for o in store.list("a/")) == ["a/1", "a/2"]
    assert sorted(o.name for o in store.list("a")) == ["a/1", "a/2", "ab/3"]
    assert sorted(o.name for o in store.list()) == ["a/1", "a/2", "ab/3", "b/4"]
    info = next(iter(store.list("b/")))
    assert info.size == 3 and abs(info.modified - time.time()) < 300


def test_delete(store: Store, tmp_path: Path) -> None:
    store.put_immutable("gone", _file(tmp_path, "src", b"x"))
    store.delete("gone")
    store.delete("gone")  # absent is fine
    with pytest.raises(ObjectNotFound):
        store.read("gone")
    assert store.put_immutable("gone", _file(tmp_path, "src", b"y")) is True


@pytest.mark.parametrize("name", ["", "/abs", "../up", "a/../b", "a//b", "a/", ".hidden", "sp ace", "a\\b"])
def test_invalid_names_rejected(store: Store, tmp_path: Path, name: str) -> None:
    with pytest.raises(StoreError, match="invalid object name"):
        store.read(name)
    with pytest.raises(StoreError, match="invalid object name"):
        store.put_immutable(name, _file(tmp_path, "src", b"x"))
    with pytest.raises(StoreError, match="invalid object name"):
        store.put_conditional(name, b"x", None)


# -- S3 only: failures must be one clear StoreError, never a secret ---------------------------------------------------
def test_s3_url_and_layout(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, seaweed, tmp_path: Path) -> None:
    apply_s3_env(monkeypatch, s3_env)
    store = open_store(s3_env["COMPILE_CACHE_URL"])
    assert store.url.startswith(s3_env["COMPILE_CACHE_URL"])
    assert seaweed.endpoint in store.url and seaweed.secret_key not in store.url
    store.put_immutable("x/y", _file(tmp_path, "src", b"1"))
    bucket = s3_env["COMPILE_CACHE_URL"][len("s3://") :].split("/")[0]
    keys = [o["Key"] for o in seaweed.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["cc/x/y"]


def test_s3_wrong_secret(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "wrong-" + s3_env["AWS_SECRET_ACCESS_KEY"]
    apply_s3_env(monkeypatch, {**s3_env, "AWS_SECRET_ACCESS_KEY": secret})
    store = open_store(s3_env["COMPILE_CACHE_URL"])
    with pytest.raises(StoreError) as info:
        store.read("anything")
    msg = str(info.value)
    assert not isinstance(info.value, ObjectNotFound)
    assert "SignatureDoesNotMatch" in msg and "cc/anything" in msg and "\n" not in msg
    assert secret not in msg and s3_env["AWS_SECRET_ACCESS_KEY"] not in msg


@pytest.mark.serial  # bounds wall time
def test_s3_unreachable_endpoint_fails_fast(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from compile_cache.stores.s3 import S3Store
    from tests.s3server import free_ports

    apply_s3_env(monkeypatch, {**s3_env, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{free_ports(1)[0]}"})
    store = S3Store.from_url(s3_env["COMPILE_CACHE_URL"], connect_timeout=1, read_timeout=2, max_attempts=2)
    t0 = time.monotonic()
    with pytest.raises(StoreError, match="cannot connect") as info:
        store.put_conditional("m", b"x", None)
    assert time.monotonic() - t0 < 5
    assert s3_env["AWS_SECRET_ACCESS_KEY"] not in str(info.value)


def test_s3_missing_bucket(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    apply_s3_env(monkeypatch, {**s3_env, "COMPILE_CACHE_URL": "s3://no-such-bucket-here/cc"})
    store = open_store("s3://no-such-bucket-here/cc")
    for op in (
        lambda: store.read("m"),
        lambda: store.put_immutable("m", _file(tmp_path, "src", b"x")),
        lambda: list(store.list()),
        lambda: store.exists("m"),
    ):
        with pytest.raises(StoreError, match="NoSuchBucket") as info:
            op()
        assert not isinstance(info.value, ObjectNotFound)


def _s3_store(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    from compile_cache.stores.s3 import S3Store

    apply_s3_env(monkeypatch, s3_env)
    return S3Store.from_url(s3_env["COMPILE_CACHE_URL"])


def test_s3_multipart_put_immutable(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from compile_cache.stores import s3

    monkeypatch.setattr(s3, "MULTIPART_THRESHOLD", 6 * 2**20)
    monkeypatch.setattr(s3, "UPLOAD_PART_SIZE", 5 * 2**20)  # S3's minimum part size
    store = _s3_store(s3_env, monkeypatch)
    data = os.urandom(11 * 2**20 + 7)
    assert store.put_immutable("big", _file(tmp_path, "src", data)) is True
    assert store.put_immutable("big", _file(tmp_path, "other", b"y" * (7 * 2**20))) is False  # HEAD says: there
    # Lose the race after the HEAD: IfNoneMatch on CompleteMultipartUpload refuses, and the upload is aborted.
    real_call = store._call

    def head_says_absent(op: str, key: str, **kw):
        if op == "HeadObject":
            raise ObjectNotFound("pretend the HEAD came before the other writer's upload")
        return real_call(op, key, **kw)

    monkeypatch.setattr(store, "_call", head_says_absent)
    assert store.put_immutable("big", _file(tmp_path, "other", b"y" * (7 * 2**20))) is False
    assert store.read("big") == data
    assert not store._client.list_multipart_uploads(Bucket=store.bucket).get("Uploads")


def test_s3_download_without_thread_pool(
    s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """At interpreter shutdown executors refuse work (docs/cog-runtime.md): the download falls back to the calling thread."""
    from concurrent.futures import ThreadPoolExecutor

    from compile_cache.stores import s3

    store = _s3_store(s3_env, monkeypatch)
    data = os.urandom(3 * s3.PART_SIZE + 5)
    store.put_immutable("blob", _file(tmp_path, "src", data))
    calls = []

    def refuse(self, *a, **kw):
        calls.append(1)
        raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    monkeypatch.setattr(ThreadPoolExecutor, "submit", refuse)
    seen: list[int] = []
    assert store.download("blob", tmp_path / "out", progress=seen.append) == len(data) == sum(seen)
    assert calls and (tmp_path / "out").read_bytes() == data


def test_s3_put_immutable_inside_atexit(s3_env: dict[str, str], tmp_path: Path) -> None:
    """The exit flush runs in an atexit handler: plain put_object and multipart must work there."""
    import subprocess
    import sys

    src = _file(tmp_path, "src", os.urandom(7 * 2**20))
    script = f"""
import atexit, sys
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from compile_cache.stores import open_store, s3
s3.MULTIPART_THRESHOLD, s3.UPLOAD_PART_SIZE = 6 * 2**20, 5 * 2**20
store = open_store({s3_env["COMPILE_CACHE_URL"]!r})
def flush():
    ok = store.put_immutable("mp", {str(src)!r}) and store.put_immutable("small", {str(src)!r}.replace("src", "s"))
    open({str(tmp_path / "result")!r}, "w").write(str(ok))
atexit.register(flush)
"""
    (tmp_path / "s").write_bytes(b"small")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | s3_env
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=60)
    assert (tmp_path / "result").read_text() == "True"
