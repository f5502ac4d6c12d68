"""Remembered export failures: a key whose export failed once goes straight to its fallback on later boots.

Exporting a model that does not export costs a warm boot almost as much as the cold one (torch.export, or the
AOTInductor build, runs and fails again every time). So a failure is written down, as a small JSON file next to
where the package would be (``<inductor cache dir>/aoti/<key>.failed.json`` for ``<key>.pt2``, and likewise
``<key>-<part>.failed.json`` for ``<key>-<part>.pt2``). It lives in the Inductor cache dir, so the normal upload
ships it in the cache entry and the normal restore brings it back: every later boot of that key finds it before
exporting. The key covers the code, weights, config, export spec and torch version, so a changed key (a fix, a
new torch) has no record and tries again.

Only failures that would happen again are remembered: torch.export refusing the model, the AOTInductor build
failing, the built package refused (weights baked in) or raising on its first call. A failure caused by the
machine (out of memory, disk full, another OSError) is not recorded: the next boot tries again.

Neither torch nor boto3 is imported here: the CLI reads these records too (``inspect``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .metrics import write_json_atomic

__all__ = ["ExportFailure", "failure_path", "read_failure", "record_failure", "is_failure_record", "SUFFIX"]

log = logging.getLogger("compile_cache")

SUFFIX = ".failed.json"
FORMAT = 1
_MAX_DETAIL = 4000  # characters of the error message kept: enough for the cause, not a 100 KB C++ log


@dataclass(frozen=True)
class ExportFailure:
    """What failed (``stage``: "export" for torch.export / the package build, "package" for a built package that
    was refused or raised), the exception type, its first line (``reason``), more of it (``detail``), the torch
    version it failed under, and when (unix time)."""

    stage: str
    error: str
    reason: str
    detail: str
    torch: str
    at: float
    format: int = FORMAT

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> ExportFailure:
        """Parse a record; ValueError if it is not one."""
        try:
            d = json.loads(data)
            if not isinstance(d, dict) or d.get("format") != FORMAT:
                raise ValueError(f"not a format-{FORMAT} export failure record")
            return cls(**{k: d[k] for k in ("stage", "error", "reason", "detail", "torch", "at")})
        except (KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"malformed export failure record: {e}") from e


def failure_path(package: Path) -> Path:
    """The record beside a package path: ``x/aoti/<name>.pt2`` → ``x/aoti/<name>.failed.json``."""
    return package.with_name(package.name.removesuffix(".pt2") + SUFFIX)


def is_failure_record(path: str) -> bool:
    """Whether a cache-entry file path (``inductor/aoti/<name>.failed.json``, or a part's failed precompile:
    ``inductor/precompile/<stem>/precompile.failed.json``) is one of these records."""
    parts = path.split("/")
    return parts[-1].endswith(SUFFIX) and ((len(parts) >= 2 and parts[-2] == "aoti") or
                                           (len(parts) >= 3 and parts[-3] == "precompile"))


def _torch_version() -> str:
    import torch  # lazily: only the booting predictor records and checks, and it has torch loaded already

    return str(torch.__version__)


def read_failure(package: Path) -> ExportFailure | None:
    """The failure recorded for ``package``'s key, or None: no record, an unreadable one (logged; exporting again
    is the safe side), or one written under another torch version (that torch's failure says nothing here)."""
    path = failure_path(package)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("cannot read the failure record %s (%s): trying again", path, e)
        return None
    try:
        rec = ExportFailure.from_bytes(data)
    except ValueError as e:
        log.warning("ignoring %s: %s", path, e)
        return None
    if rec.torch != _torch_version():
        log.info("failure record %s is from torch %s, this is %s: trying again", path.name, rec.torch,
                 _torch_version())
        return None
    return rec


def _transient(exc: BaseException) -> BaseException | None:
    """The machine-made cause in ``exc``'s chain (out of memory, disk full, ...), if there is one."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (MemoryError, OSError)):
            return e
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)  # the chain a traceback shows
    return None


def record_failure(package: Path, exc: BaseException, *, stage: str) -> ExportFailure | None:
    """Write down that exporting ``package``'s key failed with ``exc``, so later boots skip it. Returns the
    record, or None when it was not written (a transient cause, or the file could not be written: logged, the
    boot goes on either way)."""
    transient = _transient(exc)
    if transient is not None:
        log.info("%s failure not remembered: caused by %s (%s), the next boot tries again", stage,
                 type(transient).__name__, transient)
        return None
    text = str(exc).strip() or type(exc).__name__
    rec = ExportFailure(
        stage=stage,
        error=type(exc).__name__,
        reason=text.splitlines()[0][:500],
        detail=text[:_MAX_DETAIL],
        torch=_torch_version(),
        at=round(time.time(), 3),
    )
    path = failure_path(package)
    try:
        write_json_atomic(path, asdict(rec))  # ".incomplete" until renamed: the snapshot never ships a half record
    except OSError as e:
        log.warning("cannot record the %s failure in %s (%s): the next boot will try again", stage, path, e)
        return None
    log.info("%s failure recorded in %s: boots of this key skip it", stage, path)
    return rec


def describe(rec: ExportFailure) -> dict[str, Any]:
    """JSON-able form (the CLI's ``inspect --json``)."""
    return asdict(rec)
