"""AOT-precompiled functions, one per input shape, kept in the Inductor cache dir: how the jit strategy restores.

The dir snapshot alone saves Inductor's work but a warm boot still traces every shape with Dynamo; a precompiled
function (``torch.compile(...).aot_compile``, saved with ``save_compiled_function``) skips that too. Measured on the
example's four warm-up shapes: 3.6 s instead of 8.0 s, with the dir restored (without it, 19 s: the kernels are
rebuilt) — docs/restore-strategies.md, scripts/restore_strategies.py. The files live under the Inductor cache dir,
so the snapshot ships them with the kernels they need, and a part they do not work for still has the dir.

Default (``jit_restore="precompile"``) where it round-trips, per part:

- **Round trip.** A function is kept only if, saved and loaded back, it gives the eager model's output on the
  example it was built from (:func:`same_outputs`). Else, and when precompiling fails (a graph break: ``fullgraph``;
  a guard that cannot be saved), the part is served by the ordinary jit function and the dir snapshot, and the
  failure is written down (``<dir>/precompile.failed.json``, compile_cache/failures.py): later boots of the
  key go straight to the jit function.
- **Guards.** Models such as transformers' leave guards that cannot be serialized (ID_MATCH on torch functions and
  on code objects: ``PackageError``). Only the portable ones are kept (tensor shapes, dtypes and strides; global
  grad state). What the dropped guards stood for is checked another way: the cache key covers the project's code,
  config files, weight structure and pinned requirements, and a loaded function is used only if every source it
  traced still reads the same (:func:`changed_source`, as torch's own precompile packages check). What is left
  unchecked: Python state changed at run time that the traced code reads (a flag flipped between requests);
  ``jit_restore="dir"`` keeps Dynamo's full guards.
- **Grad mode**: a precompiled function fails its guards under ``inference_mode`` (measured, even when built under
  it): built and called under ``no_grad``, outside inference mode.
- **Seeds.** A new version seeded from an earlier one (same lineage and environment) adopts the seed's function for
  a shape when its traced sources are unchanged and its output on the warm-up example equals this version's eager
  output; else it precompiles its own.

A call no precompiled function accepts is precompiled then and saved, so the next boot has it.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import os
import re
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .compiler import describe_args
from .config import CompileConfig
from .errors import RoundTripError
from .failures import precompile_record, read_failure, record_failure

__all__ = ["Precompiled", "changed_source", "same_outputs", "state_digest"]

log = logging.getLogger("compile_cache")

_STAGING = ".staging"  # a dot-dir: snapshots skip it, so a half-written file is never uploaded
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_RESTARTS = 3  # Dynamo's own restart limit is of this order; a trace that keeps restarting is a failure
_REF = ".ref"  # <dir>/<name>.ref holds "<seed stem>/<name>.bin": a seed's function this key adopted
# Where the weights were read from and which hub commit: provenance, not something traced code computes with (a
# version's weights live in another directory than its seed's)
_PROVENANCE = frozenset({"_name_or_path", "name_or_path", "_commit_hash"})
_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes, tuple, frozenset, torch.dtype, torch.device)
_STATE = ".state"  # <name>.state beside <name>.bin: state_digest() at build time


def aot_compile_enabled() -> Any:
    """A context in which ``torch.compile`` returns functions with ``.aot_compile``. torch 2.11 attaches it only
    while ``torch._dynamo.config.enable_aot_compile`` is on (off by default there; on, and always on, from 2.13)."""
    import contextlib

    if hasattr(torch._dynamo.config, "enable_aot_compile"):
        return torch._dynamo.config.patch(enable_aot_compile=True)
    return contextlib.nullcontext()


def changed_source(fn: Any) -> str:
    """"" if every source ``fn`` traced reads the same now as when it was traced, else the first that does not
    (module and lines). torch records each inlined function's lines and their sha256 (``SourceInfo``); its own
    precompile packages refuse to load when one differs, and this applies the same rule to ``aot_compile``
    functions, whose loader does not check."""
    info = fn.source_info() if hasattr(fn, "source_info") else None
    if info is None:
        return "no record of the traced sources"
    lines: dict[str, list[str]] = {}
    for src in sorted(info.inlined_sources, key=lambda s: (s.module, s.firstlineno)):
        try:
            if src.module not in lines:
                module = sys.modules.get(src.module) or importlib.import_module(src.module)
                lines[src.module] = inspect.getsourcelines(module)[0]
        except (ImportError, OSError, TypeError) as e:
            return f"{src.module} (cannot read it: {type(e).__name__})"
        text = "".join(lines[src.module][src.firstlineno - 1 : src.lastlineno - 1])
        if hashlib.sha256(text.encode()).hexdigest() != src.checksum:
            return f"{src.module} lines {src.firstlineno}-{src.lastlineno - 1}"
    return ""


def _plain(v: Any, depth: int = 0) -> str | None:
    """A value's repr if it is plain data a trace could bake into code (numbers, strings, dtypes, and containers
    and config objects of them), else None: tensors, modules, functions and other objects are left out."""
    if v is None or isinstance(v, (bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)):
        return repr(v)
    if depth >= 4:
        return None
    if isinstance(v, (list, tuple, set, frozenset)):
        items = [_plain(x, depth + 1) for x in v]
        if any(x is None for x in items):
            return None
        return f"{type(v).__name__}[{','.join(sorted(items) if isinstance(v, (set, frozenset)) else items)}]"
    if isinstance(v, dict):
        items = [(_plain(k, depth + 1), _plain(x, depth + 1)) for k, x in v.items() if k not in _PROVENANCE]
        if any(k is None or x is None for k, x in items):
            return None
        return "{" + ",".join(f"{k}:{x}" for k, x in sorted(items)) + "}"  # type: ignore[type-var]
    to_dict = getattr(v, "to_dict", None)  # a transformers config: what its model reads while tracing
    if callable(to_dict) and not isinstance(v, torch.nn.Module):
        try:
            return _plain(to_dict(), depth + 1)
        except Exception:  # noqa: BLE001 - not a config after all
            return None
    return None


def state_digest(module: Any, fn: Any, attrs: list[str] | None = None) -> str:
    """What a trace of ``module`` may have baked in besides its code: every module's plain attributes (flags,
    sizes, its config), and the plain globals of every module whose source ``fn`` traced (constants the traced code
    reads). Equal digests and unchanged traced sources (:func:`changed_source`) let a seeded version adopt the seed's
    function without running it. ``attrs``: the attribute part taken earlier (:func:`attribute_lines`)."""
    lines = list(attribute_lines(module) if attrs is None else attrs)
    info = fn.source_info() if hasattr(fn, "source_info") else None
    for mod_name in sorted({s.module for s in info.inlined_sources} if info is not None else ()):
        g = getattr(sys.modules.get(mod_name), "__dict__", {})
        for k, v in sorted(g.items()):
            # immutable values only: a module's dicts and lists are caches more often than constants (inspect's
            # map of loaded modules differs from process to process)
            if not k.startswith("__") and isinstance(v, _IMMUTABLE) and (r := _plain(v)) is not None:
                lines.append(f"global {mod_name}.{k}={r}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def attribute_lines(module: Any) -> list[str]:
    """The plain attributes of ``module`` and its submodules. Taken as ``load()`` left them, before any call: a
    model may set attributes of its own on its first forward (transformers does), and the state to compare across
    versions is the one each process starts from."""
    lines: list[str] = []
    for name, m in module.named_modules() if isinstance(module, torch.nn.Module) else []:
        for k, v in sorted(vars(m).items()):
            if k in ("_parameters", "_buffers", "_modules") or k in _PROVENANCE or (r := _plain(v)) is None:
                continue
            lines.append(f"attr {name}.{k}={r}")
    return lines


def _tolerance(t: torch.Tensor) -> tuple[float, float]:
    """(rtol, atol): float32 and wider differ between compiled and eager by reordered sums (~1e-6 measured on the
    examples); half types by their rounding."""
    if t.dtype in (torch.float16, torch.bfloat16):
        return 2e-2, 2e-2
    return 1e-4, 1e-4


def same_outputs(got: Any, want: Any) -> str:
    """"" if two outputs (tensors in any nest of tuples, lists and dicts) match, else what differs."""
    from torch.utils._pytree import tree_flatten

    a, spec_a = tree_flatten(got)
    b, spec_b = tree_flatten(want)
    if spec_a != spec_b:
        return f"output structure {spec_a} != {spec_b}"
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype:
                return f"output {i}: {x.dtype}{list(x.shape)} != {y.dtype}{list(y.shape)}"
            if x.is_floating_point() or x.is_complex():
                rtol, atol = _tolerance(y)
                if not torch.allclose(x, y, rtol=rtol, atol=atol, equal_nan=True):
                    diff = (x.double() - y.double()).abs().max().item()
                    return f"output {i}: max abs diff {diff:.3g} (rtol {rtol:g}, atol {atol:g})"
            elif not torch.equal(x, y):
                return f"output {i}: values differ"
        elif x != y:
            return f"output {i}: {x!r} != {y!r}"
    return ""


class Precompiled:
    """A callable over the precompiled functions in ``directory``: the first whose guards accept the inputs serves
    the call; none does → adopt the seed's (``seed_dir``) or precompile these inputs and save; that fails →
    ``fallback`` (the jit function) from then on."""

    def __init__(self, module: Callable[..., Any], fallback: Callable[..., Any], cfg: CompileConfig,
                 directory: Path, seed_dir: Path | None = None) -> None:
        self.module, self.fallback, self.cfg, self.dir = module, fallback, cfg, directory
        # A bound method is compiled, so the module is the functions' first argument (and their guards' too).
        self._prefix: tuple[Any, ...] = (module,) if isinstance(module, torch.nn.Module) else ()
        self._target = module.forward if isinstance(module, torch.nn.Module) else module
        self._globals: dict[str, Any] | None = getattr(inspect.unwrap(self._target), "__globals__", None)
        self._attrs = attribute_lines(module)  # before any call: see attribute_lines
        self._lock = threading.Lock()
        self.broken = ""  # why precompiling was given up: every later call goes to the fallback
        self.fns: list[Any] = []
        self.candidates: list[tuple[Path, Any]] = []  # the seed's functions, not yet shown to fit this version
        self.loaded = self.built = self.adopted = 0
        self.policy = "compile"  # warm-up precompiles what it meets; serve() applies on_new_shape
        if cfg.mode not in (None, "default"):  # torch.compile takes mode or options, and the guard filter is one
            self.broken = f"mode={cfg.mode!r} cannot be combined with precompile"
            log.info("precompile: %s; serving through the jit function and the cache dir", self.broken)
            return
        self.fns = [fn for _, fn in self._load(directory)]
        self.loaded = len(self.fns)
        log.info("precompile: %d function(s) loaded from %s", self.loaded, directory)
        failed = read_failure(precompile_record(directory))
        if failed is not None:  # the functions that did work still serve; no shape is tried again
            self.broken = f"it failed for this key before ({failed.reason})"
            log.warning("precompile: no new function: %s; other shapes go through the jit function", self.broken)
        elif seed_dir is not None and seed_dir != directory:
            self.candidates = self._load(seed_dir)
            if self.candidates:
                log.info("precompile: %d function(s) of the seed %s to try", len(self.candidates), seed_dir.name)

    def _load(self, directory: Path) -> list[tuple[Path, Any]]:
        """(file, function) for each function saved in ``directory``: its own ``.bin`` files, and the seeds' files
        its ``.ref`` files name (an adopted function stays in the seed's entry; this key's entry only points)."""
        out = []
        for entry in sorted(directory.iterdir()) if directory.is_dir() else []:
            if entry.suffix == _REF:
                try:
                    path = directory.parent / Path(entry.read_text().strip())
                except OSError as e:
                    log.warning("precompile: cannot read %s (%s)", entry.name, e)
                    continue
                if path.parent.parent != directory.parent or not path.is_file():
                    log.warning("precompile: %s names %s, which is not here; its shape is precompiled again",
                                entry.name, path)
                    continue
            elif entry.suffix == ".bin":
                path = entry
            else:
                continue
            try:
                with open(path, "rb") as f:
                    fn = self._load_one(f)
            except Exception as e:  # a file from another torch, or damaged: rebuilt on first use of its shape
                log.warning("precompile: cannot load %s (%s: %s); it will be rebuilt", path.name, type(e).__name__, e)
                continue
            changed = changed_source(fn)
            if changed:  # the guards that would have caught the change were not saved: this check stands for them
                log.warning("precompile: %s traced %s, which has changed since: not used (its shape is precompiled "
                            "again on first use)", path.name, changed)
                continue
            out.append((path, fn))
        return out

    def _load_one(self, f: Any) -> Any:
        # The traced function's globals: a function traced with a dynamic dim refers to some of them (``torch``)
        # and loads only with them ("Missing required external references"; the LLM example's prefill).
        return torch.compiler.load_compiled_function(f, f_globals=self._globals, external_data={"model": self.module})

    def precompiled_counts(self) -> dict[str, Any]:
        """For the part's metrics: functions loaded from this key's entry, adopted from the seed's, built now, and
        why the rest (if any) goes through the jit function."""
        return {"loaded": self.loaded, "adopted": self.adopted, "built": self.built, "fallback": self.broken}

    def ready(self, *args: Any, **kwargs: Any) -> bool:
        """Whether a loaded function serves these inputs. It was loaded with its kernels, and its first call costs
        what later ones do (docs/restore-strategies.md), so warm-up has nothing left to do for them."""
        with torch.inference_mode(False), torch.no_grad():
            if any(fn.guard_check(*self._prefix, *args, **kwargs) for fn in self.fns):
                return True
            # A seed's function for these inputs, traced from the same sources with the same baked state: adopted
            # without running it. Otherwise the call goes through __call__, which checks it against eager.
            for i, (path, fn) in enumerate(self.candidates):
                if not fn.guard_check(*self._prefix, *args, **kwargs):  # cheap: the digest only for its shape
                    continue
                if _read_state(path) == state_digest(self.module, fn, self._attrs):
                    del self.candidates[i]
                    self._keep(path, fn, args, kwargs, "same sources and state")
                    return True
            return False

    def serve(self, policy: str) -> None:
        """Setup is done. Under "eager" or "error" a call no precompiled function accepts runs uncompiled instead of
        being precompiled, and the jit fallback (a model precompiling failed for) runs in Dynamo's run-only mode."""
        from .watch import run_only

        self.policy = policy
        for path, _ in self.candidates:  # seeds are tried on warm-up shapes only; those left were not used
            _unread(path)
        self.candidates = []
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
            with self._lock:
                adopted = self._adopt(args, kwargs)
                if adopted is not None:
                    return adopted[1]
                rec = current()
                seen = rec.compiles if rec is not None else 0
                built = self._build(args, kwargs)
                if built is not None and rec is not None and rec.compiles == seen:
                    rec.compiles += 1  # aot_compile may bypass Dynamo's compile callbacks; fullgraph: one graph
            return self.fallback(*args, **kwargs) if built is None else built[1]

    def _adopt(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any] | None:
        """A seed's function whose guards accept these inputs and whose output equals this version's eager output
        (the weights may differ: they are inputs, not constants); copied into this key's dir."""
        for i, (path, fn) in enumerate(self.candidates):
            if not fn.guard_check(*self._prefix, *args, **kwargs):
                continue
            del self.candidates[i]
            try:
                out = fn(*self._prefix, *args, **kwargs)
                differs = same_outputs(out, self.module(*args, **kwargs))
            except Exception as e:
                differs = f"it raised {type(e).__name__}: {e}"
            if differs:
                log.info("precompile: the seed's %s does not fit this version (%s): precompiling", path.name, differs)
                _unread(path)
                return None
            self._keep(path, fn, args, kwargs, "output equals eager")
            return fn, out
        return None

    def _keep(self, path: Path, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], why: str) -> None:
        try:  # a reference, not a copy: the new version's entry keeps the seed's object and uploads a line
            staging = self.dir / _STAGING
            staging.mkdir(parents=True, exist_ok=True)
            ref = staging / (path.stem + _REF)
            ref.write_text(f"{path.parent.name}/{path.name}\n")
            os.replace(ref, self.dir / ref.name)
        except OSError as e:  # served all the same; the next boot adopts it again
            log.warning("precompile: cannot keep the seed's %s (%s)", path.name, e)
        log.info("precompile: adopted the seed's %s for %s (%s)", path.name, describe_args(args, kwargs), why)
        self.fns.append(fn)
        self.adopted += 1

    def _build(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any] | None:
        """Precompile these inputs, save, load back, and keep the loaded function only if it gives the eager
        output: what serves is what the next boot will load."""
        cfg = self.cfg
        # a new dict each time: torch.compile pops guard_filter_fn out of the options it is given
        options = {**cfg.options, "guard_filter_fn": torch.compiler.keep_portable_guards_unsafe}
        name = f"{_UNSAFE.sub('_', describe_args(args, kwargs))}-{uuid.uuid4().hex[:8]}.bin"
        staging = self.dir / _STAGING
        try:
            with aot_compile_enabled():
                compiled = torch.compile(self._target, backend=cfg.backend, dynamic=cfg.dynamic, fullgraph=True,
                                         options=options)
            if not hasattr(compiled, "aot_compile"):
                raise RuntimeError(f"torch {torch.__version__} has no torch.compile(...).aot_compile")
            fn = _aot_compile(compiled, args, kwargs)
            staging.mkdir(parents=True, exist_ok=True)
            fn.save_compiled_function(str(staging / name), external_data={"model": self.module})
            with open(staging / name, "rb") as f:
                loaded = self._load_one(f)
            out = loaded(*self._prefix, *args, **kwargs)
            differs = same_outputs(out, self.module(*args, **kwargs))
            if differs:
                raise RoundTripError(f"saved and loaded back, it differs from eager: {differs}")
            state = _state_path(staging / name)
            state.write_text(state_digest(self.module, loaded, self._attrs) + "\n")
            os.replace(state, self.dir / state.name)
            os.replace(staging / name, self.dir / name)
        except Exception as e:  # a graph break (fullgraph), an unserialisable guard, a full disk ...
            (staging / name).unlink(missing_ok=True)
            self.broken = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.warning("precompile FAILED for %s (%s): serving through the jit function from now on",
                        describe_args(args, kwargs), self.broken)
            self.dir.mkdir(parents=True, exist_ok=True)
            record_failure(precompile_record(self.dir), e, stage="precompile")
            return None
        self.fns.append(loaded)
        self.built += 1
        return loaded, out


def _state_path(path: Path) -> Path:
    """``<dir>/<name>.bin`` -> ``<dir>/<name>.state``."""
    return path.with_name(path.name.removesuffix(".bin") + _STATE)


def _read_state(path: Path) -> str:
    """The state digest saved beside a function when it was built ("" if none: then it is checked by running)."""
    try:
        return _state_path(path).read_text().strip()
    except OSError:
        return ""


def _unread(path: Path) -> None:
    """Mark a seed's file as not used by this version: a seeded upload keeps only the seed's files this boot read
    (compile_cache/lineage.py, mark_unread)."""
    try:
        os.utime(path, ns=(0, path.stat().st_mtime_ns))
    except OSError:
        pass


def _aot_compile(compiled: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``compiled.aot_compile``, tracing again when Dynamo asks to: under ``torch.compile`` a RestartAnalysis
    (e.g. ``TensorifyScalarRestartAnalysis`` with a dynamic dim) re-traces with what the first pass learned, but
    ``aot_compile`` raises it instead (measured: the LLM example's prefill, torch 2.13; the second try succeeds)."""
    from torch._dynamo.exc import RestartAnalysis

    for _ in range(_RESTARTS):
        try:
            return compiled.aot_compile((args, kwargs))
        except RestartAnalysis as e:
            log.info("precompile: Dynamo restarted the trace (%s): tracing again", type(e).__name__)
    return compiled.aot_compile((args, kwargs))
