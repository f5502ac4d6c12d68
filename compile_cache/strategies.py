"""How one part becomes fast: two strategies behind one call, so setup() reads the same whatever each part uses.

    strategy.prepare(plan, cache_dir) -> Prepared, or None: "I cannot serve this part; the next strategy does"

- ``export``: an AOTInductor package built by torch.export, kept in the Inductor cache dir (so in the store); one
  package serves every shape inside the export spec's dims, and loading it runs no Dynamo.
- ``jit``: ``torch.compile`` with the Inductor cache dir restored, then one warm-up call per example. Its restore
  mode (``jit_restore``) says what a warm boot reuses beyond the dir: ``"precompile"`` (the default) puts
  AOT-precompiled functions per warm-up shape, kept in the cache dir, in front of the ``torch.compile`` function
  (compile_cache/precompile.py); ``"dir"`` restores the dir alone.

A part falls back alone: export -> jit -> eager. ``jit`` always returns: a compile that fails serves eager and says why.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from .compiler import CompiledModel, Example, compile_model, describe_args
from .config import CompileConfig
from .export import ExportSpec

__all__ = ["Plan", "Prepared", "Strategy", "ExportStrategy", "JitStrategy", "chain", "prepare"]

log = logging.getLogger("compile_cache")


@dataclass
class Plan:
    """One part as setup resolved it: what to compile, how, and where its artifacts live."""

    name: str
    module: Callable[..., Any]
    cfg: CompileConfig  # the runner's config, then the part's overrides, then the environment's
    spec: ExportSpec | None = None
    examples: Callable[[], Sequence[Example]] = list  # called when a strategy needs them (after load())
    stem: str = ""  # the file name stem of this part's artifacts in the cache dir (the key, plus the part's name)
    seeded: bool = False  # the cache dir holds a seed: another version's entry of the same lineage and environment
    seed_stem: str = ""  # the seed's stem for this part, when seeded

    def warmup_examples(self) -> list[Example]:
        try:
            examples = list(self.examples())
        except NotImplementedError:
            examples = []
        if not examples and self.spec is not None:  # an export part fallen back to jit: its spec's inputs
            examples = [Example(tuple(self.spec.example_args), label="export spec example")]
        return examples


@dataclass
class Prepared:
    model: CompiledModel
    strategy: str  # what serves: "export" or "jit"
    warmup: list[dict[str, Any]] = field(default_factory=list)  # {"shape", "s"} per warm-up call
    why_eager: str = ""  # non-empty: the part serves eager, and this is why
    jit_restore: str = ""  # strategy "jit": its restore mode, "precompile" or "dir"; "" for "export"


class Strategy(Protocol):
    name: str

    def prepare(self, plan: Plan, cache_dir: Path) -> Prepared | None: ...


class ExportStrategy:
    """Load the part's package (restored from the store) or build it. Fallbacks, each logged once: export fails ->
    None (jit); a restored package fails to load or raises on its first call -> rebuild once; a fresh build raises
    too -> None."""

    name = "export"

    def prepare(self, plan: Plan, cache_dir: Path) -> Prepared | None:
        from .export import ExportedModel, ExportError, adopt_equivalent_package, build_package, resolve_package
        from .failures import export_record, read_failure, record_failure

        spec, eager = plan.spec, plan.module
        if spec is None:
            return None
        if not isinstance(eager, torch.nn.Module):
            log.warning("part %r: export needs an nn.Module, got %s: falling back to the jit strategy", plan.name,
                        type(eager).__name__)
            return None
        own = cache_dir / "aoti" / f"{plan.stem}.pt2"
        if not own.exists() and (failed := read_failure(export_record(own))) is not None:  # failed before: do not pay it again
            log.warning("part %r: export skipped: it failed for this key before (%s): using the jit strategy",
                        plan.name, failed.reason)
            return None
        pkg, program = Path(resolve_package(own)), None  # this key's package, or one its .ref proved equivalent
        # A seeded version reuses a restored package only if it compiles the same exported program (one
        # torch.export, no build: export.adopt_equivalent_package); else it builds its own, and says so.
        if not pkg.exists() and plan.seeded:
            try:
                found, program = adopt_equivalent_package(eager, spec, own)
            except ExportError:
                found = None  # the build below fails the same way and falls back
            if found is not None:
                pkg = Path(found)
                log.info("part %r: the seed's package %s compiles this version's program: reusing it", plan.name,
                         pkg.name)
            else:
                log.info("part %r: no restored package compiles this version's program; building one", plan.name)
        for attempt in ("restored", "built"):
            if attempt == "built":
                pkg = own
                try:
                    info = build_package(eager, spec, pkg, keep_weights_out=True, program=program)
                    log.info("export: built %s (%.1f MB) in %.1fs", pkg.name, info["package_bytes"] / 1e6,
                             info["export_s"] + info["compile_s"])
                except ExportError as e:
                    log.warning("part %r: export FAILED (%s): falling back to the jit strategy", plan.name,
                                str(e).splitlines()[0])
                    record_failure(export_record(own), e, stage="export")
                    return None
            elif not pkg.exists():
                continue
            t = time.monotonic()
            try:
                model = ExportedModel.load(spec, pkg, eager, keep_weights_out=True)
                with torch.inference_mode():
                    model(*spec.example_args)
            except Exception as e:
                what = "falling back to the jit strategy" if attempt == "built" else "rebuilding it once"
                log.warning("part %r: the %s export package raised (%s: %s): %s", plan.name, attempt,
                            type(e).__name__, str(e).splitlines()[0] if str(e) else "", what)
                own.unlink(missing_ok=True)  # never another key's package: its .ref goes instead
                Path(f"{own}.ref").unlink(missing_ok=True)
                if attempt == "built":
                    record_failure(export_record(own), e, stage="package")
                continue
            warmup = [{"shape": f"package {attempt}, first call {describe_args(spec.example_args, {})}",
                       "s": round(time.monotonic() - t, 3)}]
            return Prepared(CompiledModel(model, eager, plan.cfg, name=plan.name, strategy="export"), "export", warmup)
        return None


class JitStrategy:
    """``torch.compile`` per the config, then one warm-up call per example (each compiles its shape, or loads it
    from the restored cache dir). A compile or a first compiled call that fails serves eager.

    ``restore`` is the restore mode (``CompileConfig.jit_restore``): ``"precompile"`` puts per-shape precompiled
    functions kept in ``<cache dir>/precompile/<stem>`` in front of the compiled function: a warm boot loads them and
    traces nothing, and a call none accepts goes through the compiled function (docs/restore-strategies.md).
    ``"dir"``: the compiled function alone, over the restored cache dir."""

    name = "jit"

    def __init__(self, restore: str = "dir") -> None:
        self.restore = restore

    def wrap(self, plan: Plan, fn: Callable[..., Any], cache_dir: Path) -> Callable[..., Any]:
        if self.restore != "precompile":
            return fn
        from .precompile import Precompiled

        seed = cache_dir / "precompile" / plan.seed_stem if plan.seeded and plan.seed_stem else None
        return Precompiled(plan.module, fn, plan.cfg, cache_dir / "precompile" / plan.stem, seed)

    def prepare(self, plan: Plan, cache_dir: Path) -> Prepared:
        fn, why_eager = compile_model(plan.module, plan.cfg)
        if not why_eager:
            fn = self.wrap(plan, fn, cache_dir)
        model = CompiledModel(fn, plan.module, plan.cfg, name=plan.name, strategy="jit", jit_restore=self.restore)
        if not plan.cfg.enable:  # eager by choice has nothing to warm: its boot is load + serve
            return Prepared(model, "jit", jit_restore=self.restore)
        examples = plan.warmup_examples()
        if not examples:
            log.warning("part %r declares no warm-up examples: nothing is compiled at boot, and every shape is new "
                        "(on_new_shape=%r)", plan.name, plan.cfg.on_new_shape)
        warmup, why_first_call = model.warm_up(examples)
        return Prepared(model, "jit", warmup, why_eager or why_first_call, self.restore)


def chain(cfg: CompileConfig) -> list[Strategy]:
    """The strategies a part tries, in order."""
    if cfg.enable and cfg.strategy == "export":
        return [ExportStrategy(), JitStrategy("dir")]  # jit_restore is the jit strategy's setting, not its fallback's
    return [JitStrategy(cfg.jit_restore)]


def prepare(plan: Plan, cache_dir: Path) -> Prepared:
    """The first strategy of the part's chain that can serve it (the last one, jit, always can)."""
    for strategy in chain(plan.cfg):
        prepared = strategy.prepare(plan, cache_dir)
        if prepared is not None:
            return prepared
    raise AssertionError("the jit strategy always serves")  # pragma: no cover - JitStrategy.prepare never returns None
