"""The manifest: the one small mutable object per cache key, written last.

It lists the immutable, content-addressed segments (packed archives) that make up the entry, with every file's
sha256, and records the fingerprint factors of the environment that wrote it. Readers load only what it lists;
writers merge (union) their new segment into the latest manifest with a compare-and-swap. With a signing key it
carries an HMAC-SHA256 over its canonical JSON, so a tampered manifest (and through the hashes it lists, any
tampered object) is refused (trust.TrustPolicy decides).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import EntryRejected, IntegrityError
from .key import diff_factors, fingerprint_of

__all__ = ["FileEntry", "Segment", "Manifest", "manifest_name", "object_name", "MAX_MANIFEST_BYTES"]

MANIFEST_FORMAT = 1
MAX_VERSIONS = 100  # labels remembered per entry (a platform pushes thousands of fine-tunes onto one entry)

# Caps a reader applies before it trusts anything in a manifest. A file takes a few hundred bytes of manifest
# (docs/benchmarks.md, "Figures behind the code's comments"), so 16 MiB lists tens of thousands of files, far more
# than any entry written here; a larger manifest is refused unread (stores.base.Store.read_versioned
# with max_bytes). Segments: uploads cut them at about 8 MiB and writers compact past 64 (upload.MAX_SEGMENTS), so
# an entry at the default 8 GiB restore cap needs about 1,024.
MAX_MANIFEST_BYTES = 16 * 2**20
MAX_MANIFEST_SEGMENTS = 1024


def manifest_name(key: str) -> str:
    return f"entries/{key}/manifest.json"


def object_name(sha256: str) -> str:
    return f"objects/{sha256[:2]}/{sha256}.tar.zst"


class FileEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    path: str  # "<root>/<relative path>", e.g. "inductor/fxgraph/ab/..."
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Segment(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # of the compressed archive object
    size: int = Field(ge=0)
    files: list[FileEntry]
    written_by: str = ""
    written_at: float = 0.0

    @property
    def object(self) -> str:
        return object_name(self.sha256)

    @property
    def unpacked_bytes(self) -> int:
        return sum(f.size for f in self.files)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: int = MANIFEST_FORMAT
    key: str
    model_version: str
    fingerprint: str
    factors: dict[str, str]
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    segments: list[Segment] = Field(default_factory=list)
    # Versions (docs/versions.md). ``model_version`` is the label of the version that created the entry; ``versions``
    # every label that has used it (label -> when it first did; the newest MAX_VERSIONS), since versions that
    # compile the same share one entry. ``lineage`` and ``model_factors`` (what the key's model part hashes) let
    # a miss name what differs; ``seeded_from`` is the entry this one started from (its segments are referenced).
    lineage: str = ""
    model_factors: dict[str, str] = Field(default_factory=dict)
    versions: dict[str, float] = Field(default_factory=dict)
    seeded_from: str = ""
    # The parts the entry covers: part name -> what serves it ("export", "jit/precompile", "jit/dir"), written by the
    # processes that compiled them (a part that fell back to eager is not listed). Under the "serve" policy a boot
    # swaps in only these (docs/fleet.md). Empty in entries written before parts were listed: nothing is known.
    parts: dict[str, str] = Field(default_factory=dict)
    signature: str | None = None

    # -- content ---------------------------------------------------------------------------------------------------
    def files(self) -> dict[str, FileEntry]:
        out: dict[str, FileEntry] = {}
        for seg in self.segments:
            for f in seg.files:
                out.setdefault(f.path, f)
        return out

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.segments)

    def labels(self) -> dict[str, float]:
        """Every version label of this entry with when it first used it (the creator's at ``created_at``)."""
        return {self.model_version: self.created_at, **self.versions}

    def with_label(self, label: str) -> Manifest:
        """A copy that lists ``label`` among its versions (the newest MAX_VERSIONS are kept)."""
        versions = {**self.versions, label: time.time()}
        if len(versions) > MAX_VERSIONS:
            versions = dict(sorted(versions.items(), key=lambda kv: kv[1])[-MAX_VERSIONS:])
        return self.model_copy(update={"versions": versions, "updated_at": time.time()}, deep=True)

    def with_parts(self, parts: Mapping[str, str]) -> Manifest:
        """A copy that also lists those of ``parts`` it does not list yet. A part listed stays as it is: boots under
        the two jit restores share the entry and would otherwise rewrite each other's spelling at every boot."""
        return self.model_copy(update={"parts": {**parts, **self.parts}, "updated_at": time.time()}, deep=True)

    def with_segment(self, seg: Segment) -> Manifest:
        """A copy with ``seg`` added (a no-op copy if it adds no file the manifest lacks)."""
        have = self.files()
        if all(f.path in have for f in seg.files) or any(s.sha256 == seg.sha256 for s in self.segments):
            return self.model_copy(deep=True)
        return self.model_copy(update={"segments": [*self.segments, seg], "updated_at": time.time()}, deep=True)

    # -- bytes, signing, checks -------------------------------------------------------------------------------------
    def _canonical(self) -> bytes:
        body = self.model_dump(mode="json", exclude={"signature"})
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def to_bytes(self, signing_key: bytes | None = None) -> bytes:
        sig = hmac.new(signing_key, self._canonical(), hashlib.sha256).hexdigest() if signing_key else None
        body = self.model_dump(mode="json")
        body["signature"] = sig
        return json.dumps(body, sort_keys=True, indent=1).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse; raises IntegrityError on anything that is not a well-formed manifest."""
        try:
            m = cls.model_validate_json(data)
        except (ValidationError, ValueError) as e:
            raise IntegrityError(f"manifest is malformed: {str(e).splitlines()[0]}") from e
        if m.format != MANIFEST_FORMAT:
            raise IntegrityError(f"manifest format {m.format} is not {MANIFEST_FORMAT}")
        if fingerprint_of(m.factors) != m.fingerprint:
            raise IntegrityError("manifest fingerprint does not match its factors")
        return m

    def check(self, *, key: str, factors: Mapping[str, str]) -> None:
        """Raise EntryRejected unless this manifest was written for this key and this environment. Whether its
        writer is trusted (the signature) is trust.TrustPolicy's call."""
        if self.key != key:
            raise EntryRejected(f"manifest was written for key {self.key!r}, not {key!r}")
        if self.fingerprint != fingerprint_of(factors):
            diff = "; ".join(diff_factors(self.factors, factors)[:4])
            raise EntryRejected(f"manifest fingerprint is foreign ({diff})")
        if len(self.segments) > MAX_MANIFEST_SEGMENTS:
            raise EntryRejected(f"manifest lists {len(self.segments)} segments, more than {MAX_MANIFEST_SEGMENTS}")

    def signed_with(self, signing_key: bytes) -> bool:
        """True if the signature is this manifest's HMAC-SHA256 under ``signing_key`` (constant-time compare)."""
        if self.signature is None:
            return False
        expected = hmac.new(signing_key, self._canonical(), hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected.encode(), self.signature.encode())  # str compare refuses non-ASCII
