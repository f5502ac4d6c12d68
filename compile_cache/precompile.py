"""``jit_restore="precompile"``: AOT-precompiled functions, one per input shape, kept in the Inductor cache dir.

The dir snapshot alone saves Inductor's work but a warm boot still traces every shape with Dynamo; a precompiled
function (``torch.compile(...).aot_compile``, saved with ``save_compiled_function``) skips that too. Measured on the
example's four warm-up shapes: 3.6 s instead of 8.0 s, with the dir restored (without it, 19 s: the kernels are
rebuilt) — docs/restore-strategies.md, scripts/restore_strategies.py. The files live under the Inductor cache dir,
so the snapshot ships them with the kernels they need.

Experimental in torch 2.13, and it shows:

- Guards: transformers models leave guards that cannot be serialized (ID_MATCH on torch functions and on code
  objects transformers inspects: ``PackageError``). Only the portable ones are kept (tensor shapes, dtypes and
  strides; global grad state). The cache key (predictor code, weights, pinned requirements) stands in for the rest.
- Grad mode: a precompiled function fails its guards under ``inference_mode`` (measured, even when built under it):
  built and called under ``no_grad``, outside inference mode.
- ``fullgraph``: a model with a graph break cannot be precompiled. It, and any call precompiling fails for, goes
  through the ordinary jit function (which the dir snapshot keeps warm).

A call no precompiled function accepts is precompiled then and saved, so the next boot has it.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .compiler import describe_args
from .config import CompileConfig

__all__ = ["Precompiled"]

log = logging.getLogger("compile_cache")

_STAGING = ".staging"  # a dot-dir: snapshots skip it, so a half-written file is never uploaded
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def aot_compile_enabled() -> Any:
    """A context in which ``torch.compile`` returns functions with ``.aot_compile``. torch 2.11 attaches it only
    while ``torch._dynamo.config.enable_aot_compile`` is on (off by default there; on, and always on, from 2.13)."""
    import contextlib

    if hasattr(torch._dynamo.config, "enable_aot_compile"):
        return torch._dynamo.config.patch(enable_aot_compile=True)
    return contextlib.nullcontext()


class Precompiled:
    """A callable over the precompiled functions in ``directory``: the first whose guards accept the inputs serves
    the call; none does → precompile these inputs and save; that fails → ``fallback`` (the jit function)."""

    def __init__(self, module: Callable[..., Any], fallback: Callable[..., Any], cfg: CompileConfig,
                 directory: Path) -> None:
        self.module, self.fallback, self.cfg, self.dir = module, fallback, cfg, directory
        # A bound method is compiled, so the module is the functions' first argument (and their guards' too).
        self._prefix: tuple[Any, ...] = (module,) if isinstance(module, torch.nn.Module) else ()
        self._target = module.forward if isinstance(module, torch.nn.Module) else module
        self._lock = threading.Lock()
        self.broken = ""  # why precompiling was given up: every later call goes to the fallback
        if cfg.mode not in (None, "default"):  # torch.compile takes mode or options, and the guard filter is one
            self.broken = f"mode={cfg.mode!r} cannot be combined with precompile"
            log.warning("precompile: %s; serving through the jit function", self.broken)
        self.fns: list[Any] = []
        self.loaded = self.built = 0
        self.policy = "compile"  # warm-up precompiles what it meets; serve() applies on_new_shape
        for path in sorted(directory.glob("*.bin")) if directory.is_dir() else []:
            try:
                with open(path, "rb") as f:
                    self.fns.append(torch.compiler.load_compiled_function(f, external_data={"model": module}))
                self.loaded += 1
            except Exception as e:  # a file from another torch, or damaged: rebuilt on first use of its shape
                log.warning("precompile: cannot load %s (%s: %s); it will be rebuilt", path.name, type(e).__name__, e)
        log.info("precompile: %d function(s) loaded from %s", self.loaded, directory)

    def serve(self, policy: str) -> None:
        """Setup is done. Under "eager" or "error" a call no precompiled function accepts runs uncompiled instead of
        being precompiled, and the jit fallback (a model precompiling failed for) runs in Dynamo's run-only mode."""
        from .watch import run_only

        self.policy = policy
        if policy != "compile":
            self.fallback = run_only(self.fallback) or self.fallback

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from .watch import current, mark_new_shape

        with torch.inference_mode(False), torch.no_grad():
            for fn in self.fns:
                if fn.guard_check(*self._prefix, *args, **kwargs):
                    return fn(*self._prefix, *args, **kwargs)
            if self.broken:
                return self.fallback(*args, **kwargs)
            if self.policy != "compile":
                mark_new_shape()
                return self.module(*args, **kwargs)
            rec = current()
            seen = rec.compiles if rec is not None else 0
            fn = self._build(args, kwargs)
            if fn is not None and rec is not None and rec.compiles == seen:
                rec.compiles += 1  # aot_compile may bypass Dynamo's compile callbacks; fullgraph: one graph
            return self.fallback(*args, **kwargs) if fn is None else fn(*self._prefix, *args, **kwargs)

    def _build(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        with self._lock:
            cfg = self.cfg
            # a new dict each time: torch.compile pops guard_filter_fn out of the options it is given
            options = {**cfg.options, "guard_filter_fn": torch.compiler.keep_portable_guards_unsafe}
            try:
                with aot_compile_enabled():
                    compiled = torch.compile(self._target, backend=cfg.backend, dynamic=cfg.dynamic, fullgraph=True,
                                             options=options)
                if not hasattr(compiled, "aot_compile"):
                    raise RuntimeError(f"torch {torch.__version__} has no torch.compile(...).aot_compile")
                fn = compiled.aot_compile((args, kwargs))
                name = f"{_UNSAFE.sub('_', describe_args(args, kwargs))}-{uuid.uuid4().hex[:8]}.bin"
                staging = self.dir / _STAGING
                staging.mkdir(parents=True, exist_ok=True)
                fn.save_compiled_function(str(staging / name), external_data={"model": self.module})
                os.replace(staging / name, self.dir / name)
            except Exception as e:  # a graph break (fullgraph), an unserialisable guard, a full disk ...
                self.broken = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                log.warning("precompile FAILED for %s (%s): serving through the jit function from now on",
                            describe_args(args, kwargs), self.broken)
                return None
            self.fns.append(fn)
            self.built += 1
            return fn
