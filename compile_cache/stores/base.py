"""The store interface: a flat namespace of named objects with two kinds of write.

The base class owns the policy every backend shares (naming, progress, validation); a backend implements a few
primitives. Correctness comes from the primitives' atomicity, not from locks:

- ``put_immutable`` writes an object only if it does not exist yet (S3 ``IfNoneMatch='*'``, local ``link``);
  objects are content-addressed, so "already there" means "already right".
- ``put_conditional`` is compare-and-swap on a small mutable object (the manifest): S3 ``IfMatch=<etag>``,
  local: a file lock around read-compare-rename. A loser gets :class:`PreconditionFailed` and merges again.
"""

from __future__ import annotations

import contextlib
import io
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import ObjectTooLarge, StoreError

__all__ = ["Store", "ObjectInfo", "Progress", "check_name", "too_large"]

# Called with the number of bytes just transferred.
Progress = Callable[[int], None]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*(/[A-Za-z0-9][A-Za-z0-9._=+-]*)*$")


def check_name(name: str) -> str:
    """Object names are relative, '/'-separated, without '..' or empty parts: nothing can escape the store root."""
    if not _NAME.match(name) or ".." in name.split("/"):
        raise StoreError(f"invalid object name {name!r}")
    return name


def too_large(where: str, size: int | None, cap: int) -> ObjectTooLarge:
    """The error of a capped read: ``size`` is the object's full size where the backend knows it."""
    what = f"{size} bytes" if size is not None else "larger"
    return ObjectTooLarge(f"{where}: {what}, over the cap of {cap} bytes: refused without reading it whole")


@dataclass(frozen=True)
class ObjectInfo:
    name: str
    size: int
    modified: float  # unix time


class Store(ABC):
    """A place that holds objects. ``url`` is for display and never contains a secret."""

    url: str

    # -- primitives every backend implements -----------------------------------------------------------------------
    @abstractmethod
    def read_versioned(self, name: str, *, max_bytes: int | None = None) -> tuple[bytes, str]:
        """Return (content, version token). Raises ObjectNotFound.

        With ``max_bytes``, an object larger than that raises ObjectTooLarge having read at most ``max_bytes`` + 1
        bytes of it: the backend asks for the size first (a stat, an S3 ranged GET's Content-Range), so a huge
        object costs nothing. For what must be checked before it is trusted (the manifest)."""

    @abstractmethod
    def download(self, name: str, dest: Path, *, progress: Progress | None = None) -> int:
        """Stream object ``name`` into the new file ``dest``; return the byte count. Raises ObjectNotFound."""

    @abstractmethod
    def put_immutable(self, name: str, src: Path) -> bool:
        """Write the file ``src`` as ``name`` unless ``name`` exists. True if written, False if it was there."""

    @abstractmethod
    def put_conditional(self, name: str, data: bytes, if_match: str | None) -> str:
        """Replace ``name`` with ``data`` if its version is ``if_match`` (None: only if absent).

        Returns the new version token. Raises PreconditionFailed when someone else wrote first.
        """

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects whose name starts with ``prefix``."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove ``name``; absent is fine."""

    # -- conveniences built on the primitives ----------------------------------------------------------------------
    def read(self, name: str, *, max_bytes: int | None = None) -> bytes:
        return self.read_versioned(name, max_bytes=max_bytes)[0]

    def open_read(self, name: str) -> AbstractContextManager[BinaryIO]:
        """Object ``name`` as a stream to ``read(n)`` from, for a restore that unpacks while it downloads. Raises
        ObjectNotFound on opening, StoreError if the transfer fails midway. The default reads it into memory."""
        return contextlib.nullcontext(io.BytesIO(self.read(name)))

    def exists(self, name: str) -> bool:
        return any(o.name == name for o in self.list(name))

    def outside_writers(self) -> str:
        """What makes this store writable from outside this container, in a few words ("an S3 bucket"), or ""
        when only this container's own filesystem holds it. The boot warns when such a store is trusted blindly
        (no signing key): whoever can write to it can run code in every container that restores from it."""
        return ""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the default has none."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"
