"""The setup/shutdown lifecycle of a compiled Cog runner. Reads top to bottom:

    setup():  settings -> load() (the parts) -> key -> restore -> each part: its strategy prepares it
              -> background upload -> exit flush registered
    exit:     atexit (and, where they would kill the worker, SIGTERM/SIGINT) -> one bounded flush -> metrics file

Under ``on_miss="serve"`` a part the restored entry does not cover serves eager instead of being prepared, and
setup returns; a background build brings it to compiled and swaps it in (compile_cache/serve.py, docs/fleet.md).

A cache problem (store down, corrupt, foreign, tampered) never fails a boot: it is logged and costs a cold compile.
A part that fails to compile falls back alone (export -> jit -> eager); the others stay compiled.
A bad setting does fail the boot, at once, with a message naming the variable: it would not fix itself.
"""

from __future__ import annotations

import atexit
import functools
import inspect
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from cog import BasePredictor, BaseRunner

from . import isa as cpu_isa
from . import log as logmod
from .background import ChildBuild
from .batching import attach as attach_batching
from .batching import prediction_scopes
from .compiler import CompiledModel, Example, cache_roots, counts
from .config import CompileConfig, Settings
from .entry import Entry
from .export import ExportSpec
from .factors import environment_factors, runner_factors
from .fleet import Coordination, begin, coordinate
from .key import CacheKey
from .lineage import restore_or_seed
from .metrics import BootMetrics, part_metrics
from .parts import SINGLE_PART, Part, Parts, check_name
from .restore import RestoreOptions, restore
from .serve import BackgroundServe, Swappable, covered_parts, served_as
from .stores import open_store
from .stores.base import Store
from .strategies import Plan, prepare
from .trust import trust_policy
from .upload import Uploader, UploadResult
from .versions import ModelVersion, identify

__all__ = ["CompiledRunner", "CompiledPredictor", "Example", "Part"]

log = logmod.log

# coglet 0.23.1 can close a worker's setup.logs before the last lines setup() wrote have reached it: they then show
# in the server's own log only, after "Setup complete, now accepting requests" (scripts/repro_setup_logs.py, a plain
# BaseRunner without torch, loses the last line in some boots without a pause and in none with it: docs/runner.md).
# The setup timeline is written last, so setup() pauses this long before returning, inside the Cog worker only.
SETUP_LOG_GRACE_S = 0.1


class CompiledRunner(BaseRunner):
    """Subclass it; write ``load()`` and ``run()``; call ``self.model(...)`` (one part) or ``self.parts[name](...)``.

    ``load()`` returns the module to compile (one part, named ``"model"``: ``warmup_examples()`` and
    ``export_spec()`` describe it) or ``{name: Part(module, examples=..., export_spec=..., **config)}``.
    Class attributes declare the rest: ``compile_config`` (what to compile and how; each part may override any
    field), ``model_version`` (the version's label) and ``model_name`` (its lineage): docs/versions.md.
    """

    compile_config: ClassVar[CompileConfig] = CompileConfig()
    model_version: ClassVar[str | None] = None
    model_name: ClassVar[str | None] = None
    weights_dir: ClassVar[str | None] = "weights"
    requirements_files: ClassVar[tuple[str, ...]] = ("requirements.txt", "cog.yaml")

    # -- the user's hooks -------------------------------------------------------------------------------------------
    def load(self, weights: Any = None) -> Callable[..., Any] | Mapping[str, Part]:
        """Return the model (an nn.Module or any callable) to compile, or ``{name: Part}``. ``weights`` is Cog's
        COG_WEIGHTS or None."""
        raise NotImplementedError(f"{type(self).__name__} must implement load()")

    def warmup_examples(self) -> Sequence[Example]:
        """One part: example inputs covering every input shape requests will have; warm-up compiles them all."""
        raise NotImplementedError(f"{type(self).__name__} must implement warmup_examples()")

    def export_spec(self) -> ExportSpec:
        """One part, ``strategy="export"``: example inputs and the dynamic dims (min/max) one package serves. Called
        after ``load()``; the spec is part of the cache key."""
        raise NotImplementedError(f"{type(self).__name__} must implement export_spec() for strategy='export'")

    def identify_version(self, settings: Settings, plans: Sequence[Plan]) -> ModelVersion:
        """The key's model part (what compiles: local source, pinned requirements, weights by structure; weight
        values too where a part's config bakes them), the version's label and its lineage (docs/versions.md).
        Relative paths are resolved against the runner file's directory (the project dir), not the current
        directory, so ``python -m compile_cache warm`` run from elsewhere derives the same key as production."""
        code = Path(inspect.getfile(type(self))).resolve()
        return identify(
            predictor_file=code,
            weights_dir=code.parent / self.weights_dir if self.weights_dir else None,
            requirements_files=[code.parent / f for f in self.requirements_files],
            label=settings.model_version or self.model_version,
            lineage=settings.model_name or self.model_name,
            predictor_class=type(self).__name__,
            weight_values=any(plan.cfg.bakes_weights() for plan in plans),
            key_by_version=settings.key_by_version,
        )

    # -- setup -----------------------------------------------------------------------------------------------------
    def setup(self, weights: Any = None) -> None:  # noqa: D102 - documented in the module docstring
        t_start = time.monotonic()
        settings = Settings.from_env()  # a bad value raises here: fail fast
        self.settings, self.cfg = settings, self.compile_config.with_overrides(settings)
        # Nothing of Inductor starts before the restore: its CPU ISA probe builds programs the entry holds (slower into
        # an empty cache dir than with them there: scripts/isa_probe.py), and importing Inductor from a thread while
        # load() imports the model's packages breaks torch._dynamo's circular imports ("partially initialized
        # module", seen with transformers' BertModel). The compile step pays both, once per process.
        roots = cache_roots()
        logmod.configure(settings.log_file or roots["inductor"] / "compile_cache" / "log.txt")
        m = self.metrics = BootMetrics()
        self._metrics_lock = threading.Lock()

        # 1. load: the parts, each with its own config
        t = time.monotonic()
        loaded = self.load(weights)
        plans = self._resolve_parts(loaded, settings)
        m.load_s = time.monotonic() - t

        # 2. key: what compiles (not weight values, not the version's label: docs/versions.md), one for every part
        self.version = version = self.identify_version(settings, plans)
        factors = environment_factors(runner_factors(plans, single=self._single))
        self.key = key = CacheKey(version.part, factors, lineage=version.lineage)
        m.key, m.key_s, m.version, m.lineage = key.name, version.seconds, version.label, version.lineage
        for plan in plans:
            plan.stem = key.name if self._single else f"{key.name}-{plan.name}"

        # 3. restore (under "serve", what the entry does not cover is left pending: self._pending)
        self.uploader = self._restore(settings, key, roots, plans)
        pending = self._pending

        # 4. compile: each part by its own strategy, falling back alone. Jit parts build C++ kernels for the CPU ISA
        # Inductor picks: the entry's recorded decision is replayed where this CPU confirms it (compile_cache/isa.py)
        t = time.monotonic()
        now = [p for p in plans if p.name not in pending]
        isa = cpu_isa.begin(roots["inductor"]) if any(cpu_isa.needed_by(p.cfg) for p in now) else None
        if pending:  # the swap-in imports them later, beside requests: here, in setup's thread (serve.py)
            export = [p.cfg.strategy == "export" for p in pending.values()]
            cpu_isa.import_inductor(jit=not all(export), packages=any(export))
        before = counts()
        for plan in plans:
            plan.seeded = m.cache == "seeded"
            if plan.seeded and m.seeded_from:
                plan.seed_stem = m.seeded_from if self._single else f"{m.seeded_from}-{plan.name}"
        with self.fleet.building(settings.flush_budget_s):  # under a build lease: renewed while this runs
            served = {plan.name: self._serve_eager(plan) if plan.name in pending
                      else self._prepare(plan, roots["inductor"], isa) for plan in plans}
        if isa is not None:
            isa.end()  # records a decision Inductor probed, before the upload scans the cache dir
            m.isa = isa.metrics()
        m.compile_s = time.monotonic() - t
        self._record_counts(before)
        strategies = {p["strategy"] for p in m.parts.values()}
        m.strategy = strategies.pop() if len(strategies) == 1 else "mixed"
        for name, model in served.items():
            model.on_request = functools.partial(self._on_request, name)
            model.serve()  # from now on a new shape gets the part's on_new_shape
        self._swappables = {name: Swappable(served[name]) for name in pending}
        served.update(self._swappables)
        self.parts = Parts(served)
        self._batchers = attach_batching(plans, served, self._write_metrics)  # each part with cfg.batch: .batched
        for name, b in self._batchers.items():
            m.parts[name]["batch"] = b.stats.to_dict()
        if self._single:
            self.model = served[SINGLE_PART]

        # 5. upload what is new, in the background; flush the rest at exit (under "serve", the build publishes)
        compiled = {p.name: served_as(m.parts[p.name]["strategy"], m.parts[p.name]["jit_restore"]) for p in now
                    if p.cfg.enable and not m.parts[p.name]["eager_fallback"]}
        if self.uploader is not None and not compiled:
            # Nothing compiled: whatever the cache dir gained (Inductor's own probing, if a failed compile got that
            # far) is not worth an entry that would make the next boot a "hit" on nothing.
            log.info("no part compiled: nothing uploaded")
            self.uploader = None
            self.fleet.failed(f"no part compiled: {m.eager_fallback}")
        m.total_s = m.ready_s = time.monotonic() - t_start
        m.built_here = bool(compiled) and m.cache != "hit"
        if self.uploader is not None:
            m.upload_state = "running"
            self.uploader.parts = compiled  # the manifest lists the parts it covers
        if not pending:
            m.compiled_s = m.total_s
        log.info("\n%s", m.timeline())
        m.write(settings.metrics_file)  # before the threads start: from then on, only _write_metrics writes
        if self.uploader is not None:
            self._start_background_upload(settings.upload_interval_s)
        if pending:
            self._background = self._background_build(settings, roots["inductor"], t_start)
            self._background.start()
        if self.uploader is not None or pending or self._batchers:  # batching: its metrics are written at exit
            self._register_exit_flush()
        self._hand_setup_logs_to_the_runtime()

    # -- pieces of setup -------------------------------------------------------------------------------------------
    def _resolve_parts(self, loaded: Any, settings: Settings) -> list[Plan]:
        """The parts ``load()`` declared, each with its effective config: the runner's, the part's overrides, then
        the environment's. An export part without a usable spec falls back to jit here, before the key."""
        self._single = not isinstance(loaded, Mapping)
        if self._single:
            parts: dict[str, Part] = {SINGLE_PART: Part(loaded)}
        else:
            if not loaded:
                raise ValueError(f"{type(self).__name__}.load() returned no parts")
            parts = {}
            for name, part in loaded.items():
                if not isinstance(part, Part):
                    raise TypeError(f"{type(self).__name__}.load(): part {name!r} is a {type(part).__name__}, "
                                    "not a Part(module, examples=..., ...)")
                parts[check_name(name)] = part
        plans = []
        for name, part in parts.items():
            cfg = part.config(self.compile_config, name).with_overrides(settings)
            plan = Plan(name, part.module, cfg,
                        examples=self.warmup_examples if self._single else functools.partial(list, part.examples))
            if cfg.enable and cfg.strategy == "export":
                try:
                    plan.spec = self.export_spec() if self._single else part.export_spec
                    if not isinstance(plan.spec, ExportSpec):
                        raise TypeError(f"expected an ExportSpec, got {type(plan.spec).__name__}")
                except Exception as e:  # no spec, or a bad one: the jit strategy still serves
                    log.warning("part %r: export strategy unavailable (%s: %s): falling back to jit", name,
                                type(e).__name__, e)
                    plan.cfg, plan.spec = cfg.model_copy(update={"strategy": "jit"}), None
            plans.append(plan)
        return plans

    def _restore(self, settings: Settings, key: CacheKey, roots: dict[str, Path], plans: list[Plan]) -> Uploader | None:
        """One restore for every part; returns the uploader of this entry, or None when there is no store. A miss
        names the nearest entries and what differs, and seeds from the newest entry of the same lineage and
        environment unless COMPILE_CACHE_KEY_BY_VERSION asks for a fresh compile (docs/versions.md).

        Parts under ``on_miss="serve"`` that the entry does not cover go into ``self._pending``: the build lease is
        only taken (fleet.begin) and settled in the background, and no uploader is returned (the build publishes)."""
        m = self.metrics
        self.fleet, self._pending = Coordination(), {}
        serve = [p for p in plans if p.cfg.enable and p.cfg.on_miss == "serve"]
        store = self._open_store(settings)
        if store is None:
            m.store = "(disabled)"
            if serve:
                log.warning("on_miss=serve needs a store to build into: compiling in setup")
            return None
        m.store = store.url
        trust = trust_policy(settings, store)  # which entries may load; warns if nothing verifies a shared store
        entry = Entry(store, key.name, roots, key.factors, trust, self.version.lineage, self.version.factors)
        options = RestoreOptions.from_settings(settings)
        r = restore_or_seed(entry, options, seed=not settings.key_by_version)
        covered = covered_parts(r.status, r.manifest.parts if r.manifest is not None else None, [p.name for p in plans])
        if r.status == "error":  # a store that cannot be read now cannot publish a build either: compile here
            serve = []
        self._pending = {p.name: p for p in serve if p.name not in covered}
        self._restore_entry = functools.partial(restore, entry, options)
        # A boot that compiles nothing (COMPILE_CACHE_COMPILE=0) builds nothing: no lease
        missed = r.status in ("miss", "seeded") and settings.build_lease and any(p.cfg.enable for p in plans)
        if self._pending and missed:  # one replica builds, in the background: docs/fleet.md
            self.fleet = begin(store, key.name, trust, ttl_s=settings.lease_ttl_s)
        elif missed:  # one replica builds, the others wait for its entry: docs/fleet.md
            self.fleet = coordinate(store, key.name, trust, ttl_s=settings.lease_ttl_s, wait_s=settings.lease_wait_s,
                                    restore_entry=self._restore_entry)
            r = self.fleet.outcome(r)
        m.cache, m.cache_reason, m.restore_s, m.seeded_from = r.status, r.reason, r.seconds, r.seeded_from
        m.bytes_downloaded, m.files_restored, m.restore_mb_s = r.bytes_downloaded, r.files, r.throughput_mb_s
        self.fleet.record(m)
        if r.status in ("error", "rejected"):
            log.warning("cache %s: %s; booting cold", r.status.upper(), r.reason)
        if self._pending:
            doing = (f"following the build of {self.fleet.holder}" if self.fleet.role == "followed"
                     else "building in the background")
            names = "" if self._single else f" {', '.join(self._pending)}"
            note = f"serving{names} eager; {doing}"
            m.cache_reason = f"{m.cache_reason}; {note}" if m.cache_reason else note
            return None
        return Uploader.after_restore(r, entry, self.version.label)

    def _serve_eager(self, plan: Plan) -> CompiledModel:
        """A part whose build is pending: its eager model, until the background swaps the compiled one in."""
        jit_restore = plan.cfg.jit_restore if plan.cfg.strategy == "jit" else ""
        self.metrics.parts[plan.name] = {**part_metrics(plan.cfg.strategy, jit_restore), "build_pending": True}
        return CompiledModel(plan.module, plan.module, plan.cfg, name=plan.name, strategy=plan.cfg.strategy,
                             jit_restore=plan.cfg.jit_restore)

    def _background_build(self, settings: Settings, cache_dir: Path, t_start: float) -> BackgroundServe:
        cls = type(self)
        target = f"{inspect.getfile(cls)}:{cls.__name__}"  # the child loads it as the runtime loaded it here
        log_dir = (settings.log_file or cache_dir / "compile_cache" / "log.txt").parent
        pending = {n: (plan, self._swappables[n]) for n, plan in self._pending.items()}
        return BackgroundServe(self, pending, self.fleet, self._restore_entry,
                               child=lambda: ChildBuild(target, dict(os.environ), log_dir / "background-build.log"),
                               wait_s=settings.lease_wait_s, cache_dir=cache_dir, t_start=t_start)

    def _background_done(self, bg: BackgroundServe, why: str) -> None:
        """The background is over: every pending part is swapped in, or stays eager (``why``). Counted as compiled
        either way (``compiled_s``): no part waits for a build any more."""
        c = self.fleet
        with self._metrics_lock:
            m = self.metrics
            m.compiled_s = time.monotonic() - bg.t_start
            m.built_here = bg.built_here and bg.build is not None and bg.build.state == "done"
            m.background_build = bg.build.to_dict() if bg.build is not None else {}
            if m.background_build:  # beside the child's peak: the two copies of the weights docs/fleet.md sizes
                m.background_build["serving_peak_rss_mb"] = round(
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            m.lease, m.lease_holder, m.lease_wait_s, m.lease_polls = c.role, c.holder, c.waited_s, c.polls
            if c.note and c.note not in m.cache_reason:  # what the lease came to: followed, taken over, ...
                m.cache_reason = f"{m.cache_reason}; {c.note}" if m.cache_reason else c.note
            for name, (_, sw) in bg.pending.items():
                part = m.parts[name]
                part["build_pending"] = False
                if sw.swapped_at_s is None:
                    sw.settle()
                    if why and not part["eager_fallback"]:
                        part["eager_fallback"] = f"no compiled build: {why}"
            if why:
                m.eager_fallback = "; ".join(x for x in (m.eager_fallback, why) if x)
        if why:
            log.warning("serving EAGER (predictions stay correct, only slower): %s", why)
        log.info("compile_cache: no part waits for a build any more (%.2f s after setup started)", m.compiled_s)
        self._write_metrics()

    def _prepare(self, plan: Plan, cache_dir: Path, isa: cpu_isa.IsaStep | None = None) -> Any:
        """One part through its strategies; its own metrics (counts are this part's: parts compile one by one)."""
        t, before = time.monotonic(), counts()
        p = prepare(plan, cache_dir)
        c = counts() - before
        seconds, split = time.monotonic() - t, None
        if isa is not None and p.strategy == "jit" and plan.cfg.enable:  # import, ISA, load, first calls
            first = not any("import_s" in x for x in self.metrics.parts.values())
            split = isa.split(t, t + seconds, p.model.first_calls, first=first)
            seconds = sum(split.values())  # the first part's import and ISA ran before it, in the compile step
        why_eager = p.why_eager if plan.cfg.enable else ""
        if why_eager:
            log.warning("part %r: serving EAGER (predictions stay correct, only slower): %s", plan.name, why_eager)
        m = self.metrics
        m.parts[plan.name] = {
            **part_metrics(p.strategy, p.jit_restore, compile_s=seconds, fxgraph_hits=c.fxgraph_hits,
                           fxgraph_misses=c.fxgraph_misses, eager_fallback=why_eager),
            **(split or {}),
        }
        pc = getattr(p.model.fn, "precompiled_counts", None)
        if pc is not None:  # jit_restore="precompile": what served this part's warm-up
            m.parts[plan.name]["precompiled"] = pc()
        m.warmup += [{"part": plan.name, **w} for w in p.warmup]
        if why_eager:
            m.eager_fallback = "; ".join(x for x in (m.eager_fallback, why_eager if self._single
                                                     else f"{plan.name}: {why_eager}") if x)
        return p.model

    def _open_store(self, settings: Settings) -> Store | None:
        if settings.disable:
            self.metrics.cache = "disabled"
            return None
        try:
            return open_store(settings.url, settings)
        except Exception as e:  # e.g. boto3 missing or a malformed endpoint: a cache problem, not a boot failure
            log.warning("cache ERROR: cannot open store %s: %s; booting cold", settings.url.split("?")[0], e)
            self.metrics.cache, self.metrics.cache_reason = "error", str(e)
            return None

    def _record_counts(self, before: Any, *, add: bool = False) -> None:
        """The counts since ``before`` into the metrics (``add``: on top of those there, for a later swap-in)."""
        c = counts() - before
        m = self.metrics
        for name in ("fxgraph_hits", "fxgraph_misses", "aotautograd_hits", "aotautograd_misses", "compiles",
                     "graph_breaks"):
            setattr(m, name, getattr(c, name) + (getattr(m, name) if add else 0))

    def _on_request(self, part: str, event: str, shape: str, n: int) -> None:
        """A part compiled (``event="compile"``) or served uncompiled (``"eager"``) a shape nobody declared: count it
        in the metrics (the part's and the sums) and on the prediction."""
        key = "request_path_compiles" if event == "compile" else "request_path_eager_calls"
        with self._metrics_lock:
            m = self.metrics
            m.parts[part][key] += n
            setattr(m, key, getattr(m, key) + n)
        try:
            for scope in prediction_scopes():  # a batched call's: every prediction of its batch
                scope.record_metric(key, n, mode="incr")
                scope.record_metric("request_compile_shape" if event == "compile" else "request_eager_shape", shape)
        except Exception:  # outside the Cog runtime (tests, CLI) there is no scope worth failing for
            log.debug("could not record the request-path metric", exc_info=True)

    def _hand_setup_logs_to_the_runtime(self) -> None:
        """Flush our log handlers and, inside the Cog worker, pause ``SETUP_LOG_GRACE_S`` so the runtime collects
        the timeline before it closes setup.logs (see SETUP_LOG_GRACE_S: the runtime's race, not ours)."""
        for h in log.handlers:
            h.flush()
        sys.stderr.flush()
        try:
            import coglet

            in_worker = bool(coglet.server.active)
        except Exception:  # no coglet (a CLI run, an older cog): nobody collects setup logs
            in_worker = False
        if in_worker:
            time.sleep(SETUP_LOG_GRACE_S)

    # -- uploads ---------------------------------------------------------------------------------------------------
    def _upload(self, deadline: float | None = None, lock_timeout: float = -1) -> UploadResult | None:
        assert self.uploader is not None
        r = self.uploader.upload(deadline, lock_timeout)
        if r is None:
            # The background upload still holds the lock (a slow store): it stops at the flush deadline between
            # segments. What it has published is in the uploader's totals.
            log.warning("an upload is still running and the flush budget is spent: leaving it")
        elif r.error:
            log.warning("upload ERROR (the cache entry stays as it was): %s", r.error)
        elif r.files:
            log.info(
                "uploaded %d file(s) in %d segment(s), %.1f MB in %.2fs",
                r.files,
                r.segments,
                r.bytes_uploaded / 1e6,
                r.seconds,
            )
        self._write_metrics(r)
        return r

    def _write_metrics(self, r: Any = None, *, flushed: bool = False) -> None:
        """Fold an upload's result (with an uploader) and the swaps into the metrics and rewrite the file. One lock
        around update and write: the background threads and the exit flush all call this, and the file must end
        with the latest state."""
        with self._metrics_lock:
            m = self.metrics
            if self.uploader is not None:
                tot = self.uploader.total
                m.bytes_uploaded, m.files_uploaded, m.upload_s = tot.bytes_uploaded, tot.files, tot.seconds
                if r is None:
                    m.upload_state = "partial" if m.upload_state == "running" else m.upload_state
                else:
                    m.upload_state = "error" if r.error else ("done" if r.complete else "partial")
                    m.upload_error = r.error
            bg = getattr(self, "_background", None)
            if bg is not None and bg.proc is not None:
                m.background_build = {**m.background_build, **bg.proc.result.to_dict()}
            for name, b in getattr(self, "_batchers", {}).items():
                m.parts[name]["batch"] = b.stats.to_dict()
            for name, sw in getattr(self, "_swappables", {}).items():
                m.parts[name]["swapped_at_s"], m.parts[name]["eager_calls_before_swap"] = sw.swapped_at_s, sw.eager_calls
            m.flushed_at_exit = m.flushed_at_exit or flushed
            m.write(self.settings.metrics_file)

    # -- public controls for tools (CLI warm, bench, tests) --------------------------------------------------------
    def wait_until_compiled(self, timeout: float | None = None) -> bool:
        """Block until no part waits for a background build (``on_miss="serve"``): True, or False after
        ``timeout`` seconds. True at once where nothing was pending."""
        bg = getattr(self, "_background", None)
        return True if bg is None else bg.done.wait(timeout)

    def wait_for_upload(self, timeout: float | None = None) -> bool:
        """Block until the first background upload is done (True), or ``timeout`` seconds passed (False)."""
        done = getattr(self, "_first_upload", None)
        return True if done is None else done.wait(timeout)

    def finish_uploads(self) -> None:
        """Stop periodic uploads, wait for the background upload, then run the exit flush now (once)."""
        if getattr(self, "uploader", None) is None:
            return
        self._stop.set()
        self.wait_for_upload()
        self._flush("finish_uploads")

    def _start_background_upload(self, interval_s: float) -> None:
        self._stop = threading.Event()
        self._first_upload = threading.Event()

        def loop() -> None:
            try:
                r = self._upload()
                if r is not None:  # the entry is published: a build lease this boot holds is done
                    self.fleet.published(r.error, r.complete)
            finally:
                self._first_upload.set()
            while interval_s > 0 and not self._stop.wait(interval_s):
                self._upload()

        # A daemon thread keeps running while the interpreter shuts down (the exit flush then stops it at its
        # deadline), and it never delays READY.
        self._bg = threading.Thread(target=loop, name="compile-cache-upload", daemon=True)
        self._bg.start()

    def _register_exit_flush(self) -> None:
        self._flushed = threading.Lock()
        atexit.register(self._flush, "exit")
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for sig in (signal.SIGTERM, signal.SIGINT):
            current = signal.getsignal(sig)
            # Only where the current disposition would kill the worker; "ignored" (Replicate's
            # --await-explicit-shutdown) and user handlers stay as they are.
            if current in (signal.SIG_DFL, signal.default_int_handler):
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Flush and *return*: exiting or raising here wedges coglet's teardown until it SIGKILLs the worker (10 s).
        self._flush(signal.Signals(signum).name)

    def _flush(self, why: str) -> None:
        """The exit flush: once, within COMPILE_CACHE_FLUSH_BUDGET_S, never raising into the runtime."""
        if not self._flushed.acquire(blocking=False):
            return
        try:
            budget = self.settings.flush_budget_s
            deadline = time.monotonic() + budget
            log.info("exit flush (%s): budget %.1fs", why, budget)
            # A build stopped before it published: followers take over at once. First, and with a share of the
            # budget at most, so that the upload keeps the rest and a slow store cannot hold the exit. A background
            # build (serve) is killed: nothing half-built is published.
            share = min(deadline, time.monotonic() + budget / 4)
            if getattr(self, "_background", None) is not None:
                self._background.stop(share)
            self.fleet.release(share)
            if self.uploader is None:
                self._write_metrics(flushed=True)
                return
            self._stop.set()
            self.uploader.deadline = deadline  # the background upload, if still running, stops at it too
            r = self.uploader.upload(deadline, lock_timeout=max(0.0, deadline - time.monotonic()))
            if r is None:
                log.warning("an upload is still running and the flush budget is spent: leaving it")
            elif r.error:
                log.warning("upload ERROR (the cache entry stays as it was): %s", r.error)
            self._write_metrics(r, flushed=True)
            log.info(
                "exit flush done: state=%s, %d bytes uploaded in total",
                self.metrics.upload_state,
                self.metrics.bytes_uploaded,
            )
        except BaseException as e:  # noqa: BLE001 - nothing may escape into the runtime's teardown
            try:
                log.error("exit flush failed: %s: %s", type(e).__name__, e)
            except Exception:
                pass


class CompiledPredictor(CompiledRunner, BasePredictor):
    """The older spelling: a ``predict()`` subclass of this keeps working (Cog runs ``predict()`` through
    ``run()``, and logs its own deprecation warnings for ``BasePredictor`` and ``predict()``). New code: subclass
    :class:`CompiledRunner` and write ``run()``."""
