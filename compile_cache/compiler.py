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

__all__ = ["Example", "Counts", "counts", "inductor_cache_dir", "cache_roots", "compile_model", "CompiledModel"]

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
    """Dynamo / Inductor / AOTAutograd counters of this process (FACTS §3 names them)."""
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
    """Inductor's cache dir: ``TORCHINDUCTOR_CACHE_DIR`` when set (respected as is), else Torch's default."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir())


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


def compile_model(model: Callable[..., Any], cfg: CompileConfig) -> tuple[Callable[..., Any], str]:
    """``torch.compile`` per ``cfg``; returns (callable, why-eager). On failure returns the model itself and the
    reason, so the caller serves eager. ``mode="reduce-overhead"`` needs CUDA graphs: on CPU it degrades to the
    default mode with a warning instead of failing."""
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
    """What ``predict()`` calls: the compiled (or eager) callable, run under inference mode, with a watch on
    compiles. A call that compiles (a shape outside the warm-up plan) logs a warning naming the shape and records a
    metric on the prediction, so a gap in the plan is visible in production."""

    def __init__(self, fn: Callable[..., Any], eager: Callable[..., Any], cfg: CompileConfig) -> None:
        self.fn = fn
        self.eager = eager
        self.cfg = cfg
        self.request_path_compiles = 0
        self._lock = threading.Lock()
        self.on_request_compile: Callable[[str, int], None] | None = None

    @property
    def is_compiled(self) -> bool:
        return self.fn is not self.eager

    def _ctx(self) -> contextlib.AbstractContextManager[Any]:
        return torch.inference_mode() if self.cfg.inference_mode else torch.no_grad()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        before = counts().compiles
        with self._ctx():
            out = self.fn(*args, **kwargs)
        new = counts().compiles - before
        if new > 0 and self.is_compiled:
            with self._lock:
                self.request_path_compiles += new
            shape = describe_args(args, kwargs)
            log.warning(
                "a request compiled %d new graph(s) for input %s: add this shape to the warm-up plan", new, shape
            )
            if self.on_request_compile:
                self.on_request_compile(shape, new)
        return out

    def warm_up(self, examples: Sequence[Example]) -> tuple[list[dict[str, Any]], str]:
        """Run every example once. If the first compiled call raises, switch to eager and return the reason."""
        timings: list[dict[str, Any]] = []
        for ex in examples:
            t0 = time.monotonic()
            try:
                with self._ctx():
                    self.fn(*ex.args, **(ex.kwargs or {}))
            except Exception as e:
                if not self.is_compiled:
                    raise  # eager itself fails: the user's model is broken, not our business to hide
                reason = f"compiled call raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                self.fn = self.eager
                return timings, reason
            timings.append({"shape": ex.describe(), "s": round(time.monotonic() - t0, 3)})
        return timings, ""
