"""Which entries this process may load, and the warning when nothing is verified.

Loading a cache entry runs its code (pickles, shared objects), so the question is who could have written it. The
manifest lists every object's sha256 and carries an HMAC-SHA256 over itself, so a manifest that verifies vouches
for the whole entry. The rules (docs/security.md):

- With ``COMPILE_CACHE_SIGNING_KEY``: only manifests that verify with it, or with one of the earlier keys in
  ``COMPILE_CACHE_VERIFY_KEYS`` (a rotation in progress), are loaded. An unsigned one is refused, unless
  ``COMPILE_CACHE_ALLOW_UNSIGNED`` is on (migrating a store that was written without a key); one signed with any
  other key is always refused.
- Without a key nothing can be verified: every entry is loaded, unless ``COMPILE_CACHE_REQUIRE_SIGNED`` is on,
  which then refuses them all. A boot that restores from a store others can write (S3, a network filesystem, a
  mounted volume) logs one warning saying so.

Torch-free and boto3-free. Messages never contain a key.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from .config import Settings
from .errors import EntryRejected
from .manifest import Manifest
from .stores.base import Store

__all__ = ["TrustPolicy", "Verdict", "trust_policy", "warn_if_unverified"]

log = logging.getLogger("compile_cache")

# Who signed a manifest, as far as this process can tell: its own key, an earlier one (COMPILE_CACHE_VERIFY_KEYS),
# nobody, somebody it cannot check (no key here), or a key it does not hold.
Signer = Literal["current", "previous", "unsigned", "unchecked", "foreign"]


@dataclass(frozen=True)
class Verdict:
    loads: bool
    signer: Signer
    reason: str  # why it is refused, or a note on why it loads ("" when signed with the current key)


@dataclass(frozen=True)
class TrustPolicy:
    """The signing settings, and the one place that decides whether a manifest may be loaded."""

    signing_key: bytes | None = None
    verify_keys: tuple[bytes, ...] = ()  # earlier keys that still verify (never used to sign)
    allow_unsigned: bool = False
    require_signed: bool = False

    @classmethod
    def from_settings(cls, s: Settings) -> TrustPolicy:
        return cls(s.signing_key_bytes, s.verify_keys_bytes, s.allow_unsigned, s.require_signed)

    def _signer(self, m: Manifest) -> Signer:
        return self._signer_by(m.signature, m.signed_with)

    def _signer_by(self, signature: str | None, signed_with: Callable[[bytes], bool]) -> Signer:
        if signature is None:
            return "unsigned"
        if self.signing_key is None and not self.verify_keys:
            return "unchecked"
        if self.signing_key is not None and signed_with(self.signing_key):
            return "current"
        if any(signed_with(k) for k in self.verify_keys):
            return "previous"
        return "foreign"

    def sign(self, data: bytes) -> str | None:
        """HMAC-SHA256 (hex) of ``data`` under the signing key, None without one: for a small record kept beside a
        manifest (the build lease), which is judged by the same rules (:meth:`judge_record`)."""
        return _mac(self.signing_key, data) if self.signing_key else None

    def judge_record(self, data: bytes, signature: str | None) -> Verdict:
        """Whether a record with ``signature`` over ``data`` is trusted here, by the rules a manifest is judged by."""

        def signed_with(key: bytes) -> bool:
            return signature is not None and hmac.compare_digest(_mac(key, data).encode(), signature.encode())

        return self._verdict(self._signer_by(signature, signed_with))

    def judge(self, m: Manifest) -> Verdict:
        """Whether ``m`` may be loaded here, and why (never raises)."""
        return self._verdict(self._signer(m))

    def _verdict(self, signer: Signer) -> Verdict:
        if signer == "current":
            return Verdict(True, signer, "")
        if signer == "previous":
            return Verdict(
                True, signer, "signed with an earlier key (COMPILE_CACHE_VERIFY_KEYS); the next upload re-signs it"
            )
        if signer == "foreign":
            return Verdict(
                False,
                signer,
                "manifest signature does not verify with COMPILE_CACHE_SIGNING_KEY or COMPILE_CACHE_VERIFY_KEYS "
                "(tampered, or signed with another key)",
            )
        if self.signing_key is None:  # unsigned or unchecked: nothing here can verify it
            if self.require_signed:
                return Verdict(
                    False, signer, "COMPILE_CACHE_REQUIRE_SIGNED is on but no COMPILE_CACHE_SIGNING_KEY is set"
                )
            why = "unsigned" if signer == "unsigned" else "signed, but not checked"
            return Verdict(True, signer, f"manifest is {why}: no COMPILE_CACHE_SIGNING_KEY is set")
        if self.allow_unsigned:
            return Verdict(True, signer, "manifest is unsigned, loaded because COMPILE_CACHE_ALLOW_UNSIGNED is on")
        return Verdict(
            False,
            signer,
            "manifest is unsigned and COMPILE_CACHE_SIGNING_KEY is set: only signed entries are loaded "
            "(COMPILE_CACHE_ALLOW_UNSIGNED=1 accepts unsigned ones while migrating a store)",
        )

    def check(self, m: Manifest) -> Verdict:
        """The verdict on ``m``; raises EntryRejected (with the reason) if it must not be loaded."""
        v = self.judge(m)
        if not v.loads:
            raise EntryRejected(v.reason)
        return v

    def needs_resign(self, m: Manifest) -> bool:
        """True if ``m`` verified only with an earlier key: the current one should sign it before that key goes."""
        return self.signing_key is not None and self._signer(m) == "previous"


def _mac(key: bytes, data: bytes) -> str:
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def warn_if_unverified(store: Store, trust: TrustPolicy) -> bool:
    """Log one warning if ``store`` can be written from outside this container and nothing verifies what is
    restored from it. True if it warned."""
    if trust.signing_key is not None or trust.require_signed:
        return False
    where = store.outside_writers()
    if not where:
        return False
    log.warning(
        "UNVERIFIED cache: the store %s (%s) can be written from outside this container and no "
        "COMPILE_CACHE_SIGNING_KEY is set: whoever can write to it can run code in this container. Set "
        "COMPILE_CACHE_SIGNING_KEY to the same secret on every replica to load signed entries only (docs/security.md)",
        store.url,
        where,
    )
    return True


def trust_policy(settings: Settings, store: Store) -> TrustPolicy:
    """The boot's policy for ``store``, warning once if what it restores from there is verified by nothing."""
    trust = TrustPolicy.from_settings(settings)
    warn_if_unverified(store, trust)
    return trust
