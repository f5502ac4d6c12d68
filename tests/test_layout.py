"""The package's shape: the runtime never imports the tools, the tools never import the CLI, and every subpackage
ships."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "compile_cache"
# The command-line entry points may hand a command to a tool (`python -m compile_cache bench`); they are not
# on the path a serving container runs (setup, restore, upload, exit flush).
ENTRY_POINTS = {"cli.py", "__main__.py"}


def runtime_modules() -> list[Path]:
    return sorted(
        p for p in PKG.rglob("*.py")
        if "tools" not in p.relative_to(PKG).parts and p.name not in ENTRY_POINTS and "__pycache__" not in p.parts
    )


def package_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).parts[:-1])


def imported_names(source: str, package: str) -> set[str]:
    """Absolute names of every module the source imports, at top level or inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)  # `from . import tools`
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "compile_cache.tools" in node.value:
            names.add(node.value)  # importlib.import_module("compile_cache.tools...")
    return names


def test_the_runtime_never_imports_the_tools() -> None:
    modules = runtime_modules()
    assert {"lifecycle.py", "restore.py", "upload.py", "lineage.py", "snapshot.py", "config.py", "key.py"} <= {
        p.name for p in modules
    }
    offenders = {
        str(p.relative_to(ROOT)): sorted(
            n for n in imported_names(p.read_text(), package_of(p)) if n.startswith("compile_cache.tools")
        )
        for p in modules
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_the_checker_sees_every_way_to_import_the_tools() -> None:
    # The check above can fail: a runtime module written like any of these would be caught.
    src = (
        "import compile_cache.tools.cogrun\n"
        "def f():\n    from ..tools.bench import main\n    from .. import tools\n"
        "    importlib.import_module('compile_cache.tools.profile')\n"
    )
    names = imported_names(src, "compile_cache.stores")
    assert {
        "compile_cache.tools.cogrun", "compile_cache.tools.bench", "compile_cache.tools", "compile_cache.tools.profile"
    } <= names
    assert not any(n.startswith("compile_cache.tools") for n in imported_names("from .stores import s3", "compile_cache"))


def test_the_tools_never_import_the_cli() -> None:
    # The CLI dispatches to the tools; what both need lives in the runtime (compile_cache/predictors.py).
    tools = sorted(p for p in (PKG / "tools").rglob("*.py") if "__pycache__" not in p.parts)
    assert {"bench.py", "benchboot.py", "profile.py"} <= {p.name for p in tools}
    offenders = {
        str(p.relative_to(ROOT)): sorted(
            n for n in imported_names(p.read_text(), package_of(p))
            if n in ("compile_cache.cli", "compile_cache.__main__") or n.startswith("compile_cache.cli.")
        )
        for p in tools
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_the_checker_sees_every_way_to_import_the_cli() -> None:
    src = "def f():\n    from ..cli import load_predictor\n    from .. import cli\n"
    names = imported_names(src, "compile_cache.tools")
    assert {"compile_cache.cli.load_predictor", "compile_cache.cli"} <= names
    assert "compile_cache.cli" in imported_names("import compile_cache.cli", "compile_cache.tools")
    assert "compile_cache.cli" not in imported_names("from ..predictors import load_predictor", "compile_cache.tools")


def test_importing_the_runtime_loads_no_tool() -> None:
    mods = [
        "compile_cache", "compile_cache.lifecycle", "compile_cache.restore", "compile_cache.upload",
        "compile_cache.lineage", "compile_cache.entry", "compile_cache.segments", "compile_cache.snapshot",
        "compile_cache.stores.local", "compile_cache.stores.s3", "compile_cache.key", "compile_cache.config",
        "compile_cache.compiler", "compile_cache.export", "compile_cache.precompile", "compile_cache.manifest",
        "compile_cache.metrics",
    ]
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        "import compile_cache; compile_cache.CompiledPredictor\n"
        "print(sorted(m for m in sys.modules if m.startswith('compile_cache.tools')))\n"
    )
    cp = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.strip() == "[]"


def test_every_subpackage_is_packaged() -> None:
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in PKG.rglob("__init__.py") if "__pycache__" not in p.parts
    }
    assert "compile_cache.tools" in on_disk
    assert declared == on_disk


def test_the_module_map_names_every_module() -> None:
    doc = (ROOT / "docs" / "how-it-works.md").read_text()
    section = doc.split("## Module map", 1)[1]
    missing = [
        str(p.relative_to(ROOT)) for p in PKG.rglob("*.py")
        if "__pycache__" not in p.parts and p.name != "__init__.py" and not re.search(rf"[`/]{re.escape(p.name)}`", section)
    ]
    assert not missing, f"docs/how-it-works.md's module map lacks {missing}"


def test_the_store_protocol_stands_in_modules_small_enough_to_read_in_one_sitting() -> None:
    sizes = {n: len((PKG / n).read_text().splitlines()) for n in ("entry.py", "restore.py", "upload.py", "segments.py",
                                                                   "lineage.py")}
    assert all(n <= 400 for n in sizes.values()), sizes
