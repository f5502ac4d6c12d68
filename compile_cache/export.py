"""The "export" strategy: torch.export + AOTInductor packages (.pt2).

A model is exported once with dynamic dimensions (``torch.export.export``) and
compiled ahead of time by AOTInductor into a self-contained ``.pt2`` package
(``torch._inductor.aoti_compile_and_package``). Loading the package runs no
Dynamo and no Inductor: there are no guards and no recompiles, and any input
whose dynamic sizes lie inside the declared ranges is served by the same code.

Two package flavours:

* weights in (``keep_weights_out=False``): the package embeds every constant.
  It can be loaded without the model object.
* weights out (``keep_weights_out=True``): the package holds code only; on load
  the constants are taken from the model's parameters and buffers (and tensor
  attributes), matched by their fully qualified names. The build forces
  ``always_keep_tensor_constants`` so that no small weight (1-D, <= 8 elements,
  or 0-d) gets inlined into the generated C++ as a literal — otherwise a
  "code only" package would silently carry stale weights. Lifted constants the
  graph never reads (BatchNorm's ``num_batches_tracked`` in eval mode) are not
  expected from the package: Inductor drops them, they are not baked in.

Loading deliberately bypasses ``torch._inductor.aoti_load_package``'s device
check, which calls ``pick_vec_isa()`` and therefore compiles ~10 small ISA-probe
``.so`` files into ``TORCHINDUCTOR_CACHE_DIR`` when they are missing (seconds of
work, see docs/benchmarks.md, "Figures behind the code's comments"; the only
thing a load would ever write to that directory). Instead
the package's recorded CPU ISA is checked against ``/proc/cpuinfo`` flags, and a
mismatch is an error (the generated code may SIGILL), not a warning.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .errors import ExportError, PackageLoadError, ShapeOutOfRange  # re-exported: callers import them from here

__all__ = [
    "Dim",
    "ExportSpec",
    "ExportError",
    "PackageLoadError",
    "ShapeOutOfRange",
    "AOTIRunner",
    "ExportedModel",
    "build_package",
    "build_attempts",
    "load_package",
    "check_shapes",
    "package_metadata",
    "model_constants",
    "export_program",
    "program_digest",
    "resolve_package",
    "adopt_equivalent_package",
]

logger = logging.getLogger("compile_cache")

_MODEL_NAME = "model"  # the name aoti_compile_and_package gives the single model
_META_PREFIX = "compile_cache."


# --------------------------------------------------------------------------- #
# Spec
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Dim:
    """One dynamic dimension: a named symbol with an inclusive range."""

    name: str
    min: int
    max: int

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"Dim name must be an identifier, got {self.name!r}")
        if not (isinstance(self.min, int) and isinstance(self.max, int)):
            raise TypeError(f"Dim {self.name}: min and max must be ints")
        if self.min < 0 or self.min > self.max:
            raise ValueError(f"Dim {self.name}: need 0 <= min <= max, got [{self.min}, {self.max}]")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "min": self.min, "max": self.max}


@dataclass(frozen=True)
class ExportSpec:
    """What to export: example positional args and their dynamic dimensions.

    ``dynamic_dims`` maps an arg index to ``{tensor dim index: Dim}``. The same
    ``Dim`` name used in several places means the same symbol (the sizes must be
    equal at run time). Every dimension not listed is static (fixed to the
    example's size).

    Choose example sizes that are >= 2 and that differ between different Dims:
    torch.export specializes sizes 0/1 and may unify two dims whose example
    sizes are equal, which makes the export fail.
    """

    example_args: tuple
    dynamic_dims: dict[int, dict[int, Dim]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.example_args, tuple):
            object.__setattr__(self, "example_args", tuple(self.example_args))
        for i, a in enumerate(self.example_args):
            if not isinstance(a, torch.Tensor):
                raise TypeError(f"example_args[{i}] must be a torch.Tensor, got {type(a).__name__}")
        by_name: dict[str, Dim] = {}
        for i, dims in self.dynamic_dims.items():
            if not 0 <= i < len(self.example_args):
                raise ValueError(f"dynamic_dims refers to arg {i}, but there are {len(self.example_args)} args")
            t = self.example_args[i]
            for d, dim in dims.items():
                if not 0 <= d < t.dim():
                    raise ValueError(f"dynamic_dims[{i}] refers to dim {d}, but arg {i} has {t.dim()} dims")
                prev = by_name.setdefault(dim.name, dim)
                if prev != dim:
                    raise ValueError(f"Dim {dim.name!r} declared with two ranges: {prev} and {dim}")
                size = int(t.shape[d])
                if not dim.min <= size <= dim.max:
                    raise ValueError(
                        f"example arg {i} dim {d} has size {size}, outside {dim.name} [{dim.min}, {dim.max}]"
                    )

    @property
    def dims(self) -> dict[str, Dim]:
        """All distinct Dims by name."""
        out: dict[str, Dim] = {}
        for dims in self.dynamic_dims.values():
            for dim in dims.values():
                out.setdefault(dim.name, dim)
        return out

    def describe(self) -> dict[str, Any]:
        """JSON-able, stable description (for the cache key).

        Dynamic sizes appear by Dim name, not by example size: the compiled
        package serves the whole range, so the example sizes must not change
        the key.
        """
        args = []
        for i, t in enumerate(self.example_args):
            dyn = self.dynamic_dims.get(i, {})
            shape: list[int | str] = [dyn[d].name if d in dyn else int(s) for d, s in enumerate(t.shape)]
            args.append({"shape": shape, "dtype": str(t.dtype).removeprefix("torch."), "device": t.device.type})
        dims = {n: d.describe() for n, d in sorted(self.dims.items())}
        return {"args": args, "dims": dims}

    def torch_dynamic_shapes(self) -> tuple[dict[int, Any] | None, ...]:
        """The ``dynamic_shapes`` argument for ``torch.export.export``."""
        tdims = {n: torch.export.Dim(n, min=d.min, max=d.max) for n, d in self.dims.items()}
        return tuple(
            ({d: tdims[dim.name] for d, dim in self.dynamic_dims[i].items()} if self.dynamic_dims.get(i) else None)
            for i in range(len(self.example_args))
        )


# --------------------------------------------------------------------------- #
# Shape checking
# --------------------------------------------------------------------------- #


def check_shapes(spec: ExportSpec, args: tuple) -> None:
    """Raise ShapeOutOfRange unless ``args`` fit ``spec``.

    Checks the number of args, tensor-ness, dtype, rank, static sizes, dynamic
    ranges, and that dims sharing one Dim name have equal sizes. AOTInductor
    does not check inputs at run time (unless AOTI_RUNTIME_CHECK_INPUTS=1):
    an out-of-range input may read out of bounds or return garbage.
    """
    if len(args) != len(spec.example_args):
        raise ShapeOutOfRange(f"expected {len(spec.example_args)} args, got {len(args)}")
    seen: dict[str, tuple[int, int, int]] = {}
    for i, (a, ex) in enumerate(zip(args, spec.example_args, strict=False)):
        if not isinstance(a, torch.Tensor):
            raise ShapeOutOfRange(f"arg {i}: expected a tensor, got {type(a).__name__}")
        if a.dtype != ex.dtype:
            raise ShapeOutOfRange(f"arg {i}: dtype {a.dtype}, expected {ex.dtype}")
        if a.dim() != ex.dim():
            raise ShapeOutOfRange(f"arg {i}: {a.dim()} dims (shape {tuple(a.shape)}), expected {ex.dim()}")
        dyn = spec.dynamic_dims.get(i, {})
        for d, size in enumerate(a.shape):
            size = int(size)
            dim = dyn.get(d)
            if dim is None:
                if size != ex.shape[d]:
                    raise ShapeOutOfRange(
                        f"arg {i} dim {d}: size {size}, but this dim is static (must be {ex.shape[d]})"
                    )
                continue
            if not dim.min <= size <= dim.max:
                raise ShapeOutOfRange(
                    f"arg {i} dim {d} ({dim.name}): size {size} outside range [{dim.min}, {dim.max}]"
                )
            if dim.name in seen and seen[dim.name][2] != size:
                pi, pd, ps = seen[dim.name]
                raise ShapeOutOfRange(
                    f"arg {i} dim {d} ({dim.name}): size {size} differs from arg {pi} dim {pd} size {ps}"
                    f" (same Dim {dim.name!r})"
                )
            seen.setdefault(dim.name, (i, d, size))


# --------------------------------------------------------------------------- #
# Build
# --------------------------------------------------------------------------- #


def _split_constants(ep: Any) -> tuple[list[str], list[str]]:
    """The exported program's lifted constants (parameters, buffers, tensor constants) by name:
    ``(read, unread)``.

    torch.export lifts every parameter and buffer of the module, whether the forward reads it or not; the
    classic unread one is BatchNorm's ``num_batches_tracked`` in eval mode (only training mode counts batches).
    Inductor drops an unread constant from the package, so it is neither in the code nor loadable, and the
    weights-out check at load time (every expected constant must be loadable, else it was baked into the code)
    must not expect it. "Read" is liveness, not ``num_users``: a constant counts as read when the graph's
    outputs (which include buffer mutations) depend on it, so one consumed only by dead code is unread too.
    Every read constant stays in the check: a read weight that Inductor inlined is still refused.
    """
    sig = ep.graph_signature
    by_input = {
        **sig.inputs_to_parameters,
        **sig.inputs_to_buffers,
        **sig.inputs_to_lifted_tensor_constants,
    }
    graph = ep.graph_module.graph
    live: set[Any] = set()
    # roots: the outputs, and any op kept for its side effect (an assert reading a buffer keeps it read)
    stack = [n for n in graph.nodes if n.op == "output" or (n.op == "call_function" and n.is_impure())]
    while stack:
        node = stack.pop()
        if node in live:
            continue
        live.add(node)
        stack.extend(node.all_input_nodes)
    read: set[str] = set()
    unread: set[str] = set()
    for node in graph.nodes:
        if node.op == "placeholder" and node.name in by_input:
            (read if node in live else unread).add(by_input[node.name])
    return sorted(read), sorted(unread - read)  # a tensor lifted twice under one name counts as read if either is


_builds = 0  # build_package calls in this process: an export attempt, however it ends


def build_attempts() -> int:
    """How many exports (``build_package`` calls) this process has started: the number tests and benches check
    to see that a boot did not export (a restored package, or a failure remembered for the key)."""
    return _builds


def export_program(model: torch.nn.Module, spec: ExportSpec) -> Any:
    """``torch.export.export`` of ``model`` per ``spec``; ExportError (cause chained) if it fails."""
    try:
        return torch.export.export(model, spec.example_args, dynamic_shapes=spec.torch_dynamic_shapes())
    except Exception as e:  # torch raises many types (UserError, GuardOnDataDependentSymNode, ...)
        raise ExportError(f"torch.export.export failed for {type(model).__name__}: {type(e).__name__}: {e}") from e


def program_digest(ep: Any, spec: ExportSpec, *, keep_weights_out: bool) -> str:
    """What an AOTInductor build compiles, hashed: the exported graph's code, its signature (which input is which
    weight), the dynamic ranges, every weight's and constant's name, shape and dtype (not its values: a weights-out
    package takes them from the model at load), the spec and the flavour. The build's other inputs (torch, the
    Inductor options, the host) are the cache key's environment fingerprint. Deterministic across processes
    (node names come from module paths); re-measure with two exports of one model in two processes."""
    import hashlib

    h = hashlib.sha256()
    h.update(ep.graph_module.code.encode())
    h.update(str(ep.graph_signature).encode())
    h.update(str(sorted((str(k), str(v)) for k, v in ep.range_constraints.items())).encode())
    tensors = {**dict(ep.state_dict), **dict(getattr(ep, "constants", {}) or {})}
    h.update(json.dumps({k: [list(t.shape), str(t.dtype)] for k, t in tensors.items()
                         if isinstance(t, torch.Tensor)}, sort_keys=True).encode())
    h.update(json.dumps(spec.describe(), sort_keys=True).encode())
    h.update(b"weights-out" if keep_weights_out else b"weights-in")
    return h.hexdigest()[:32]


_REF_SUFFIX = ".ref"  # <package>.pt2.ref: this key's package is another one, proven to compile the same program


def resolve_package(package_path: os.PathLike[str] | str) -> str:
    """The package to load for ``package_path``: itself, or the package its ``.ref`` file names (when that exists
    and still declares the program the ref was written for)."""
    path = os.fspath(package_path)
    ref = path + _REF_SUFFIX
    if os.path.exists(path) or not os.path.exists(ref):
        return path
    try:
        with open(ref) as f:
            r = json.load(f)
        target = os.path.join(os.path.dirname(path), os.path.basename(str(r["package"])))
        if package_metadata(target).get(_META_PREFIX + "program") == r["program"]:
            return target
    except (OSError, ValueError, KeyError, TypeError, PackageLoadError):
        pass
    return path


def adopt_equivalent_package(
    model: torch.nn.Module, spec: ExportSpec, package_path: os.PathLike[str] | str
) -> tuple[str | None, Any]:
    """Export ``model`` and look for a package next to ``package_path`` (restored from a seed) built from the same
    program (:func:`program_digest`, weights out). Found: a ``.ref`` file makes it this key's package; returns
    (its path, the program). Not found: (None, the program, which the build then compiles without exporting
    again). ExportError if the export fails."""
    path = os.fspath(package_path)
    ep = export_program(model, spec)
    digest = program_digest(ep, spec, keep_weights_out=True)
    folder = os.path.dirname(path)
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        cand = os.path.join(folder, name)
        if not name.endswith(".pt2") or cand == path:
            continue
        st = os.stat(cand)
        try:
            meta = package_metadata(cand)
        except PackageLoadError:
            meta = {}
        if meta.get(_META_PREFIX + "program") == digest and meta.get(_META_PREFIX + "keep_weights_out") == "1":
            with open(path + _REF_SUFFIX, "w") as f:
                json.dump({"package": name, "program": digest}, f)
            return cand, ep
        os.utime(cand, ns=(st.st_atime_ns, st.st_mtime_ns))  # looked at, not used (see lineage.mark_unread)
    return None, ep


def build_package(
    model: torch.nn.Module,
    spec: ExportSpec,
    package_path: str | os.PathLike,
    *,
    keep_weights_out: bool,
    inductor_configs: Mapping[str, Any] | None = None,
    program: Any = None,
) -> dict[str, Any]:
    """Export ``model`` per ``spec`` and compile it into an AOTInductor package.

    The package is written to a temporary file next to ``package_path`` and
    moved into place atomically. Returns
    ``{"export_s", "compile_s", "package_bytes", "keep_weights_out", "constant_fqns", "unused_constant_fqns",
    "metadata"}``: ``constant_fqns`` are the weights the graph reads (a weights-out package must take every one
    of them from the model), ``unused_constant_fqns`` the lifted ones it never reads (see ``_split_constants``).
    Raises ExportError (cause chained) if the export or the build fails.

    ``program``: an exported program of ``model`` per ``spec`` (:func:`export_program`) to compile instead of
    exporting again.

    Build-time notes: the model should be in eval mode (a training-mode model
    exports dropout); the build writes into TORCHINDUCTOR_CACHE_DIR and Inductor's
    precompiled headers go to ``/tmp/torchinductor_$USER`` whatever the env says.
    """
    global _builds
    _builds += 1
    package_path = os.fspath(package_path)
    if model.training:
        logger.warning("build_package: model is in training mode; dropout etc. will be exported as-is")
    dynamic_shapes = spec.torch_dynamic_shapes()

    t0 = time.perf_counter()
    if program is not None:
        ep = program
    else:
        try:
            ep = torch.export.export(model, spec.example_args, dynamic_shapes=dynamic_shapes)
        except Exception as e:  # torch raises many types (UserError, GuardOnDataDependentSymNode, ...)
            raise ExportError(
                f"torch.export.export failed for {type(model).__name__}: {type(e).__name__}: {e}"
            ) from e
    export_s = time.perf_counter() - t0

    constant_fqns, unused_fqns = _split_constants(ep)
    if unused_fqns:
        logger.info("build_package: %d constant(s) the graph never reads, left out of the package: %s",
                    len(unused_fqns), unused_fqns)
    if keep_weights_out:
        missing = [n for n in constant_fqns if _resolve_constant(model, n) is None]
        if missing:
            raise ExportError(
                "keep_weights_out=True, but these constants of the exported program cannot be found on the"
                f" model by name, so they could not be supplied at load time: {missing}"
            )

    meta = {
        _META_PREFIX + "keep_weights_out": "1" if keep_weights_out else "0",
        _META_PREFIX + "spec": json.dumps(spec.describe(), sort_keys=True),
        _META_PREFIX + "torch": torch.__version__,
        _META_PREFIX + "constant_fqns": json.dumps(constant_fqns),
        _META_PREFIX + "unused_constant_fqns": json.dumps(unused_fqns),
        _META_PREFIX + "program": program_digest(ep, spec, keep_weights_out=keep_weights_out),
    }
    configs: dict[str, Any] = {"aot_inductor.metadata": meta}
    if keep_weights_out:
        configs.update(
            {
                "aot_inductor.package_constants_in_so": False,
                "aot_inductor.package_constants_on_disk_format": None,
                # never inline small weights into the C++ code as literals
                "always_keep_tensor_constants": True,
            }
        )
    if inductor_configs:
        configs.update(inductor_configs)

    out_dir = os.path.dirname(os.path.abspath(package_path))
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".pt2", dir=out_dir)
    os.close(fd)
    t1 = time.perf_counter()
    try:
        try:
            torch._inductor.aoti_compile_and_package(ep, package_path=tmp, inductor_configs=configs)
        except Exception as e:
            raise ExportError(f"AOTInductor package build failed: {type(e).__name__}: {e}") from e
        compile_s = time.perf_counter() - t1
        os.replace(tmp, package_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

    info = {
        "export_s": round(export_s, 3),
        "compile_s": round(compile_s, 3),
        "package_bytes": os.path.getsize(package_path),
        "keep_weights_out": keep_weights_out,
        "constant_fqns": constant_fqns,
        "unused_constant_fqns": unused_fqns,
        "metadata": package_metadata(package_path),
    }
    logger.info(
        "built AOTInductor package %s: export %.1f s, compile %.1f s, %d bytes, weights %s",
        package_path, export_s, compile_s, info["package_bytes"], "out" if keep_weights_out else "in",
    )
    return info


# --------------------------------------------------------------------------- #
# Load
# --------------------------------------------------------------------------- #


def package_metadata(package_path: str | os.PathLike) -> dict[str, str]:
    """The package's metadata (AOTI_CPU_ISA, AOTI_DEVICE_KEY, ours under ``compile_cache.``).

    Reads the archive only; compiles nothing.
    """
    try:
        return dict(
            torch._C._aoti.AOTIModelPackageLoader.load_metadata_from_package(  # type: ignore[attr-defined]
                os.fspath(package_path), _MODEL_NAME
            )
        )
    except Exception as e:
        raise PackageLoadError(f"cannot read AOTInductor package {os.fspath(package_path)!r}: {e}") from e


# ISA names as printed by torch._inductor.cpu_vec_isa (upper-cased) -> /proc/cpuinfo flags they need
_ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "AVX2": ("avx2", "fma"),
    "AVX512": ("avx512f", "avx512dq", "avx512vl", "avx512bw", "fma"),
    "AVX512_VNNI": ("avx512_vnni",),
    "AVX512_BF16": ("avx512_bf16",),
    "AMX_TILE": ("amx_tile",),
    "AMX_BF16": ("amx_bf16",),
    "AMX_INT8": ("amx_int8",),
}


def _cpu_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def _check_device(meta: Mapping[str, str], package_path: str) -> None:
    device = meta.get("AOTI_DEVICE_KEY", "cpu")
    if device != "cpu":
        return  # not checked here; the loader fails loudly for a missing device
    if meta.get("AOTI_PLATFORM", sys.platform) != sys.platform or meta.get(
        "AOTI_MACHINE", platform.machine()
    ) != platform.machine():
        raise PackageLoadError(
            f"{package_path}: built for {meta.get('AOTI_PLATFORM')}/{meta.get('AOTI_MACHINE')},"
            f" this is {sys.platform}/{platform.machine()}"
        )
    isa = meta.get("AOTI_CPU_ISA", "")
    flags = _cpu_flags()
    if not isa or flags is None:
        return
    missing = sorted({fl for tok in isa.split() for fl in _ISA_FLAGS.get(tok, ()) if fl not in flags})
    if missing:
        raise PackageLoadError(
            f"{package_path}: built for CPU ISA {isa!r}, but this CPU lacks {missing}; the code could crash (SIGILL)"
        )


def _resolve_constant(model: torch.nn.Module, fqn: str) -> torch.Tensor | None:
    mod_path, _, attr = fqn.rpartition(".")
    try:
        mod = model.get_submodule(mod_path) if mod_path else model
    except AttributeError:
        return None
    value = getattr(mod, attr, None)
    return value if isinstance(value, torch.Tensor) else None


def model_constants(model: torch.nn.Module, fqns: list[str]) -> dict[str, torch.Tensor]:
    """The tensors of ``model`` for the constant names a package expects (detached)."""
    state: dict[str, torch.Tensor] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        state[n] = p
    for n, b in model.named_buffers(remove_duplicate=False):
        state[n] = b
    out: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for n in fqns:
        t = state.get(n)
        if t is None:
            t = _resolve_constant(model, n)
        if t is None:
            missing.append(n)
        else:
            out[n] = t.detach()
    if missing:
        raise PackageLoadError(f"the model has no tensor for these package constants: {missing}")
    return out


def _import_spec_types(spec_json: str) -> None:
    """Import the modules named by the ``type`` fields of a serialized treespec."""
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            t = node.get("type")
            if isinstance(t, str) and "." in t:
                names.add(t.rsplit(".", 1)[0])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    try:
        walk(json.loads(spec_json))
    except ValueError:
        return
    for mod in sorted(names):
        try:
            importlib.import_module(mod)
            logger.debug("imported %s to rebuild a package's output structure", mod)
        except Exception as e:  # best effort: the caller reports the real failure
            logger.debug("cannot import %s: %s", mod, e)


class AOTIRunner:
    """A loaded AOTInductor package: ``runner(*args) -> outputs``.

    Like ``torch._inductor.package.AOTICompiledModel`` but parses the call spec
    once (not on every call). Thread-safe: the AOTI model container locks; with
    ``num_runners=1`` concurrent calls run one at a time.
    """

    def __init__(self, loader: Any, package_path: str, metadata: dict[str, str]) -> None:
        self.loader = loader
        self.package_path = package_path
        self.metadata = metadata
        in_spec, out_spec = loader.get_call_spec()
        try:
            try:
                self._out_spec = pytree.treespec_loads(out_spec)
            except NotImplementedError:
                # the output type (e.g. a transformers ModelOutput) registers itself with pytree on import
                _import_spec_types(out_spec)
                self._out_spec = pytree.treespec_loads(out_spec)
            self._in_spec = pytree.treespec_loads(in_spec)
        except Exception as e:
            raise PackageLoadError(
                f"{package_path}: cannot rebuild the model's input/output structure ({e}); import the module"
                " that defines the output type (e.g. the transformers model class) before loading"
            ) from e
        self._keep_alive: dict[str, torch.Tensor] | None = None

    @property
    def constant_fqns(self) -> list[str]:
        return list(self.loader.get_constant_fqns())

    def load_constants(self, constants: dict[str, torch.Tensor], *, user_managed: bool) -> None:
        self.loader.load_constants(constants, False, True, user_managed)
        self._keep_alive = constants if user_managed else None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        flat = pytree.tree_flatten((args, kwargs))[0]
        flat = [x for x in flat if isinstance(x, torch.Tensor)]
        return pytree.tree_unflatten(self.loader.boxed_run(flat), self._out_spec)


def load_package(
    package_path: str | os.PathLike,
    model: torch.nn.Module | None = None,
    *,
    keep_weights_out: bool,
    num_runners: int = 1,
    share_weights: bool = True,
) -> AOTIRunner:
    """Load a package built by build_package; returns a callable runner.

    With ``keep_weights_out=True`` the constants come from ``model`` (required).
    ``share_weights=True`` hands the model's own tensors to the runtime
    (``user_managed``: no copy, the runner keeps them alive; in-place changes to
    the model's weights are seen by the package). ``share_weights=False`` copies.

    Compiles nothing and writes nothing to TORCHINDUCTOR_CACHE_DIR (the package's
    .so is extracted to a temporary dir by the C++ loader). Raises PackageLoadError.
    """
    path = os.fspath(package_path)
    t0 = time.perf_counter()
    meta = package_metadata(path)
    flag = meta.get(_META_PREFIX + "keep_weights_out")
    if flag is not None and flag != ("1" if keep_weights_out else "0"):
        raise PackageLoadError(
            f"{path} was built with keep_weights_out={flag == '1'}, loaded with keep_weights_out={keep_weights_out}"
        )
    if keep_weights_out and model is None:
        raise PackageLoadError(f"{path}: keep_weights_out=True needs the model to take the weights from")
    _check_device(meta, path)
    try:
        # (path, model name, run_single_threaded, num_runners, device_index)
        loader = torch._C._aoti.AOTIModelPackageLoader(  # type: ignore[attr-defined]
            path, _MODEL_NAME, False, num_runners, -1
        )
    except Exception as e:
        raise PackageLoadError(f"cannot load AOTInductor package {path!r}: {e}") from e
    runner = AOTIRunner(loader, path, meta)
    if keep_weights_out:
        assert model is not None
        expected = meta.get(_META_PREFIX + "constant_fqns")
        if expected is not None:
            baked = sorted(set(json.loads(expected)) - set(runner.constant_fqns))
            if baked:
                # Inductor inlined or folded these into the code: the package would ignore the model's values
                raise PackageLoadError(
                    f"{path}: weights {baked} are baked into the package's code, not loadable from the model"
                )
        constants = model_constants(model, runner.constant_fqns)
        if share_weights:
            # user_managed needs contiguous tensors of the exact dtype; keep our own refs
            constants = {k: v.contiguous() for k, v in constants.items()}
        try:
            runner.load_constants(constants, user_managed=share_weights)
        except Exception as e:
            raise PackageLoadError(f"{path}: loading the model's weights into the package failed: {e}") from e
    logger.info("loaded AOTInductor package %s in %.2f s", path, time.perf_counter() - t0)
    return runner


# --------------------------------------------------------------------------- #
# Wrapper
# --------------------------------------------------------------------------- #


class ExportedModel:
    """Callable: checks the inputs against the spec, then runs the package.

    Inputs are made contiguous (the generated code assumes the example's
    contiguous strides). Outputs never require grad, so calling it inside or
    outside ``torch.inference_mode()`` / ``no_grad()`` is the same.
    """

    def __init__(self, spec: ExportSpec, runner: Callable[..., Any]) -> None:
        self.spec = spec
        self.runner = runner
        self.calls = 0
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        spec: ExportSpec,
        package_path: str | os.PathLike,
        model: torch.nn.Module | None = None,
        *,
        keep_weights_out: bool,
        **kwargs: Any,
    ) -> ExportedModel:
        return cls(spec, load_package(package_path, model, keep_weights_out=keep_weights_out, **kwargs))

    def __call__(self, *args: Any) -> Any:
        check_shapes(self.spec, args)
        args = tuple(a.contiguous() for a in args)
        out = self.runner(*args)
        with self._lock:
            self.calls += 1
        return out
