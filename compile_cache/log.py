"""One library logger, ``compile_cache``. The lifecycle attaches two handlers: stderr (Cog shows it in setup.logs)
and a file, because the runtime drops a worker's output once it has asked the worker to stop (docs/cog-runtime.md)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

__all__ = ["log", "configure"]

log = logging.getLogger("compile_cache")
_FMT = "%(asctime)s %(levelname)s compile_cache: %(message)s"


def configure(log_file: Path | None) -> None:
    """Idempotent: (re)attach the stderr and file handlers this process should have."""
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        if getattr(h, "_compile_cache", False):
            log.removeHandler(h)
            h.close()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
        except OSError as e:  # a read-only disk must not fail a boot
            print(f"compile_cache: cannot write log file {log_file}: {e}", file=sys.stderr)
    for h in handlers:
        h.setFormatter(logging.Formatter(_FMT))
        h._compile_cache = True  # type: ignore[attr-defined]
        log.addHandler(h)
