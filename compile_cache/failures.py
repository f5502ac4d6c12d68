"""Remembered failures: a key whose export, or whose precompiling, failed once goes straight to its fallback on
later boots.

Exporting a model that does not export costs a warm boot almost as much as the cold one (torch.export, or the
AOTInductor build, runs and fails again every time); precompiling a model that cannot be precompiled (a graph break,
a guard that cannot be saved) likewise. So a failure is written down, as a small JSON file in the Inductor cache dir,
one record per thing that failed, named after it:

- the export strategy's: ``aoti/<stem>.failed.json``, beside the package ``aoti/<stem>.pt2`` it stands for
  (:func:`export_record`); stage ``"export"`` (torch.export or the package build) or ``"package"`` (the built
  package refused, weights baked in, or raising on its first call);
- the jit strategy's precompiled functions (``jit_restore="precompile"``): ``precompile/<stem>/precompile.failed.json``
  in the part's precompile dir (:func:`precompile_record`); stage ``"precompile"``. Records that earlier releases
  wrote into stores have this same path and format: they are read as they are.

Living in the Inductor cache dir, a record ships in the cache entry with the normal upload and comes back with the
normal restore: every later boot of that key finds it first. The key covers the code, weights, config, export spec
and torch version, so a changed key (a fix, a new torch) has no record and tries again.

Only failures that would happen again are remembered. A failure caused by the machine (out of memory, disk full,
another OSError) is not recorded: the next boot tries again.

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

__all__ = ["Failure", "export_record", "precompile_record", "failed_step", "read_failure", "record_failure", "describe",
           "SUFFIX"]

log = logging.getLogger("compile_cache")

SUFFIX = ".failed.json"
PRECOMPILE_RECORD = "precompile" + SUFFIX  # the name of a precompile dir's record
FORMAT = 1
_MAX_DETAIL = 4000  # characters of the error message kept: enough for the cause, not a 100 KB C++ log


@dataclass(frozen=True)
class Failure:
    """What failed (``stage``: "export" for torch.export / the package build, "package" for a built package that
    was refused or raised, "precompile" for a precompiled function), the exception type, its first line
    (``reason``), more of it (``detail``), the torch version it failed under, and when (unix time)."""

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
    def from_bytes(cls, data: bytes) -> Failure:
        """Parse a record; ValueError if it is not one."""
        try:
            d = json.loads(data)
            if not isinstance(d, dict) or d.get("format") != FORMAT:
                raise ValueError(f"not a format-{FORMAT} failure record")
            return cls(**{k: d[k] for k in ("stage", "error", "reason", "detail", "torch", "at")})
        except (KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"malformed failure record: {e}") from e


def export_record(package: Path) -> Path:
    """The export strategy's record for a package path: ``x/aoti/<stem>.pt2`` → ``x/aoti/<stem>.failed.json``."""
    return package.with_name(package.name.removesuffix(".pt2") + SUFFIX)


def precompile_record(directory: Path) -> Path:
    """The precompile record of a part's precompile dir: ``x/precompile/<stem>/precompile.failed.json``."""
    return directory / PRECOMPILE_RECORD


def failed_step(path: str) -> str | None:
    """What a cache-entry file path records the failure of: ``"export"`` (``inductor/aoti/<stem>.failed.json``),
    ``"precompile"`` (``inductor/precompile/<stem>/precompile.failed.json``), or None: not a failure record."""
    parts = path.split("/")
    if len(parts) >= 2 and parts[-2] == "aoti" and parts[-1].endswith(SUFFIX):
        return "export"
    if len(parts) >= 3 and parts[-3] == "precompile" and parts[-1] == PRECOMPILE_RECORD:
        return "precompile"
    return None


def _torch_version() -> str:
    import torch  # lazily: only the booting predictor records and checks, and it has torch loaded already

    return str(torch.__version__)


def read_failure(path: Path) -> Failure | None:
    """The failure recorded in ``path`` (:func:`export_record`, :func:`precompile_record`), or None: no record, an
    unreadable one (logged; trying again is the safe side), or one written under another torch version (that torch's
    failure says nothing here)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("cannot read the failure record %s (%s): trying again", path, e)
        return None
    try:
        rec = Failure.from_bytes(data)
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


def record_failure(path: Path, exc: BaseException, *, stage: str) -> Failure | None:
    """Write down in ``path`` that ``stage`` failed for this key with ``exc``, so later boots skip it. Returns the
    record, or None when it was not written (a transient cause, or the file could not be written: logged, the
    boot goes on either way)."""
    transient = _transient(exc)
    if transient is not None:
        log.info("%s failure not remembered: caused by %s (%s), the next boot tries again", stage,
                 type(transient).__name__, transient)
        return None
    text = str(exc).strip() or type(exc).__name__
    rec = Failure(
        stage=stage,
        error=type(exc).__name__,
        reason=text.splitlines()[0][:500],
        detail=text[:_MAX_DETAIL],
        torch=_torch_version(),
        at=round(time.time(), 3),
    )
    try:
        write_json_atomic(path, asdict(rec))  # ".incomplete" until renamed: the snapshot never ships a half record
    except OSError as e:
        log.warning("cannot record the %s failure in %s (%s): the next boot will try again", stage, path, e)
        return None
    log.info("%s failure recorded in %s: boots of this key skip it", stage, path)
    return rec


def describe(rec: Failure) -> dict[str, Any]:
    """JSON-able form (the CLI's ``inspect --json``)."""
    return asdict(rec)
