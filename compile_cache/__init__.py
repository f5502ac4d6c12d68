"""compile_cache: compiled PyTorch models in Cog that boot warm.

    from compile_cache import CompiledRunner, CompileConfig, Batch, Example, Dim, ExportSpec, Part

The names that need torch (the runner base classes, ``Example``, ``Dim``, ``ExportSpec``) are imported lazily, so
that store-only tools (the CLI's ``ls``/``prune``) do not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import Batch, CompileConfig, Settings
from .errors import CacheError, ConfigError, EntryRejected, IntegrityError, NewShapeError, StoreError
from .parts import Part

__version__ = "0.1.0"

__all__ = [
    "CompiledRunner",
    "CompiledPredictor",
    "CompileConfig",
    "Batch",
    "Example",
    "Dim",
    "ExportSpec",
    "Part",
    "Settings",
    "CacheError",
    "ConfigError",
    "StoreError",
    "IntegrityError",
    "EntryRejected",
    "NewShapeError",
    "__version__",
]

# name -> the module that defines it (imported on first use: each imports torch)
_LAZY = {
    "CompiledRunner": ".lifecycle",
    "CompiledPredictor": ".lifecycle",
    "Example": ".compiler",
    "Dim": ".export",
    "ExportSpec": ".export",
}

if TYPE_CHECKING:
    from .compiler import Example
    from .export import Dim, ExportSpec
    from .lifecycle import CompiledPredictor, CompiledRunner


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'compile_cache' has no attribute {name!r}")
