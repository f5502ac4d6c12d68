"""The setup/shutdown lifecycle of a compiled Cog predictor. Reads top to bottom:

    setup():  settings → key → restore → load → compile + warm-up → background upload → exit flush registered
    exit:     atexit (and, where they would kill the worker, SIGTERM/SIGINT) → one bounded flush → metrics file

A cache problem (store down, corrupt, foreign, tampered) never fails a boot: it is logged and costs a cold compile.
A bad setting does fail the boot, at once, with a message naming the variable: it would not fix itself.
"""

from __future__ import annotations

import atexit
import inspect
import json
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from cog import BasePredictor

from . import log as logmod
from .compiler import CompiledModel, Example, cache_roots, compile_model, counts, describe_args
from .config import CompileConfig, Settings
from .export import ExportSpec
from .key import CacheKey, environment_factors
from .metrics import BootMetrics
from .stores import open_store
from .stores.base import Store
from .sync import Uploader, restore_or_seed
from .versions import ModelVersion, identify

__all__ = ["CompiledPredictor", "Example"]

log = logmod.log


class CompiledPredictor(BasePredictor):
    """Subclass it; write ``load()``, ``warmup_examples()`` and ``predict()``; call ``self.model(...)`` in predict.

    Class attributes declare the rest: ``compile_config`` (what to compile and how), ``model_version`` (the
    version's label) and ``model_name`` (its lineage); docs/versions.md.
    """

    compile_config: ClassVar[CompileConfig] = CompileConfig()
    model_version: ClassVar[str | None] = None
    model_name: ClassVar[str | None] = None
    weights_dir: ClassVar[str | None] = "weights"
    requirements_files: ClassVar[tuple[str, ...]] = ("requirements.txt", "cog.yaml")

    # -- the user's hooks -------------------------------------------------------------------------------------------
    def load(self, weights: Any = None) -> Callable[..., Any]:
        """Return the model (an nn.Module or any callable) to compile. ``weights`` is Cog's COG_WEIGHTS or None."""
        raise NotImplementedError(f"{type(self).__name__} must implement load()")

    def warmup_examples(self) -> Sequence[Example]:
        """Example inputs covering every input shape requests will have: warm-up compiles them all at boot."""
        raise NotImplementedError(f"{type(self).__name__} must implement warmup_examples()")

    def export_spec(self) -> ExportSpec:
        """For ``strategy="export"``: example inputs and the dynamic dims (min/max) one package serves. Called
        before ``load()`` (the spec is part of the cache key), so build it from shapes, not from the model."""
        raise NotImplementedError(f"{type(self).__name__} must implement export_spec() for strategy='export'")

    def identify_version(self, settings: Settings, cfg: CompileConfig) -> ModelVersion:
        """The key's model part (what compiles: local source, pinned requirements, weights by structure), the
        version's label and its lineage (versions.py, docs/versions.md). Relative paths are resolved against the
        predictor file's directory (the project dir), not the current directory, so ``python -m compile_cache
        warm`` run from elsewhere derives the same key as production."""
        code = Path(inspect.getfile(type(self))).resolve()
        return identify(
            predictor_file=code,
            weights_dir=code.parent / self.weights_dir if self.weights_dir else None,
            requirements_files=[code.parent / f for f in self.requirements_files],
            label=settings.model_version or self.model_version,
            lineage=settings.model_name or self.model_name,
            predictor_class=type(self).__name__,
            weight_values=cfg.bakes_weights(),
            key_by_version=settings.key_by_version,
        )

    # -- setup -----------------------------------------------------------------------------------------------------
    def setup(self, weights: Any = None) -> None:  # noqa: D102 - documented in the module docstring
        t_start = time.monotonic()
        settings = Settings.from_env()  # a bad value raises here: fail fast
        cfg = self.compile_config.with_overrides(settings)
        roots = cache_roots()
        logmod.configure(settings.log_file or roots["inductor"] / "compile_cache" / "log.txt")
        self.settings, self.cfg = settings, cfg
        m = self.metrics = BootMetrics(strategy=cfg.strategy)
        factors = cfg.cache_factors()
        self._spec: ExportSpec | None = None
        if cfg.enable and cfg.strategy == "export":
            try:
                self._spec = self.export_spec()
                factors["export.spec"] = json.dumps(self._spec.describe(), sort_keys=True)
            except Exception as e:  # no spec, or a bad one: the JIT strategy still serves
                log.warning("export strategy unavailable (%s: %s): falling back to jit", type(e).__name__, e)
                cfg = self.cfg = cfg.model_copy(update={"strategy": "jit"})
                factors = cfg.cache_factors()
                m.strategy = "jit"
        # -- versions (docs/versions.md): the key hashes what compiles; the label and lineage ride along
        self.version = version = self.identify_version(settings, cfg)
        self.key = key = CacheKey(version.part, environment_factors(factors), lineage=version.lineage)
        m.key, m.key_s, m.version, m.lineage = key.name, version.seconds, version.label, version.lineage
        # -- end versions

        # 1. restore
        store = self._open_store(settings)
        if store is not None:
            m.store = store.url
            # A miss names the nearest entries and what differs; it seeds from the newest entry of the same lineage
            # and environment unless COMPILE_CACHE_KEY_BY_VERSION asks for a fresh compile (docs/versions.md).
            r = restore_or_seed(
                store,
                key.name,
                roots,
                factors=key.factors,
                lineage=version.lineage,
                model_factors=version.factors,
                seed=not settings.key_by_version,
                signing_key=settings.signing_key_bytes,
                require_signed=settings.require_signed,
                timeout_s=settings.restore_timeout_s,
                max_bytes=settings.max_restore_bytes,
                max_files=settings.max_restore_files,
            )
            m.cache, m.cache_reason, m.restore_s, m.seeded_from = r.status, r.reason, r.seconds, r.seeded_from
            m.bytes_downloaded, m.files_restored, m.restore_mb_s = r.bytes_downloaded, r.files, r.throughput_mb_s
            if r.status in ("error", "rejected"):
                log.warning("cache %s: %s; booting cold", r.status.upper(), r.reason)
            self.uploader: Uploader | None = Uploader(
                store,
                key.name,
                roots,
                version.label,
                key.factors,
                signing_key=settings.signing_key_bytes,
                lineage=version.lineage,
                model_factors=version.factors,
                **r.uploader_state(),  # type: ignore[arg-type]
            )
        else:
            m.store, self.uploader = "(disabled)", None

        # 2. load
        t = time.monotonic()
        eager = self.load(weights)
        m.load_s = time.monotonic() - t

        # 3. compile + warm-up
        t = time.monotonic()
        before = counts()
        exported = self._export_strategy(eager, roots["inductor"], key) if self._spec is not None else None
        if exported is not None:  # export: a package, no Dynamo; one artifact for every shape inside the dims
            self.model, why_eager = exported, ""
        else:
            m.strategy = "jit"
            fn, why_eager = compile_model(eager, cfg)
            # -- jit_restore="precompile" (issue #6, docs/restore-strategies.md): per-shape precompiled functions in
            # the cache dir serve the calls they accept; any other call still goes through `fn` (the dir snapshot).
            if cfg.jit_restore == "precompile" and not why_eager:
                from .precompile import Precompiled

                fn = Precompiled(eager, fn, cfg, roots["inductor"] / "precompile" / key.name)
            # -- end jit_restore
            self.model = CompiledModel(fn, eager, cfg)
            if cfg.enable:  # eager by choice has nothing to warm: its boot is load + serve
                m.warmup, why_first_call = self.model.warm_up(self.warmup_examples())
                why_eager = why_eager or why_first_call
        if why_eager and cfg.enable:
            log.warning("serving EAGER (predictions stay correct, only slower): %s", why_eager)
        m.eager_fallback = why_eager if cfg.enable else ""
        m.compile_s = time.monotonic() - t
        self._record_counts(before)
        self.model.on_request_compile = self._on_request_compile

        # 4. upload what is new, in the background; flush the rest at exit
        m.total_s = time.monotonic() - t_start
        if self.uploader is not None:
            m.upload_state = "running"
        log.info("\n%s", m.timeline())
        m.write(settings.metrics_file)  # before the upload thread starts: from then on, only _write_metrics writes
        # The runtime reads the worker's output on its own thread and closes setup.logs when setup() returns; the
        # timeline, written last, was missing from them once in three full test runs here, with the upload
        # thread below competing for the CPU. Flush, and give the reader a moment before that thread starts.
        for h in log.handlers:
            h.flush()
        time.sleep(0.1)
        if self.uploader is not None:
            self._start_background_upload(settings.upload_interval_s)
            self._register_exit_flush()

    # -- pieces of setup -------------------------------------------------------------------------------------------
    def _export_strategy(self, eager: Any, cache_dir: Path, key: CacheKey) -> CompiledModel | None:
        """Load the AOTInductor package (restored from the store) or build it; None means "use jit".

        Fallbacks, each logged once: export fails → jit; a restored package fails to load or raises on its first
        call → rebuild once; a fresh build raises too → jit (whose own failure falls back to eager)."""
        from .export import ExportedModel, ExportError, adopt_equivalent_package, build_package, resolve_package

        assert self._spec is not None
        spec, m = self._spec, self.metrics
        own = cache_dir / "aoti" / f"{key.name}.pt2"
        pkg, program = Path(resolve_package(own)), None  # this key's package, or one its .ref proved equivalent
        # -- versions: a seeded version reuses a restored package only if it compiles the same exported program
        # (export.adopt_equivalent_package: one torch.export, no build); else it builds its own, and says so.
        if not pkg.exists() and m.cache == "seeded":
            try:
                found, program = adopt_equivalent_package(eager, spec, own)
            except ExportError:
                found = None  # the build below fails the same way and falls back
            if found is not None:
                pkg = Path(found)
                log.info("export: the seed's package %s compiles this version's program: reusing it", pkg.name)
            else:
                log.info("export: no restored package compiles this version's program; building one")
        # -- end versions
        for attempt in ("restored", "built"):
            if attempt == "built":
                pkg = own
                try:
                    info = build_package(eager, spec, pkg, keep_weights_out=True, program=program)
                    log.info("export: built %s (%.1f MB) in %.1fs", pkg.name, info["package_bytes"] / 1e6,
                             info["export_s"] + info["compile_s"])
                except ExportError as e:
                    log.warning("export FAILED (%s): falling back to the jit strategy", str(e).splitlines()[0])
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
                log.warning("the %s export package raised (%s: %s): %s", attempt, type(e).__name__,
                            str(e).splitlines()[0] if str(e) else "", what)
                own.unlink(missing_ok=True)  # never another key's package: a .ref goes instead
                Path(f"{own}.ref").unlink(missing_ok=True)
                continue
            m.warmup = [{"shape": f"package {attempt}, first call {describe_args(spec.example_args, {})}",
                         "s": round(time.monotonic() - t, 3)}]
            m.strategy = "export"
            return CompiledModel(model, eager, self.cfg)
        return None

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

    def _record_counts(self, before: Any) -> None:
        c = counts() - before
        m = self.metrics
        m.fxgraph_hits, m.fxgraph_misses = c.fxgraph_hits, c.fxgraph_misses
        m.aotautograd_hits, m.aotautograd_misses = c.aotautograd_hits, c.aotautograd_misses
        m.compiles, m.graph_breaks = c.compiles, c.graph_breaks

    def _on_request_compile(self, shape: str, n: int) -> None:
        self.metrics.request_path_compiles += n
        try:
            from cog import current_scope

            scope: Any = current_scope()
            scope.record_metric("request_path_compiles", n, mode="incr")
            scope.record_metric("request_compile_shape", shape)
        except Exception:  # outside the Cog runtime (tests, CLI) there is no scope worth failing for
            log.debug("could not record the request-compile metric", exc_info=True)

    # -- uploads ---------------------------------------------------------------------------------------------------
    def _upload(self, deadline: float | None = None, lock_timeout: float = -1) -> None:
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

    def _write_metrics(self, r: Any = None, *, flushed: bool = False) -> None:
        """Fold an upload's result into the metrics and rewrite the file. One lock around update and write: the
        background thread and the exit flush both call this, and the file must end with the latest state."""
        assert self.uploader is not None
        with self._metrics_lock:
            m, tot = self.metrics, self.uploader.total
            m.bytes_uploaded, m.files_uploaded, m.upload_s = tot.bytes_uploaded, tot.files, tot.seconds
            if r is None:
                m.upload_state = "partial" if m.upload_state == "running" else m.upload_state
            else:
                m.upload_state = "error" if r.error else ("done" if r.complete else "partial")
                m.upload_error = r.error
            m.flushed_at_exit = m.flushed_at_exit or flushed
            m.write(self.settings.metrics_file)

    # -- public controls for tools (CLI warm, bench, tests) --------------------------------------------------------
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
        self._metrics_lock = threading.Lock()
        self._first_upload = threading.Event()

        def loop() -> None:
            try:
                self._upload()
            finally:
                self._first_upload.set()
            while interval_s > 0 and not self._stop.wait(interval_s):
                self._upload()

        # A daemon thread started now keeps working during interpreter shutdown (FACTS §1), and never delays READY.
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
        # Flush and *return*: exiting or raising here wedges the runtime's teardown until its SIGKILL (FACTS §1).
        self._flush(signal.Signals(signum).name)

    def _flush(self, why: str) -> None:
        """The exit flush: once, within COMPILE_CACHE_FLUSH_BUDGET_S, never raising into the runtime."""
        if not self._flushed.acquire(blocking=False):
            return
        try:
            budget = self.settings.flush_budget_s
            deadline = time.monotonic() + budget
            assert self.uploader is not None
            self._stop.set()
            self.uploader.deadline = deadline  # the background upload, if still running, stops at it too
            log.info("exit flush (%s): budget %.1fs", why, budget)
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
