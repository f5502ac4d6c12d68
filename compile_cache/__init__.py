"""compile_cache: compiled PyTorch models in Cog that boot warm.

The Predictor base class lives in :mod:`compile_cache.lifecycle`; it is imported lazily so that store-only tools
(the CLI's ``ls``/``prune``) do not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import CompileConfig, Settings
from .errors import CacheError, ConfigError, EntryRejected, IntegrityError, StoreError

__version__ = "0.1.0"

__all__ = [
    "CompiledPredictor",
    "CompileConfig",
    "Settings",
    "CacheError",
    "ConfigError",
    "StoreError",
    "IntegrityError",
    "EntryRejected",
    "__version__",
]

if TYPE_CHECKING:
    from .lifecycle import CompiledPredictor


def __getattr__(name: str) -> Any:
    if name == "CompiledPredictor":
        from .lifecycle import CompiledPredictor

        return CompiledPredictor
    raise AttributeError(f"module 'compile_cache' has no attribute {name!r}")
