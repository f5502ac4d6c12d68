"""Remembered failures (compile_cache.failures): the record files, what is remembered, what is ignored.
The boots that skip the export because of a record are in tests/test_export_strategy.py, those that skip
precompiling in tests/test_precompile.py."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from compile_cache.errors import RoundTripError
from compile_cache.export import ExportError
from compile_cache.failures import (
    Failure,
    export_record,
    failed_step,
    precompile_record,
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
    path = export_record(pkg)
    assert path == tmp_path / "aoti" / "v1.torch-x.abc-model.failed.json"
    assert read_failure(path) is None
    rec = record_failure(path, _export_error(RuntimeError("data-dependent branch")), stage="export")
    assert rec is not None and path.exists()
    assert rec.reason == "torch.export.export failed for M: RuntimeError: data-dependent branch"
    assert rec.detail.endswith("more lines") and rec.error == "ExportError" and rec.torch == torch.__version__
    assert read_failure(path) == rec
    assert [p.name for p in (tmp_path / "aoti").iterdir()] == [path.name]  # no temp file left
    assert failed_step(f"inductor/aoti/{path.name}") == "export"
    assert failed_step("inductor/aoti/v1.pt2") is None and failed_step("inductor/x.failed.json") is None


def test_precompile_record_has_a_name_of_its_own(tmp_path: Path) -> None:
    d = tmp_path / "precompile" / "v1.torch-x.abc-model"
    path = precompile_record(d)
    assert path == d / "precompile.failed.json"  # the name records already in stores have: they are read as before
    rec = record_failure(path, RoundTripError("saved and loaded back, it differs from eager"), stage="precompile")
    assert rec is not None and read_failure(path) == rec and rec.stage == "precompile"
    assert [p.name for p in d.iterdir()] == [path.name]
    assert failed_step(f"inductor/precompile/{d.name}/{path.name}") == "precompile"
    assert failed_step(f"inductor/precompile/{d.name}/other.failed.json") is None  # only the precompile record
    assert failed_step(f"inductor/precompile/{d.name}/shape.bin") is None


def test_machine_made_failures_are_not_remembered(tmp_path: Path) -> None:
    path = export_record(tmp_path / "aoti" / "k.pt2")
    assert record_failure(path, _export_error(OSError(28, "No space left on device")), stage="export") is None
    assert record_failure(path, _export_error(MemoryError()), stage="export") is None
    assert not path.exists() and read_failure(path) is None


def test_unusable_records_are_ignored(tmp_path: Path) -> None:
    path = export_record(tmp_path / "aoti" / "k.pt2")
    rec = record_failure(path, _export_error(RuntimeError("x")), stage="package")
    assert rec is not None and read_failure(path) == rec
    body = json.loads(path.read_bytes())
    path.write_text(json.dumps({**body, "torch": "2.11.0"}))  # another torch: its failure is not ours
    assert read_failure(path) is None
    path.write_text("{not json")
    assert read_failure(path) is None
    path.write_text(json.dumps({**body, "format": 99}))
    assert read_failure(path) is None
    assert Failure.from_bytes(json.dumps(body).encode()) == rec
