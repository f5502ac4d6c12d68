"""Every exception class of the framework derives from CacheError and is named in errors.py's tree."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import compile_cache
from compile_cache import errors
from compile_cache.errors import CacheError

# Private control flow, never raised to a caller: each is caught inside the module that defines it.
NOT_ERRORS = {
    "compile_cache.restore._Cancelled": "raised in the restore's helper thread past the deadline to unwind it, and caught there",
    "compile_cache.cli._Failure": "the CLI's one-line failure: main() turns it into a message and exit status 1",
}


def _exception_classes() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(compile_cache.__path__, "compile_cache."):
        if info.name == "compile_cache.__main__":
            continue  # running it runs the CLI
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                found[f"{info.name}.{name}"] = obj
    return found


def test_every_exception_derives_from_cache_error() -> None:
    classes = _exception_classes()
    assert set(NOT_ERRORS) <= set(classes), "an excluded class no longer exists: drop it from NOT_ERRORS"
    outside = sorted(name for name, cls in classes.items() if name not in NOT_ERRORS and not issubclass(cls, CacheError))
    assert outside == []
    # the walk saw the modules that declare errors outside errors.py (the tools, whose imports need torch)
    assert {"compile_cache.tools.benchboot.BootFailed", "compile_cache.tools.gpucheck.CheckError"} <= set(classes)


def test_every_error_is_in_the_documented_tree() -> None:
    doc = errors.__doc__ or ""
    public = {cls.__name__ for name, cls in _exception_classes().items() if name not in NOT_ERRORS}
    assert sorted(n for n in public if n not in doc) == []
    declared = {n for n, obj in vars(errors).items() if inspect.isclass(obj) and issubclass(obj, CacheError)}
    assert declared == set(errors.__all__)


def test_errors_keep_the_builtin_a_caller_catches() -> None:
    from compile_cache.export import ExportError, PackageLoadError, ShapeOutOfRange
    from compile_cache.tools.bench import BenchError

    assert issubclass(ExportError, RuntimeError) and issubclass(PackageLoadError, RuntimeError)
    assert issubclass(ShapeOutOfRange, ValueError) and issubclass(errors.RoundTripError, RuntimeError)
    assert issubclass(BenchError, errors.ToolError) and issubclass(BenchError, RuntimeError)
