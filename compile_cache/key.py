"""The cache key: lineage + model part (what compiles, see versions.py) + environment fingerprint.

The fingerprint is a hash of a named, sorted list of factors (vLLM's habit), so ``inspect`` can show a person why
two keys differ. compile_cache/factors.py lists every factor and why it is there.
"""

from __future__ import annotations

import hashlib
import platform
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["CacheKey", "fingerprint_of", "diff_factors", "split_key"]


def _short(text: str, n: int = 12) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def fingerprint_of(factors: Mapping[str, str]) -> str:
    return _short("\n".join(f"{k}={factors[k]}" for k in sorted(factors)))


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
