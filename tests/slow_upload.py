"""The tiny predictor with a throttled store, so a shutdown test decides where an upload is when the container stops.

Test-only. The plan comes from ``TINY_SLOW_STORE``, a JSON object (every key optional):

- ``hold_until_exit``: writes wait until the exit flush begins (atexit or signal), so the background upload cannot
  finish before the container is told to stop: the flush has to finish it.
- ``put_delay_s``: sleep before every object write (after the hold).
- ``segment_bytes``: pack segments of at most this many bytes of files (SEGMENT_MAX_UNPACKED_BYTES; by default the
  tiny entry would be one segment).
- ``stall_publishing`` + ``marker``: the first manifest write that would publish a file whose name contains this
  string touches ``marker`` and then blocks forever, leaving that file's segment object written but unpublished
  until the test SIGKILLs the worker (the test names what must be missing, not where the cut falls).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from compile_cache import segments
from compile_cache.config import Settings
from compile_cache.lease import is_lease_name
from compile_cache.manifest import Manifest
from compile_cache.stores.base import ObjectInfo, Progress, Store
from tests.tiny_predictor import Predictor

__all__ = ["SlowUploadPredictor", "ThrottledStore"]


class ThrottledStore(Store):
    """Delegates to ``inner``; only the entry's two writes are held, delayed or stalled as ``plan`` says."""

    def __init__(self, inner: Store, plan: dict[str, Any], exit_started: threading.Event) -> None:
        self.inner, self.url, self.plan, self.exit_started = inner, inner.url, plan, exit_started

    def _before_write(self) -> None:
        if self.plan.get("hold_until_exit"):
            self.exit_started.wait()

    def read_versioned(self, name: str, *, max_bytes: int | None = None) -> tuple[bytes, str]:
        return self.inner.read_versioned(name, max_bytes=max_bytes)

    def download(self, name: str, dest: Path, *, progress: Progress | None = None) -> int:
        return self.inner.download(name, dest, progress=progress)

    def put_immutable(self, name: str, src: Path) -> bool:
        self._before_write()
        time.sleep(float(self.plan.get("put_delay_s", 0)))
        return self.inner.put_immutable(name, src)

    def put_conditional(self, name: str, data: bytes, if_match: str | None) -> str:
        if is_lease_name(name):  # the plan throttles the upload; the build lease's writes go straight through
            return self.inner.put_conditional(name, data, if_match)
        self._before_write()
        needle = self.plan.get("stall_publishing")
        if needle and any(needle in f for f in Manifest.from_bytes(data).files()):
            Path(self.plan["marker"]).write_text(str(os.getpid()))
            threading.Event().wait()  # until the test kills the worker
        return self.inner.put_conditional(name, data, if_match)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def delete(self, name: str) -> None:
        self.inner.delete(name)


class SlowUploadPredictor(Predictor):
    def setup(self, weights: Any = None) -> None:
        self._plan = json.loads(os.environ.get("TINY_SLOW_STORE") or "{}")
        if self._plan.get("segment_bytes"):
            segments.SEGMENT_MAX_UNPACKED_BYTES = int(self._plan["segment_bytes"])  # this worker process only
        self._exit_started = threading.Event()
        super().setup(weights)

    def _open_store(self, settings: Settings) -> Store | None:
        store = super()._open_store(settings)
        return store and ThrottledStore(store, self._plan, self._exit_started)

    def _flush(self, why: str) -> None:
        self._exit_started.set()  # release held writes: from here on the flush (and its budget) is in charge
        super()._flush(why)
