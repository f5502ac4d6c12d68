"""The cache key: lineage + model part (what compiles, see versions.py) + environment fingerprint.

The fingerprint is a hash of a named, sorted list of factors (vLLM's habit), so ``inspect`` can show a person why
two keys differ. Everything that changes generated code or its ABI is a factor: torch build, Python, device kind,
CPU ISA (Inductor builds C++ for the host ISA: on a CPU without it the code can die of SIGILL), GPU arch, CUDA and Triton
versions, the compile config. Nothing else is (host name, paths, time), so equal environments share entries.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__

__all__ = ["CacheKey", "environment_factors", "hash_paths", "fingerprint_of", "diff_factors", "split_key"]

# Bump when the store layout or snapshot format changes. 2: keys are <lineage>.<model part>.<summary>.<fingerprint>
# and manifests carry lineage, labels and the seed.
FORMAT_VERSION = "2"


def _short(text: str, n: int = 12) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def fingerprint_of(factors: Mapping[str, str]) -> str:
    return _short("\n".join(f"{k}={factors[k]}" for k in sorted(factors)))


def environment_factors(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Every factor of this process's environment that decides whether an artifact can be loaded here."""
    import torch  # lazy: the key's store-side users (CLI ls/prune) need no torch

    f: dict[str, str] = {
        "compile_cache.format": FORMAT_VERSION,
        "compile_cache.version": __version__,
        "python": f"{sys.implementation.name}-{platform.python_version()}",
        "platform": f"{platform.system()}-{platform.machine()}",
        "torch": torch.__version__,
        "torch.git": str(getattr(torch.version, "git_version", "")),
        "cpu.isa": torch.backends.cpu.get_cpu_capability(),
    }
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        f["device"] = "cuda"
        f["gpu.arch"] = f"sm_{major}{minor}"
        f["gpu.name"] = torch.cuda.get_device_name()
        f["cuda"] = str(torch.version.cuda or "")
        f["hip"] = str(getattr(torch.version, "hip", "") or "")
        try:
            import triton

            f["triton"] = triton.__version__
        except ImportError:
            f["triton"] = "none"
    else:
        f["device"] = "cpu"
    f.update(extra or {})
    return f


def hash_paths(paths: Iterable[Path], *, base: Path | None = None) -> str:
    """A content hash of files and directories (recursively), by relative name and bytes; 12 hex digits.

    Missing paths are skipped (their absence is part of the hash through the names that are hashed)."""
    h = hashlib.sha256()
    for root in sorted({Path(p).absolute() for p in paths}):
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for p in files:
            if not p.is_file() or "__pycache__" in p.parts or p.name.startswith("."):
                continue
            rel = os.path.relpath(p, base or root.parent)  # names count: a renamed file is a change
            h.update(f"{rel}\0{p.stat().st_size}\0".encode())
            with open(p, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
    return h.hexdigest()[:12]


_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")


@dataclass(frozen=True)
class CacheKey:
    """``[<lineage>.]<model part>.<readable summary>.<fingerprint hash>``: one path segment, safe in every store.

    ``model_version`` is the key's model part: what compiles (``versions.ModelVersion.part``), or any explicit id.
    With a ``lineage`` (no dots) the key starts with it, so the entries of one lineage share a name prefix: a miss
    lists only those (``entries/<lineage>.``) to find a seed and explain itself."""

    model_version: str
    factors: Mapping[str, str] = field(default_factory=dict)
    lineage: str = ""

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.factors)

    @property
    def summary(self) -> str:
        f = self.factors
        py = "".join(platform.python_version_tuple()[:2]) if "python" not in f else "".join(
            f["python"].split("-")[-1].split(".")[:2]
        )
        arch = f.get("gpu.arch") or f.get("cpu.isa", "any")
        parts = [f"torch{f.get('torch', '?')}", f"py{py}", f.get("device", "?"), arch, f.get("compile.strategy", "")]
        return _UNSAFE.sub("_", "-".join(p for p in parts if p)).lower()

    @property
    def name(self) -> str:
        head = f"{_UNSAFE.sub('_', self.lineage).replace('.', '_')}." if self.lineage else ""
        return f"{head}{_UNSAFE.sub('_', self.model_version)}.{self.summary}.{self.fingerprint}"

    def __str__(self) -> str:
        return self.name


def diff_factors(a: Mapping[str, str], b: Mapping[str, str]) -> list[str]:
    """Human-readable differences between two factor sets, sorted by factor name."""
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            out.append(f"{k}: {a.get(k, '<absent>')!s} != {b.get(k, '<absent>')!s}")
    return out


def split_key(name: str) -> tuple[str, str, str]:
    """(lineage, model part, fingerprint) of a key ``<lineage>.<model part>.<summary>.<fingerprint>`` (the summary
    has dots of its own: the torch version). Only keys with a lineage have this layout; every runtime key does."""
    lineage, part, _ = (name.split(".", 2) + ["", ""])[:3]
    return lineage, part, name.rsplit(".", 1)[-1]
