"""What one call of a compiled part did on the request path: how many graphs it compiled, whether Dynamo found no
compiled code for its inputs. Counted per thread, so concurrent predictions (an async ``run()`` handing model calls
to threads) are each charged for their own compiles only.

Why per thread and how:

- Dynamo compiles one frame at a time under a process-wide lock (``torch._dynamo.convert_frame.compile_lock``) and
  runs its compile callbacks (``torch._dynamo.callback.callback_handler``) inside that lock, in the thread whose
  call needs the compile. The FX graphs counter (``counters["stats"]["unique_graphs"]``) read at a compile's start
  and end callbacks gives exactly the graphs that compile made; it is credited to the calling thread. A delta of the
  process-wide counter around a call would also count what other threads compiled meanwhile.
- A call made through ``torch._dynamo.run`` (Dynamo's run-only mode: use compiled code whose guards accept the
  inputs, never compile; the same mode ``set_stance("eager_on_recompile")`` selects, but for one callable instead of
  the whole process) runs eager when no compiled code accepts the inputs. Dynamo reports each guard check's outcome
  to ``torch._C._dynamo.eval_frame.set_guard_complete_hook``'s hook, in the calling thread; a failed check marks the
  call. The hook must not raise (an exception there aborts the process: measured on torch 2.13), so it only marks.

Both hooks are process-wide and installed once; a hook already installed is chained, not replaced. Torch builds
without them (``hasattr`` checks) still serve: compiles are then counted process-wide and eager calls are not seen.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

__all__ = ["CallRecord", "watching", "run_only", "can_see_guard_misses", "install", "mark_new_shape", "current"]

log = logging.getLogger("compile_cache")

_tls = threading.local()
_install_lock = threading.Lock()
_installed = {"compiles": False, "misses": False, "misses_checked": False, "warned": False}


@dataclass
class CallRecord:
    """Filled in while a call runs (its thread only)."""

    compiles: int = 0  # graphs Dynamo compiled for this call
    # Dynamo had compiled code for a frame and none of it accepted the inputs (run-only: that frame ran eager), or a
    # strategy said so itself (mark_new_shape)
    new_shape: bool = False


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _stack() -> list[CallRecord]:
    s = getattr(_tls, "stack", None)
    if s is None:
        s = _tls.stack = []
    return s


def _on_compile_start(args: Any) -> None:
    _tls.graphs_at_start = _graphs()


def _on_compile_end(args: Any) -> None:
    start = getattr(_tls, "graphs_at_start", None)
    _tls.graphs_at_start = None
    stack = _stack()
    if start is not None and stack:
        stack[-1].compiles += _graphs() - start


def install() -> None:
    """Install the process-wide hooks (idempotent). The compile callbacks are checked on every call:
    ``torch._dynamo.reset()`` clears them."""
    try:
        from torch._dynamo.callback import callback_handler
    except ImportError:
        callback_handler = None
    if _installed["misses_checked"] and callback_handler is not None and _on_compile_end in callback_handler.end_callbacks:
        return
    with _install_lock:
        if callback_handler is None:
            if not _installed["warned"]:
                log.warning("this torch has no Dynamo compile callbacks: request-path compiles are counted "
                            "process-wide")
                _installed["warned"] = True
        elif _on_compile_end not in callback_handler.end_callbacks:
            callback_handler.register_start_callback(_on_compile_start)
            callback_handler.register_end_callback(_on_compile_end)
            _installed["compiles"] = True
        if not _installed["misses"] and can_see_guard_misses():
            from torch._C._dynamo.eval_frame import set_guard_complete_hook

            prev: Callable[[bool], Any] | None = None

            def hook(hit: bool) -> Any:
                if not hit:
                    stack = _stack()
                    if stack:
                        stack[-1].new_shape = True
                return prev(hit) if prev is not None else hit

            prev = set_guard_complete_hook(hook)
            _installed["misses"] = True
        _installed["misses_checked"] = True


def can_see_guard_misses() -> bool:
    """Whether this torch reports guard outcomes (needed to notice a run-only call that ran eager)."""
    try:
        import torch._C._dynamo.eval_frame as ef
    except ImportError:
        return False
    return hasattr(ef, "set_guard_complete_hook")


def run_only(fn: Callable[..., Any]) -> Callable[..., Any] | None:
    """``fn`` (a ``torch.compile`` result) in Dynamo's run-only mode, or None where this torch lacks it."""
    import torch

    run = getattr(torch._dynamo, "run", None)
    if run is None:
        return None
    # A compiled module is run through its compiled forward: run() of the module itself wraps a module whose own
    # forward Dynamo skips (nn.Sequential, torch.nn's containers) in a new frame whose guards never match, so every
    # call would run eager and count as a new shape (measured, torch 2.13: TinyMLP hits either way, Sequential only
    # this way).
    if isinstance(fn, torch._dynamo.eval_frame.OptimizedModule):
        return run(fn.forward)  # type: ignore[no-any-return]
    return run(fn)  # type: ignore[no-any-return]


@contextmanager
def watching() -> Iterator[CallRecord]:
    """Record what Dynamo does in this thread until the block ends."""
    install()
    rec = CallRecord()
    stack = _stack()
    stack.append(rec)
    before = None if _installed["compiles"] else _graphs()
    try:
        yield rec
    finally:
        stack.pop()
        if before is not None:
            rec.compiles = _graphs() - before


def mark_new_shape() -> None:
    """The call running in this thread met inputs no compiled code serves (for strategies that know it first)."""
    stack = _stack()
    if stack:
        stack[-1].new_shape = True


def current() -> CallRecord | None:
    """The record of the call running in this thread, if it is watched."""
    stack = _stack()
    return stack[-1] if stack else None
