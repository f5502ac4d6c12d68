"""Remembered export failures (compile_cache.failed_export): the record file, what is remembered, what is ignored.
The boots that skip the export because of a record are in tests/test_export_strategy.py."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from compile_cache.export import ExportError
from compile_cache.failed_export import (
    ExportFailure,
    failure_path,
    is_failure_record,
    read_failure,
    record_failure,
)


def _export_error(cause: BaseException) -> ExportError:
    try:
        try:
            raise cause
        except BaseException as e:
            raise ExportError(f"torch.export.export failed for M: {type(e).__name__}: {e}\nmore lines") from e
    except ExportError as err:
        return err


def test_record_sits_beside_the_package_and_round_trips(tmp_path: Path) -> None:
    pkg = tmp_path / "aoti" / "v1.torch-x.abc-model.pt2"
    assert failure_path(pkg) == tmp_path / "aoti" / "v1.torch-x.abc-model.failed.json"
    assert read_failure(pkg) is None
    rec = record_failure(pkg, _export_error(RuntimeError("data-dependent branch")), stage="export")
    assert rec is not None and failure_path(pkg).exists()
    assert rec.reason == "torch.export.export failed for M: RuntimeError: data-dependent branch"
    assert rec.detail.endswith("more lines") and rec.error == "ExportError" and rec.torch == torch.__version__
    assert read_failure(pkg) == rec
    assert [p.name for p in (tmp_path / "aoti").iterdir()] == [failure_path(pkg).name]  # no temp file left
    assert is_failure_record(f"inductor/aoti/{failure_path(pkg).name}")
    assert not is_failure_record("inductor/aoti/v1.pt2") and not is_failure_record("inductor/x.failed.json")


def test_machine_made_failures_are_not_remembered(tmp_path: Path) -> None:
    pkg = tmp_path / "aoti" / "k.pt2"
    assert record_failure(pkg, _export_error(OSError(28, "No space left on device")), stage="export") is None
    assert record_failure(pkg, _export_error(MemoryError()), stage="export") is None
    assert not failure_path(pkg).exists() and read_failure(pkg) is None


def test_unusable_records_are_ignored(tmp_path: Path) -> None:
    pkg = tmp_path / "aoti" / "k.pt2"
    rec = record_failure(pkg, _export_error(RuntimeError("x")), stage="package")
    assert rec is not None and read_failure(pkg) == rec
    body = json.loads(failure_path(pkg).read_bytes())
    failure_path(pkg).write_text(json.dumps({**body, "torch": "2.11.0"}))  # another torch: its failure is not ours
    assert read_failure(pkg) is None
    failure_path(pkg).write_text("{not json")
    assert read_failure(pkg) is None
    failure_path(pkg).write_text(json.dumps({**body, "format": 99}))
    assert read_failure(pkg) is None
    assert ExportFailure.from_bytes(json.dumps(body).encode()) == rec
