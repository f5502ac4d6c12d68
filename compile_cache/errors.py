"""Exceptions of the framework: every one derives from :class:`CacheError`, and each also subclasses the built-in a
caller would catch anyway (``except ValueError`` still catches a bad setting). The tree::

    CacheError
    ├── ConfigError (ValueError)            a setting is invalid
    ├── StoreError (OSError)                the store could not be read or written
    │   ├── ObjectNotFound (FileNotFoundError)
    │   └── PreconditionFailed              a conditional write lost
    ├── IntegrityError (ValueError)         bytes or an archive are not what the manifest says
    │   ├── ObjectTooLarge
    │   └── UnsafeArchive
    ├── EntryRejected (PermissionError)     an entry that must not be loaded
    ├── NewShapeError (RuntimeError)        an undeclared shape under on_new_shape="error"
    ├── ExportError (RuntimeError)          torch.export or the AOTInductor build failed (export strategy)
    ├── PackageLoadError (RuntimeError)     an AOTInductor package does not load here
    ├── ShapeOutOfRange (ValueError)        an input outside an AOTInductor package's shapes
    ├── RoundTripError (RuntimeError)       a precompiled function, loaded back, differs from eager (jit_restore)
    └── ToolError (RuntimeError)            a benchmark or check tool (compile_cache/tools) cannot trust its result
        └── BenchError, BootFailed, CheckError, RuntimeFailure (declared in the tools)

tests/test_errors.py checks that every exception class in the package is in this tree.
"""

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
    "ExportError",
    "PackageLoadError",
    "ShapeOutOfRange",
    "RoundTripError",
    "ToolError",
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


class ExportError(CacheError, RuntimeError):
    """torch.export or the AOTInductor package build failed (the cause is chained)."""


class PackageLoadError(CacheError, RuntimeError):
    """An AOTInductor package could not be loaded or does not fit this machine / model."""


class ShapeOutOfRange(CacheError, ValueError):
    """An input is outside the shapes / dtypes an AOTInductor package was built for."""


class RoundTripError(CacheError, RuntimeError):
    """A precompiled function that, saved and loaded back, does not give the eager output."""


class ToolError(CacheError, RuntimeError):
    """A tool of compile_cache/tools failed (a boot it ran, a benchmark, a check): its result cannot be trusted."""
