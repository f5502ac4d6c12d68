"""A store in a local (or network-mounted) directory: the zero-setup default."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from filelock import FileLock

from ..errors import ObjectNotFound, PreconditionFailed, StoreError
from .base import ObjectInfo, Progress, Store, check_name, too_large

__all__ = ["LocalStore"]

_CHUNK = 1 << 20
_TMP_SUFFIX = ".incomplete"


class LocalStore(Store):
    """Objects are files under ``root``. Every write goes to ``<name>.<uuid>.incomplete`` and is then renamed (or
    linked) into place, so a reader sees the old file or the new one, never half of one. A file lock per mutable
    object serialises compare-and-swap between co-located workers."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()
        self.url = f"file://{self.root}"

    def _path(self, name: str) -> Path:
        return self.root / check_name(name)

    def _tmp(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.with_name(f"{path.name}.{uuid.uuid4().hex}{_TMP_SUFFIX}")

    def read_versioned(self, name: str, *, max_bytes: int | None = None) -> tuple[bytes, str]:
        path = self._path(name)
        try:
            with open(path, "rb") as f:
                if max_bytes is not None and (size := os.fstat(f.fileno()).st_size) > max_bytes:
                    raise too_large(f"{self.url}/{name}", size, max_bytes)
                data = f.read() if max_bytes is None else f.read(max_bytes + 1)  # +1: it may grow meanwhile
            if max_bytes is not None and len(data) > max_bytes:
                raise too_large(f"{self.url}/{name}", None, max_bytes)
        except FileNotFoundError as e:
            raise ObjectNotFound(f"{self.url}/{name}: not found") from e
        except OSError as e:
            raise StoreError(f"{self.url}/{name}: {e.strerror or e}") from e
        return data, hashlib.sha256(data).hexdigest()

    def open_read(self, name: str) -> BinaryIO:  # a file is its own context manager
        path = self._path(name)
        try:
            return open(path, "rb")
        except FileNotFoundError as e:
            raise ObjectNotFound(f"{self.url}/{name}: not found") from e
        except OSError as e:
            raise StoreError(f"{self.url}/{name}: {e.strerror or e}") from e

    def download(self, name: str, dest: Path, *, progress: Progress | None = None) -> int:
        path = self._path(name)
        total = 0
        try:
            with open(path, "rb") as src, open(dest, "xb") as out:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    total += len(chunk)
                    if progress:
                        progress(len(chunk))
        except FileNotFoundError as e:
            if not path.exists():
                raise ObjectNotFound(f"{self.url}/{name}: not found") from e
            raise
        return total

    def put_immutable(self, name: str, src: Path) -> bool:
        path = self._path(name)
        if path.exists():
            return False
        tmp = self._tmp(path)
        try:
            shutil.copyfile(src, tmp)
            try:
                os.link(tmp, path)  # fails if path exists: first writer wins, nobody overwrites
            except FileExistsError:
                return False
            return True
        except OSError as e:
            raise StoreError(f"{self.url}/{name}: {e.strerror or e}") from e
        finally:
            tmp.unlink(missing_ok=True)

    def put_conditional(self, name: str, data: bytes, if_match: str | None) -> str:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        # The lock only orders co-located writers; readers never take it (the rename is what they rely on).
        with FileLock(str(path) + ".lock", timeout=30):
            try:
                current: str | None = hashlib.sha256(path.read_bytes()).hexdigest()
            except FileNotFoundError:
                current = None
            if current != if_match:
                raise PreconditionFailed(f"{self.url}/{name}: changed since read")
            tmp = self._tmp(path)
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise StoreError(f"{self.url}/{name}: {e.strerror or e}") from e
        return hashlib.sha256(data).hexdigest()

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        if not self.root.is_dir():
            return
        # Walk only the directory the prefix names (``entries/`` for a lineage's entries, not every object).
        start = self.root.joinpath(*prefix.split("/")[:-1]) if "/" in prefix else self.root
        for dirpath, _dirs, files in os.walk(start):
            for fn in files:
                if fn.endswith((_TMP_SUFFIX, ".lock")):
                    continue
                p = Path(dirpath) / fn
                name = p.relative_to(self.root).as_posix()
                if name.startswith(prefix):
                    try:
                        st = p.stat()
                    except FileNotFoundError:
                        continue
                    yield ObjectInfo(name, st.st_size, st.st_mtime)

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def delete(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    def outside_writers(self) -> str:
        """A network filesystem, or any other mount than the project directory's (a volume, a host directory): a
        directory on the container's own filesystem (the default, .cache/compile-store) or a tmpfs is private."""
        store, own = _mount_of(self.root), _mount_of(Path.cwd())
        if store is None or own is None:  # no /proc/self/mountinfo: cannot tell, stay quiet
            return ""
        point, fstype = store
        if fstype in _NETWORK_FS or fstype.startswith("fuse."):
            return f"a {fstype} network filesystem at {point}"
        if point != own[0] and fstype not in ("tmpfs", "ramfs"):
            return f"a {fstype} filesystem mounted at {point}, not the project's"
        return ""


# Filesystems other machines can write to (fuse.* too: s3fs, gcsfuse, sshfs, juicefs ...).
_NETWORK_FS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "lustre", "gpfs", "beegfs", "afs", "9p", "virtiofs"}
)


def _mount_of(path: Path) -> tuple[str, str] | None:
    """(mount point, filesystem type) of the mount holding ``path`` (or its nearest existing parent)."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    target = os.path.realpath(p)
    best: tuple[str, str] | None = None
    for line in lines:
        # "36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw": point is field 5, type after "-"
        fields = line.split()
        if "-" not in fields or len(fields) < 5:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])  # "\040" is a space
        fstype = fields[fields.index("-") + 1]
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):  # the last of stacked mounts wins
            best = (point, fstype)
    return best
