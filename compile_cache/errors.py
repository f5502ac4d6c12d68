"""Exceptions of the framework. Each also subclasses the built-in a caller would catch anyway."""

from __future__ import annotations

__all__ = [
    "CacheError",
    "ConfigError",
    "StoreError",
    "ObjectNotFound",
    "PreconditionFailed",
    "IntegrityError",
    "ObjectTooLarge",
    "UnsafeArchive",
    "EntryRejected",
    "NewShapeError",
]


class CacheError(Exception):
    """Base class of every error raised by compile_cache."""


class ConfigError(CacheError, ValueError):
    """A setting is invalid. The message names the variable and the accepted forms."""


class StoreError(CacheError, OSError):
    """The store could not be read or written (unreachable, denied, throttled, ...)."""


class ObjectNotFound(StoreError, FileNotFoundError):
    """The named object does not exist in the store."""


class PreconditionFailed(StoreError):
    """A conditional write lost: the object changed (or appeared) since it was read."""


class IntegrityError(CacheError, ValueError):
    """Downloaded bytes do not match their recorded sha256, or an archive is malformed."""


class ObjectTooLarge(IntegrityError):
    """An object is larger than the reader's cap: refused after reading at most the cap (usually nothing)."""


class UnsafeArchive(IntegrityError):
    """An archive member would escape the cache dir, is a link or device, or breaks a cap."""


class EntryRejected(CacheError, PermissionError):
    """An entry exists but must not be loaded: foreign fingerprint, bad or missing signature."""


class NewShapeError(CacheError, RuntimeError):
    """A call's input shape was declared nowhere and the part's ``on_new_shape`` is ``"error"``."""
