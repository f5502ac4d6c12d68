"""The torch side of the JIT strategy: compile from the declarative config, fall back to eager, warm up, and
notice compiles on the request path. No store code here (and no boto3)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import CompileConfig
from .errors import ConfigError, NewShapeError

__all__ = [
    "Example",
    "Counts",
    "counts",
    "inductor_cache_dir",
    "cache_roots",
    "compile_model",
    "CompiledModel",
    "sdpa_backend",
]

log = logging.getLogger("compile_cache")


@dataclass(frozen=True)
class Example:
    """One warm-up call: positional and keyword arguments exactly as a request will pass them."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] | None = None
    label: str = ""

    def describe(self) -> str:
        if self.label:
            return self.label
        return describe_args(self.args, self.kwargs or {})


def describe_args(args: Sequence[Any], kwargs: dict[str, Any]) -> str:
    def one(x: Any) -> str:
        if isinstance(x, torch.Tensor):
            return "x".join(map(str, x.shape)) or "scalar"
        return type(x).__name__

    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return "(" + ", ".join(parts) + ")"


@dataclass(frozen=True)
class Counts:
    fxgraph_hits: int = 0
    fxgraph_misses: int = 0
    aotautograd_hits: int = 0
    aotautograd_misses: int = 0
    compiles: int = 0
    graph_breaks: int = 0

    def __sub__(self, o: Counts) -> Counts:
        return Counts(*(a - b for a, b in zip(self.__dict__.values(), o.__dict__.values(), strict=True)))


def counts() -> Counts:
    """Dynamo / Inductor / AOTAutograd counters of this process (names as in ``torch._dynamo.utils.counters``)."""
    from torch._dynamo.utils import counters

    return Counts(
        fxgraph_hits=counters["inductor"]["fxgraph_cache_hit"],
        fxgraph_misses=counters["inductor"]["fxgraph_cache_miss"],
        aotautograd_hits=counters["aot_autograd"]["autograd_cache_hit"],
        aotautograd_misses=counters["aot_autograd"]["autograd_cache_miss"],
        compiles=counters["stats"]["unique_graphs"],
        graph_breaks=sum(counters["graph_break"].values()),
    )


def inductor_cache_dir() -> Path:
    """Inductor's cache dir: ``TORCHINDUCTOR_CACHE_DIR`` when set, else Torch's default; absolute (torch 2.11 leaves
    a relative ``TORCHINDUCTOR_CACHE_DIR`` relative, 2.13 makes it absolute)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()).absolute()


def cache_roots() -> dict[str, Path]:
    """The directories a snapshot covers: Inductor's, and Triton's when it lives outside Inductor's (GPU only)."""
    import os

    roots = {"inductor": inductor_cache_dir()}
    triton = os.environ.get("TRITON_CACHE_DIR")
    if triton and torch.cuda.is_available():
        t = Path(triton).absolute()
        if not t.is_relative_to(roots["inductor"]):
            roots["triton"] = t
    return roots


_SDPA_MEMBERS = {
    "math": "MATH",
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
}
# Measured on torch 2.13 CPU: MATH and FLASH_ATTENTION (a CPU flash kernel, torch's own default choice there) run;
# EFFICIENT_ATTENTION and CUDNN_ATTENTION raise "No viable backend for scaled_dot_product_attention".
_CPU_SDPA = ("math", "flash")


def sdpa_backend(cfg: CompileConfig) -> Any:
    """The ``SDPBackend`` to run under, or None for torch's own choice. A GPU-only kernel asked for on a machine
    without a GPU degrades to torch's choice with a warning instead of failing every call."""
    if cfg.sdpa_backend is None:
        return None
    if cfg.sdpa_backend not in _CPU_SDPA and not torch.cuda.is_available():
        log.warning(
            "sdpa_backend=%r needs a GPU and there is none: attention uses torch's default CPU kernel", cfg.sdpa_backend
        )
        return None
    from torch.nn.attention import SDPBackend

    return getattr(SDPBackend, _SDPA_MEMBERS[cfg.sdpa_backend])


def _memory_format(cfg: CompileConfig) -> torch.memory_format | None:
    # "contiguous" is torch's default: nothing to convert.
    return torch.channels_last if cfg.memory_format == "channels_last" else None


def compile_model(model: Callable[..., Any], cfg: CompileConfig) -> tuple[Callable[..., Any], str]:
    """``torch.compile`` per ``cfg``; returns (callable, why-eager). On failure returns the model itself and the
    reason, so the caller serves eager. ``mode="reduce-overhead"`` needs CUDA graphs: on CPU it degrades to the
    default mode with a warning instead of failing. ``memory_format="channels_last"`` converts the module's 4-D
    parameters in place (eager fallback included), before Dynamo sees them."""
    fmt = _memory_format(cfg)
    if fmt is not None:
        if isinstance(model, torch.nn.Module):
            model.to(memory_format=fmt)
        else:
            log.warning("memory_format=%r: the model is not an nn.Module, only inputs are converted", cfg.memory_format)
    if not cfg.enable:
        return model, "compile disabled by config"
    mode = cfg.mode
    if mode == "reduce-overhead" and not torch.cuda.is_available():
        log.warning("mode='reduce-overhead' uses CUDA graphs and there is no GPU: compiling with the default mode")
        mode = None
    kwargs: dict[str, Any] = {"backend": cfg.backend, "dynamic": cfg.dynamic, "fullgraph": cfg.fullgraph}
    if cfg.options:
        kwargs["options"] = dict(cfg.options)  # torch.compile refuses mode and options together
        if mode:
            log.warning("mode=%r ignored: torch.compile takes either mode or options, and options are set", mode)
    elif mode:
        kwargs["mode"] = mode
    try:
        return torch.compile(model, **kwargs), ""
    except Exception as e:  # an invalid backend name, bad options, ...
        return model, f"torch.compile raised {type(e).__name__}: {e}"


class CompiledModel:
    """What ``run()`` calls for one part: the compiled (or eager) callable, run under inference mode, with a watch on
    the request path. Once setup is done (:meth:`serve`), a call whose shape nobody declared gets the part's
    ``on_new_shape``: ``"compile"`` compiles it (a warning naming the shape, counted as a request-path compile),
    ``"eager"`` serves it uncompiled (logged once per shape, counted as a request-path eager call), ``"error"`` fails
    the call with :class:`NewShapeError`. ``strategy`` is what serves: ``"jit"`` (a ``torch.compile`` result, with
    precompiled functions in front of it when its ``jit_restore`` is ``"precompile"``) or ``"export"`` (an
    AOTInductor package: a shape outside its dims is the new shape)."""

    def __init__(self, fn: Callable[..., Any], eager: Callable[..., Any], cfg: CompileConfig, *, name: str = "model",
                 strategy: str = "jit", jit_restore: str = "dir") -> None:
        self.fn = fn
        self.eager = eager
        self.cfg = cfg
        self.name = name
        self.strategy = strategy
        self.jit_restore = jit_restore if strategy == "jit" else ""
        self.policy = "compile"  # during warm-up every call may compile; serve() applies cfg.on_new_shape
        self.request_path_compiles = 0
        self.request_path_eager_calls = 0
        self._lock = threading.Lock()
        self._eager_shapes: set[str] = set()
        self._warned_inference_copy = False
        # (event, shape, n): event "compile" or "eager"; the lifecycle records it in the metrics and on the prediction
        self.on_request: Callable[[str, str, int], None] | None = None
        self._sdpa = sdpa_backend(cfg)
        self._fmt = _memory_format(cfg)
        self.first_calls: tuple[float, float] | None = None  # warm-up's (start, end), time.monotonic()

    def serve(self) -> None:
        """Setup is done: from now on calls are requests, and a new shape gets ``cfg.on_new_shape``."""
        policy = self.cfg.on_new_shape
        if not self.is_compiled or policy == "compile":
            self.policy = policy
            return
        if self.strategy == "jit" and self.jit_restore == "precompile":
            self.fn.serve(policy)  # type: ignore[attr-defined]
        elif self.strategy == "jit":
            from .watch import can_see_guard_misses, run_only

            ro = run_only(self.fn)
            if ro is None:
                log.warning("part %r: on_new_shape=%r needs torch._dynamo.run, which this torch lacks: a new shape "
                            "compiles on the request path", self.name, policy)
                self.policy = "compile"
                return
            if not can_see_guard_misses():
                log.warning("part %r: this torch reports no guard outcomes: new shapes run eager but are not "
                            "counted, and on_new_shape='error' cannot fail them", self.name)
            self.fn = ro
        self.policy = policy

    async def batched(self, *args: Any, **kwargs: Any) -> Any:
        """Joined with concurrent calls into one model call: set by setup on a part whose config declares ``batch``
        (compile_cache/batching.py); this one says that it does not."""
        raise ConfigError(f"part {self.name!r} has no batching: declare Part(..., batch=Batch(...)) or "
                          "CompileConfig(batch=Batch(...)) to await its batched()")

    @property
    def is_compiled(self) -> bool:
        return self.fn is not self.eager

    def _ctx(self) -> contextlib.AbstractContextManager[Any]:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode() if self.cfg.inference_mode else torch.no_grad())
        if self._sdpa is not None:
            from torch.nn.attention import sdpa_kernel

            # The kernel choice is baked into the graph when it compiles (warm-up); on calls the context matters for
            # eager fallback and request-path compiles. Its flags are process-wide, like torch's own.
            stack.enter_context(sdpa_kernel(self._sdpa))
            # Torch 2.13's AOTAutograd/FX-graph cache keys ignore the SDPA choice (pytorch/pytorch#185449, measured
            # in tests/test_knobs.py): a graph compiled under another choice in the same cache dir would be reused.
            # The cache-key tag keeps the entries apart.
            tag = f"compile_cache.sdpa={self._sdpa.name}"
            if torch.compiler.config.cache_key_tag:
                tag = f"{torch.compiler.config.cache_key_tag}|{tag}"
            stack.enter_context(torch.compiler.config.patch(cache_key_tag=tag))
        return stack

    def _convert(self, args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any],
                                                                              list[tuple[torch.Tensor, int]]]:
        """Inputs in the form warm-up compiled for, so that a request never fails Dynamo's guards over form alone.
        Called outside inference mode, for two reasons Dynamo guards on:

        - 4-D tensors to the configured memory format (Dynamo guards on strides). A copy made inside inference mode
          would be an inference tensor (a caller's tensor already in the format is passed as it is: the two would
          differ).
        - Inference tensors (another part's output: parts run under inference mode) to ordinary ones, by a copy:
          warm-up examples are ordinary tensors, and Dynamo guards on the difference (measured on torch 2.13: one
          recompile). An export package has no guards: its inputs are left as they are.

        Also returns each such copy with its version counter, for :meth:`_check_copies`.
        """
        fmt = self._fmt
        copy_inference = self.strategy != "export"
        copies: list[tuple[torch.Tensor, int]] = []
        if fmt is None and not copy_inference:
            return tuple(args), kwargs, copies

        def one(x: Any) -> Any:
            if not isinstance(x, torch.Tensor):
                return x
            if copy_inference and x.is_inference():
                x = x.clone()
                copies.append((x, x._version))
            return x.contiguous(memory_format=fmt) if fmt is not None and x.dim() == 4 else x

        # A caller may itself run under inference mode (a pipeline's loop): copies made there would be inference
        # tensors again.
        with torch.inference_mode(False):
            return tuple(one(a) for a in args), {k: one(v) for k, v in kwargs.items()}, copies

    def _check_copies(self, copies: list[tuple[torch.Tensor, int]]) -> None:
        """A part that wrote in place into the copy of an inference-tensor input (a KV cache made under inference
        mode) lost that write: say so, once per part. An in-place write, eager or compiled, bumps the copy's version
        counter; inputs only read (token ids, another part's output) leave it as it was."""
        written = [c for c, version in copies if c._version != version]
        if written and not self._warned_inference_copy:
            self._warned_inference_copy = True
            log.warning("part %r: it wrote in place into an input %s made under torch.inference_mode; such an input "
                        "is copied for the call (Dynamo guards on the difference), so the write is lost: make it "
                        "outside inference mode (torch.no_grad() is enough)", self.name,
                        describe_args((written[0],), {}))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from .export import ShapeOutOfRange
        from .watch import watching

        cargs, ckwargs, copies = self._convert(args, kwargs)
        with watching() as rec, self._ctx():
            try:
                out = self.fn(*cargs, **ckwargs)
            except ShapeOutOfRange:  # export: outside the package's dims (a package cannot compile more)
                if self.policy != "eager":
                    raise
                rec.new_shape = True
                out = self.eager(*cargs, **ckwargs)
        if copies:
            self._check_copies(copies)
        if not self.is_compiled:
            return out
        if rec.compiles > 0:
            shape = describe_args(args, kwargs)
            with self._lock:
                self.request_path_compiles += rec.compiles
            log.warning("part %r: a request compiled %d new graph(s) for input %s: add this shape to the warm-up "
                        "plan", self.name, rec.compiles, shape)
            if self.on_request:
                self.on_request("compile", shape, rec.compiles)
        elif rec.new_shape and self.policy != "compile":
            self._served_eager(describe_args(args, kwargs))
        return out

    def _served_eager(self, shape: str) -> None:
        with self._lock:
            self.request_path_eager_calls += 1
            first = shape not in self._eager_shapes
            self._eager_shapes.add(shape)
        if first:
            log.warning("part %r: input %s was declared nowhere: served %s (on_new_shape=%r); add it to the warm-up "
                        "plan to serve it compiled", self.name, shape,
                        "uncompiled" if self.policy == "eager" else "uncompiled, then failed", self.policy)
        if self.on_request:
            self.on_request("eager", shape, 1)
        if self.policy == "error":
            raise NewShapeError(f"part {self.name!r}: input {shape} is a shape no warm-up example or export dim "
                                "declared, and on_new_shape='error'. Declare it, or set COMPILE_CACHE_ON_NEW_SHAPE="
                                "eager to serve it uncompiled")

    def warm_up(self, examples: Sequence[Example]) -> tuple[list[dict[str, Any]], str]:
        """Run every example once (one a loaded precompiled function already serves is only checked against its
        guards). If the first compiled call raises, switch to eager and return the reason."""
        timings: list[dict[str, Any]] = []
        ready = getattr(self.fn, "ready", None)  # precompiled functions loaded with their kernels: nothing to warm
        start = time.monotonic()  # the timeline splits a part's compile step here (isa.IsaStep.split)
        for ex in examples:
            t0 = time.monotonic()
            cargs, ckwargs, _ = self._convert(ex.args, ex.kwargs or {})
            if ready is not None and ready(*cargs, **ckwargs):
                timings.append({"shape": f"{ex.describe()} (precompiled, loaded)", "s": round(time.monotonic() - t0, 3)})
                continue
            try:
                with self._ctx():
                    self.fn(*cargs, **ckwargs)
            except Exception as e:
                if not self.is_compiled:
                    raise  # eager itself fails: the user's model is broken, not our business to hide
                reason = f"compiled call raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                self.fn = self.eager
                if self._sdpa is not None:
                    # The kernel choice may be what failed (e.g. flash with an unsupported head size): eager keeps
                    # the promise "correct, only slower" with torch's own choice.
                    self._sdpa = None
                    reason += "; attention kernel left to torch"
                self.first_calls = (start, time.monotonic())
                return timings, reason
            timings.append({"shape": ex.describe(), "s": round(time.monotonic() - t0, 3)})
        self.first_calls = (start, time.monotonic())
        return timings, ""
