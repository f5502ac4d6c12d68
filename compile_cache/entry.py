"""The entry handle: which entry of which store, where its files live here, and who decides what may load.

Restore, upload, lineage seeding and verification all speak of one entry; they take this one value instead of its
parts. Torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from .key import fingerprint_of
from .stores.base import Store
from .trust import TrustPolicy

__all__ = ["Entry"]


@dataclass(frozen=True, eq=False)
class Entry:
    """The entry ``key`` in ``store``, restored into and uploaded from ``roots`` (root label → local dir).

    ``factors`` are this environment's fingerprint factors: an entry written for others is refused. ``trust`` is
    the one source of the signing rules: which manifests may load, which this process may merge into, and the key
    it signs with. It has no default: a default policy loads unsigned entries, which a boot's settings may forbid.
    ``lineage`` and ``model_factors`` (docs/versions.md) name the model the entry belongs to, for seeding from a
    sibling on a miss and for a manifest this process creates.
    """

    store: Store
    key: str
    roots: Mapping[str, Path]
    factors: Mapping[str, str]
    trust: TrustPolicy
    lineage: str = ""
    model_factors: Mapping[str, str] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.factors)

    def sibling(self, key: str) -> Entry:
        """Another entry of the same store, environment and trust (a seed of the same lineage)."""
        return replace(self, key=key)
