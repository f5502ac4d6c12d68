"""Request batching for a part (``CompileConfig.batch``): concurrent ``await part.batched(...)`` calls joined into one
model call, and each caller given back its own rows.

    caller:  its rows counted -> queued with its Cog scope and the time -> awaits its rows (shielded: a cancelled
             caller leaves its batch running)
    worker:  waits ``max_delay_ms`` from the first queued call, or until ``max_size`` rows -> in a thread, one joined
             call at a time per part: groups (the runner's collate, or calls of equal shapes) -> each group padded or
             split to sizes the part declares -> the model -> split back by rows; a group that raised: each of its
             calls again alone -> ``batch_size``, ``batch_wait_ms`` on each caller's prediction

No undeclared shape reaches a compiled model: a jit part's joined rows are padded to the smallest warm-up size that
fits (or split into chunks of the largest), an export part's run exactly while inside its ``Dim`` (split above it).
Torch is imported where tensors are joined, padded and split.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import log as logmod
from .config import Batch

if TYPE_CHECKING:
    from .strategies import Plan

__all__ = ["Batcher", "BatchStats", "Sizes", "attach", "prediction_scopes"]

log = logmod.log

# The metrics file is rewritten every this many joined calls (and at exit), so that a long-lived replica's file
# shows its batching without waiting for an upload.
WRITE_EVERY = 100
WAITS_KEPT = 10_000  # the queue waits the percentiles are taken over (the latest ones)

# Inside a joined call: the Cog scopes of the predictions it serves. The thread the call runs in carries the context
# of whichever caller started the worker, so per-prediction counters read this first (prediction_scopes).
_SCOPES: contextvars.ContextVar[tuple[Any, ...] | None] = contextvars.ContextVar("compile_cache_batch_scopes",
                                                                                default=None)


def prediction_scopes() -> list[Any]:
    """The Cog scopes of the predictions the running model call serves: every prediction of its batch inside a joined
    call, else the current prediction's (a no-op scope outside one)."""
    scopes = _SCOPES.get()
    if scopes is not None:
        return list(scopes)
    from cog import current_scope

    return [current_scope()]


def _caller_scope() -> Any:
    try:
        from cog import current_scope

        return current_scope()
    except Exception:  # outside the Cog runtime there is no prediction to tell
        return None


@dataclass(frozen=True)
class Sizes:
    """The sizes along the batch dim a compiled part serves: a jit part's warm-up sizes (``declared``), an export
    part's ``Dim`` range (``lo``..``hi``; ``hi`` 0 where it has no spec)."""

    declared: tuple[int, ...] = ()
    lo: int = 1
    hi: int = 0

    @classmethod
    def of(cls, plan: Plan, dim: int) -> Sizes:
        declared = sorted({n for ex in plan.warmup_examples() if (n := _rows_or_none(ex.args, ex.kwargs or {}, dim))})
        lo, hi = 1, 0
        if plan.spec is not None and plan.spec.example_args:
            first = plan.spec.example_args[0]
            d = dim % first.dim()
            rng = plan.spec.dynamic_dims.get(0, {}).get(d)
            lo, hi = (rng.min, rng.max) if rng is not None else (int(first.shape[d]),) * 2
        return cls(tuple(declared), max(lo, 1), hi)

    def calls(self, n: int, model: Any) -> list[tuple[int, int]]:
        """(real rows, rows after padding) of each model call that ``n`` joined rows take on ``model`` as it is now
        (a part built in the background changes from eager to compiled, and an export part may serve by jit)."""
        if not getattr(model, "is_compiled", False):
            return [(n, n)]
        if getattr(model, "strategy", "jit") == "export":
            if not self.hi:
                return [(n, n)]
            step, fit = self.hi, lambda r: max(r, self.lo)
        else:
            if not self.declared:
                return [(n, n)]
            step, fit = self.declared[-1], lambda r: next(s for s in self.declared if s >= r)
        out = []
        while n > 0:
            r = min(n, step)
            out.append((r, fit(r)))
            n -= r
        return out


@dataclass
class BatchStats:
    """A part's ``batch`` in the metrics file: joined calls, how many real rows each had, and the queue waits."""

    batches: int = 0
    sizes: Counter[int] = field(default_factory=Counter)
    waits_ms: deque[float] = field(default_factory=lambda: deque(maxlen=WAITS_KEPT))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, rows: int, waits_ms: Sequence[float]) -> int:
        with self._lock:
            self.batches += 1
            self.sizes[rows] += 1
            self.waits_ms.extend(waits_ms)
            return self.batches

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            waits = sorted(self.waits_ms)
            return {"batches": self.batches, "sizes": {str(k): v for k, v in sorted(self.sizes.items())},
                    "wait_ms_p50": _percentile(waits, 50), "wait_ms_p99": _percentile(waits, 99)}


def _percentile(ordered: list[float], p: int) -> float:
    if not ordered:
        return 0.0
    return round(ordered[min(len(ordered) - 1, max(0, -(-len(ordered) * p // 100) - 1))], 3)  # nearest rank


@dataclass
class _Call:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    rows: int
    future: asyncio.Future[Any]
    scope: Any
    queued: float


class Batcher:
    """``part.batched``: an async callable that joins concurrent calls (see the module docstring). ``served`` is what
    ``run()`` calls for the part (a ``CompiledModel``, or a ``serve.Swappable`` whose model is swapped in later):
    every joined call goes through it. ``report`` rewrites the metrics file (every :data:`WRITE_EVERY` joined
    calls)."""

    def __init__(self, name: str, served: Callable[..., Any], batch: Batch, sizes: Sizes,
                 report: Callable[[], None] | None = None) -> None:
        self.name, self.served, self.batch, self.sizes, self.report = name, served, batch, sizes, report
        self.stats = BatchStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: list[_Call] = []
        self._more = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        rows = _rows_or_none(args, kwargs, self.batch.dim)
        if rows is None:
            raise TypeError(f"part {self.name!r}: batched() needs a tensor argument with dim {self.batch.dim} "
                            "(its rows)")
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new event loop (tests run one per asyncio.run): nothing of the old one is live
            self._loop, self._queue, self._more, self._worker = loop, [], asyncio.Event(), None
        call = _Call(args, kwargs, rows, loop.create_future(), _caller_scope(), time.monotonic())
        self._queue.append(call)
        self._more.set()
        if self._worker is None or self._worker.done():
            # An empty context: the worker belongs to no caller's prediction (each call carries its own scope)
            self._worker = loop.create_task(self._work(), context=contextvars.Context())
        try:
            return await asyncio.shield(call.future)
        except asyncio.CancelledError:
            call.future.add_done_callback(_retrieve)  # its rows are computed with the batch and dropped
            raise

    async def _work(self) -> None:
        delay = self.batch.max_delay_ms / 1000
        while self._queue:
            end = self._queue[0].queued + delay
            while sum(c.rows for c in self._queue) < self.batch.max_size and (left := end - time.monotonic()) > 0:
                self._more.clear()
                try:
                    await asyncio.wait_for(self._more.wait(), left)
                except TimeoutError:
                    break
            calls = self._take()
            try:
                outcomes = await asyncio.to_thread(self._serve, calls)
            except BaseException as e:  # a fault of the batcher itself (or the loop closing): no caller hangs
                for c in calls:
                    if not c.future.done():
                        c.future.set_exception(e if isinstance(e, Exception) else RuntimeError("batch cancelled"))
                raise
            for c, (ok, value) in zip(calls, outcomes, strict=True):
                if not c.future.done():  # a cancelled caller's future is cancelled already
                    (c.future.set_result if ok else c.future.set_exception)(value)

    def _take(self) -> list[_Call]:
        """The oldest calls, up to ``max_size`` rows (at least one call, however many rows it has)."""
        taken = [self._queue.pop(0)]
        rows = taken[0].rows
        while self._queue and rows + self._queue[0].rows <= self.batch.max_size:
            rows += self._queue[0].rows
            taken.append(self._queue.pop(0))
        return taken

    # -- in the model's thread ---------------------------------------------------------------------------------------
    def _serve(self, calls: list[_Call]) -> list[tuple[bool, Any]]:
        """Every call's outcome, (True, its rows) or (False, the exception), in order."""
        started = time.monotonic()
        outcomes: list[tuple[bool, Any]] = [(False, None)] * len(calls)
        groups = [list(range(len(calls)))] if self.batch.collate is not None else _groups(calls, self.batch.dim)
        for group in groups:
            members = [calls[i] for i in group]
            try:
                for i, out in zip(group, self._joined(members, started), strict=True):
                    outcomes[i] = (True, out)
                continue
            except Exception as e:
                if len(group) == 1:
                    outcomes[group[0]] = (False, e)
                    continue
                log.warning("part %r: a batch of %d calls raised (%s: %s): each call runs alone", self.name,
                            len(group), type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            for i in group:  # one bad request fails its own prediction only
                try:
                    outcomes[i] = (True, self._joined([calls[i]], started)[0])
                except Exception as e:
                    outcomes[i] = (False, e)
        return outcomes

    def _joined(self, calls: list[_Call], started: float) -> list[Any]:
        """One joined call of ``calls`` (padded or split as the part declares); each call's rows of the output."""
        dim = self.batch.dim
        if self.batch.collate is not None:
            args, kwargs, sizes = self.batch.collate([(c.args, c.kwargs) for c in calls])
            args, sizes = tuple(args), [int(s) for s in sizes]
        elif len(calls) == 1:
            args, kwargs, sizes = calls[0].args, calls[0].kwargs, [calls[0].rows]
        else:
            args, kwargs, sizes = _join(calls, dim), _join_kwargs(calls, dim), [c.rows for c in calls]
        n = sum(sizes)  # real rows: padding is added below
        scopes = tuple(c.scope for c in calls if c.scope is not None)
        pieces, start = [], 0
        token = _SCOPES.set(scopes)
        try:
            for real, padded in self.sizes.calls(n, self.served):
                a, k = _slice_pad(args, kwargs, dim, n, start, real, padded)
                pieces.append(_tree(self.served(*a, **k), lambda t, r=real: t.narrow(dim % t.dim(), 0, r)))
                start += real
        finally:
            _SCOPES.reset(token)
        out = pieces[0] if len(pieces) == 1 else _cat(pieces, dim)
        split = _split(out, dim, sizes)
        waits = [(started - c.queued) * 1000 for c in calls]
        for c, wait in zip(calls, waits, strict=True):
            _record(c.scope, n, wait)
        if self.stats.record(n, waits) % WRITE_EVERY == 0 and self.report is not None:
            self.report()
        return split


def attach(plans: Sequence[Plan], served: dict[str, Any], report: Callable[[], None]) -> dict[str, Batcher]:
    """Give each served part whose config declares ``batch`` its ``batched`` (set on the served object itself, so
    that a part swapped in later is the one called). Returns the batchers by part name."""
    out = {}
    for plan in plans:
        if plan.cfg.batch is None:
            continue
        b = Batcher(plan.name, served[plan.name], plan.cfg.batch, Sizes.of(plan, plan.cfg.batch.dim), report)
        served[plan.name].batched = b
        out[plan.name] = b
        log.info("part %r: batching up to %d rows within %.1f ms (%s)", plan.name, plan.cfg.batch.max_size,
                 plan.cfg.batch.max_delay_ms, _describe(b.sizes))
    return out


def _describe(s: Sizes) -> str:
    parts = []
    if s.declared:
        parts.append(f"jit sizes {list(s.declared)}")
    if s.hi:
        parts.append(f"export range {s.lo}..{s.hi}")
    return ", ".join(parts) or "no declared sizes: exact"


def _record(scope: Any, rows: int, wait_ms: float) -> None:
    if scope is None:
        return
    try:
        scope.record_metric("batch_size", rows)
        scope.record_metric("batch_wait_ms", round(wait_ms, 3))
    except Exception:  # a prediction already over: nothing to tell
        log.debug("could not record the batch metrics", exc_info=True)


def _retrieve(f: asyncio.Future[Any]) -> None:
    if not f.cancelled():
        f.exception()


# -- tensors ---------------------------------------------------------------------------------------------------------
def _is_tensor(x: Any) -> bool:
    import torch

    return isinstance(x, torch.Tensor)


def _rows_or_none(args: Sequence[Any], kwargs: dict[str, Any], dim: int) -> int | None:
    """The size along ``dim`` of the first tensor argument: the call's rows."""
    for x in (*args, *kwargs.values()):
        if _is_tensor(x) and x.dim() > 0:
            return int(x.shape[dim % x.dim()])
    return None


def _signature(call: _Call, dim: int) -> tuple[Any, ...]:
    """What must be equal for calls to join: each tensor's dtype, device and sizes but ``dim`` (a tensor without
    ``rows`` along ``dim`` makes the call go alone), and every other argument's value."""
    def one(x: Any) -> Any:
        if not _is_tensor(x):
            return ("value", x)
        d = dim % x.dim() if x.dim() else 0
        if x.dim() == 0 or x.shape[d] != call.rows:
            return ("alone", id(call))
        return ("tensor", x.dtype, x.device, tuple(s for i, s in enumerate(x.shape) if i != d))

    kw = sorted(call.kwargs)
    return (tuple(one(a) for a in call.args), tuple(kw), tuple(one(call.kwargs[k]) for k in kw))


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # a value whose == is not a truth value (an array): not joined
        return False


def _groups(calls: list[_Call], dim: int) -> list[list[int]]:
    """Indices of the calls that can join, in arrival order within each group."""
    groups: list[tuple[Any, list[int]]] = []
    for i, c in enumerate(calls):
        sig = _signature(c, dim)
        for key, members in groups:
            if _same(key, sig):
                members.append(i)
                break
        else:
            groups.append((sig, [i]))
    return [members for _, members in groups]


def _cat_or_first(values: list[Any], dim: int) -> Any:
    import torch

    if _is_tensor(values[0]):
        return torch.cat(values, dim % values[0].dim())
    return values[0]  # equal across the group


def _join(calls: list[_Call], dim: int) -> tuple[Any, ...]:
    return tuple(_cat_or_first([c.args[i] for c in calls], dim) for i in range(len(calls[0].args)))


def _join_kwargs(calls: list[_Call], dim: int) -> dict[str, Any]:
    return {k: _cat_or_first([c.kwargs[k] for c in calls], dim) for k in calls[0].kwargs}


def _slice_pad(args: tuple[Any, ...], kwargs: dict[str, Any], dim: int, n: int, start: int, real: int,
               padded: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Rows ``start``..``start+real`` of every tensor with ``n`` rows, zero rows appended up to ``padded``."""
    if start == 0 and real == n == padded:
        return args, kwargs
    import torch

    def one(x: Any) -> Any:
        if not _is_tensor(x) or x.dim() == 0 or x.shape[dim % x.dim()] != n:
            return x
        d = dim % x.dim()
        x = x.narrow(d, start, real)
        if padded > real:
            shape = list(x.shape)
            shape[d] = padded - real
            x = torch.cat([x, x.new_zeros(shape)], d)
        return x

    return tuple(one(a) for a in args), {k: one(v) for k, v in kwargs.items()}


def _tree(out: Any, fn: Callable[[Any], Any]) -> Any:
    """``fn`` on every tensor of an output (a tensor, or a tuple, list or dict of them; other values as they are)."""
    import torch
    from torch.utils._pytree import tree_map_only

    return tree_map_only(torch.Tensor, fn, out)


def _cat(pieces: list[Any], dim: int) -> Any:
    """The outputs of a split call's pieces, joined leaf by leaf (non-tensor leaves: the first piece's)."""
    from torch.utils._pytree import tree_flatten, tree_unflatten

    flat = [tree_flatten(p) for p in pieces]
    leaves = [_cat_or_first([f[0][i] for f in flat], dim) for i in range(len(flat[0][0]))]
    return tree_unflatten(leaves, flat[0][1])


def _split(out: Any, dim: int, sizes: list[int]) -> list[Any]:
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    return [_tree(out, lambda t, o=o, s=s: t.narrow(dim % t.dim(), o, s)) for o, s in zip(offsets, sizes, strict=True)]
