"""The ``serve`` policy in the serving process (docs/fleet.md): a part that no restored entry covers serves eager from
the end of setup, behind a :class:`Swappable`, while :class:`BackgroundServe` gets its entry and swaps it in.

    setup():  restore -> the covered parts compile as under "wait" -> the others serve eager (Swappable)
              -> the build lease's first step (fleet.begin) -> BackgroundServe.start() -> setup returns: ready
    thread:   follow the lease (the holder's entry is restored) | hold it, or no lease: a ChildBuild, then restore
              -> each pending part the entry covers: prepared from the restored cache dir (load, warm-up) -> swapped
              in; the others stay eager -> ``compiled_s``
    exit:     BackgroundServe.stop(): the child is killed, the lease released (from the lifecycle's exit flush)

Dynamo and Inductor are imported in setup's thread before it returns (isa.import_inductor): imported here, beside an
eager request, they would break on their circular imports.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import isa as cpu_isa
from . import log as logmod
from .background import BuildResult, ChildBuild
from .compiler import CompiledModel, counts
from .fleet import Coordination
from .strategies import Plan

__all__ = ["BackgroundServe", "Swappable", "covered_parts", "served_as"]

log = logmod.log


def served_as(strategy: str, jit_restore: str) -> str:
    """What serves a compiled part, as ``Manifest.parts`` spells it: ``export``, ``jit/precompile`` or ``jit/dir``."""
    return strategy if strategy == "export" else f"{strategy}/{jit_restore}"


def covered_parts(status: str, listed: Mapping[str, str] | None, names: list[str]) -> dict[str, str]:
    """The parts an entry restored with ``status`` covers, by name: those its manifest lists (``listed``), or
    every part of a hit whose manifest lists none (written before manifests listed parts: assumed covered)."""
    if status != "hit":
        return {}
    if not listed:
        return {n: "" for n in names}
    return {n: v for n, v in listed.items() if n in names}


class Swappable:
    """What ``run()`` calls for a part whose build is pending: its eager model until :meth:`swap` puts the compiled
    one in. Each call reads ``current`` once, so a call that started on eager finishes on eager. Attributes are the
    current model's (``is_compiled``, ``strategy``, ...)."""

    def __init__(self, eager: CompiledModel) -> None:
        self.current = eager
        self.before_swap = eager
        self.swapped_at_s: float | None = None
        self.eager_calls = 0
        self._lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model = self.current
        eager = model is self.before_swap
        if eager:
            with self._lock:
                self.eager_calls += 1
        _on_prediction(eager)
        return model(*args, **kwargs)

    def swap(self, model: CompiledModel, at_s: float) -> None:
        self.swapped_at_s = round(at_s, 4)
        self.current = model

    def settle(self) -> None:
        """No build is coming (it failed, or the entry does not cover this part): the eager model serves on as a
        fallback, and its calls no longer count as served before a swap."""
        self.before_swap = None  # type: ignore[assignment]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.current, name)

    def __repr__(self) -> str:
        state = f"swapped at {self.swapped_at_s} s" if self.swapped_at_s is not None else "eager, build pending"
        return f"Swappable({self.current.name!r}, {state})"


def _on_prediction(eager: bool) -> None:
    """The prediction's Cog metric ``served_before_swap``: whether its last call of a part built in the background
    was served eager, before the swap (a prediction that spans the swap reports its last call)."""
    try:
        from .batching import prediction_scopes

        for scope in prediction_scopes():  # a batched call serves several predictions
            scope.record_metric("served_before_swap", eager)
    except Exception:  # outside the Cog runtime there is no prediction to tell
        pass


@dataclass
class BackgroundServe:
    """The thread that brings the pending parts to compiled. ``runner``: the CompiledRunner (its ``_prepare`` records
    a part's metrics; ``_background_done`` records the end); ``restore_entry``: the ordinary restore of this key;
    ``child``: makes the ChildBuild when this replica builds."""

    runner: Any
    pending: dict[str, tuple[Plan, Swappable]]
    fleet: Coordination
    restore_entry: Callable[[], Any]
    child: Callable[[], ChildBuild]
    wait_s: float
    cache_dir: Path
    t_start: float
    build: BuildResult | None = None
    built_here: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    _stopping: bool = False
    proc: ChildBuild | None = None  # the child, where this replica builds
    _thread: threading.Thread | None = None

    def start(self) -> None:
        # A daemon: the exit never waits for it (stop() kills the child it waits on).
        self._thread = threading.Thread(target=self._run, name="compile-cache-serve", daemon=True)
        self._thread.start()

    def stop(self, deadline: float) -> None:
        """At exit: no more swaps; the child ends now; a lease this replica holds ends ``released``."""
        self._stopping = True
        if self.proc is not None:
            self.proc.kill()
        self.fleet.release(deadline)

    def _run(self) -> None:
        why = ""
        try:
            r, why = self._entry()
            if r is not None and not self._stopping:
                why = self._swap_in(r)
        except Exception as e:  # never into the serving process: the parts stay eager
            why = f"{type(e).__name__}: {e}"
            log.exception("background build: %s", why)
        finally:
            if not self._stopping:  # stopped at exit: the parts never got compiled, compiled_s stays null
                self.runner._background_done(self, why)
            self.done.set()

    def _entry(self) -> tuple[Any, str]:
        """The key's entry, restored (a hit), or None and why not."""
        c = self.fleet
        if c.role != "none":
            c.settle(self.wait_s, self.restore_entry)
            if c.restored is not None:
                return c.restored, ""
            if c.stopped == "failed":  # never a second build of what failed: the parts stay eager
                return None, f"the build of {c.holder} failed ({c.reason})"
        if self._stopping:
            return None, "stopped"
        self.proc = proc = self.child()
        self.built_here = True
        with c.building(exit_budget_s=1.0):  # renewals while the child builds (no SIGTERM hook: not the main thread)
            proc.start()
            self.runner._write_metrics()  # background_build: running, with the child's pid
            self.build = proc.wait()
        if self.build.state != "done":
            why = f"background build {self.build.state}: {self.build.reason} (its log: {self.build.log})"
            if self.build.state == "failed":
                c.failed(why)
            return None, why
        r = self.restore_entry()
        if r.status != "hit":
            c.failed(f"the entry built did not restore ({r.status}: {r.reason})")
            return None, f"the entry built did not restore ({r.status}: {r.reason})"
        c.published("", complete=True)  # the child published it before it exited
        return r, ""

    def _swap_in(self, r: Any) -> str:
        """Prepare each pending part the entry covers from the restored cache dir, and swap it in once its warm-up
        passed. Returns why parts stay eager ("" if none does)."""
        names = list(self.pending)
        covered = covered_parts("hit", r.manifest.parts if r.manifest is not None else None, names)
        plans = [p for n, (p, _) in self.pending.items() if n in covered]
        isa = cpu_isa.begin(self.cache_dir) if any(cpu_isa.needed_by(p.cfg) for p in plans) else None
        before, eager = counts(), []
        for name, (plan, sw) in self.pending.items():
            if self._stopping:
                break
            if name not in covered:
                eager.append(f"{name}: the entry does not cover it")
                continue
            plan = _loadable(plan, covered[name], self.cache_dir)
            if plan is None:
                eager.append(f"{name}: the entry holds no package for it")
                continue
            model = self.runner._prepare(plan, self.cache_dir, isa)
            if not model.is_compiled:
                eager.append(f"{name}: {self.runner.metrics.parts[name]['eager_fallback']}")
                continue
            model.on_request = functools.partial(self.runner._on_request, name)
            model.serve()
            sw.swap(model, time.monotonic() - self.t_start)
            log.info("part %r: compiled, swapped in at %.2f s (%d call(s) served eager before)", name,
                     sw.swapped_at_s, sw.eager_calls)
        if isa is not None:
            isa.end()
        self.runner._record_counts(before, add=True)
        return "; ".join(eager)


def _loadable(plan: Plan, served: str, cache_dir: Path) -> Plan | None:
    """``plan`` as it can be prepared here from what the entry holds, without building anything heavy in the serving
    process: an export part whose entry has its package loads it; one the entry serves by jit goes the jit way (its
    export failed where it was built); one with neither is None."""
    if plan.cfg.strategy != "export" or not plan.cfg.enable:
        return plan
    if served.startswith("jit/"):
        cfg = plan.cfg.model_copy(update={"strategy": "jit", "jit_restore": served.split("/", 1)[1]})
        return Plan(plan.name, plan.module, cfg, None, plan.examples, plan.stem)
    own = cache_dir / "aoti" / f"{plan.stem}.pt2"
    return plan if own.exists() or Path(f"{own}.ref").exists() else None
