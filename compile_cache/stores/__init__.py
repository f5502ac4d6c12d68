"""Stores: where cache entries live. ``open_store(url)`` picks the backend; S3 is imported only when asked for."""

from __future__ import annotations

from pathlib import Path

from ..config import Settings
from .base import ObjectInfo, Store
from .local import LocalStore

__all__ = ["Store", "ObjectInfo", "LocalStore", "open_store"]


def open_store(url: str, settings: Settings | None = None, *, base_dir: Path | None = None) -> Store:
    """Open the store named by ``url``: ``s3://bucket/prefix``, ``file://dir`` or a plain directory path.

    Relative local paths are resolved against ``base_dir`` (default: the current directory, which is the project
    directory under Cog).
    """
    if url.startswith("s3://"):
        from .s3 import S3Store  # lazy: boto3 only for users who use S3

        return S3Store.from_url(url, settings)
    path = Path(url[len("file://") :] if url.startswith("file://") else url).expanduser()
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / path
    return LocalStore(path)
