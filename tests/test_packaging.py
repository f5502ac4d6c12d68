"""The package installs into a user's project: its dependencies are ranges, not this repo's pins.

The metadata is built by setuptools from pyproject.toml (as `pip install` would), then pip resolves it, offline,
against stub wheels (a name and a version each, no code) beside torch 2.11.0 and 2.13.0. No network.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.conftest import ROOT

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# Versions a user's environment may hold: each stub wheel below exists once per version listed.
STUBS = {
    "torch": ["2.10.0", "2.11.0", "2.13.0"],
    "cog": ["0.19.0", "0.20.0", "0.23.1"],
    "pydantic": ["2.5.0"],
    "filelock": ["3.12.0"],
    "zstandard": ["0.22.0"],
    "boto3": ["1.40.0"],
}


def deps() -> dict[str, Requirement]:
    return {Requirement(d).name: Requirement(d) for d in PROJECT["dependencies"]}


def test_dependencies_are_ranges_that_hold_the_pinned_set() -> None:
    reqs = deps()
    assert not [str(r) for r in reqs.values() if any(s.operator in ("==", "===") for s in r.specifier)]
    torch = reqs["torch"].specifier
    assert torch.contains("2.11.0") and torch.contains("2.13.0") and not torch.contains("2.10.0")
    cog = reqs["cog"].specifier  # BaseRunner first shipped in cog 0.20.0
    assert cog.contains("0.20.0") and cog.contains("0.23.1") and not cog.contains("0.19.0")
    # requirements.txt (the example's and CI's exact set) lies inside the ranges, the s3 extra's included.
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            r = Requirement(line)
            (spec,) = r.specifier
            pins[r.name] = spec.version
    for r in [*reqs.values(), *(Requirement(d) for d in PROJECT["optional-dependencies"]["s3"])]:
        assert r.specifier.contains(pins[r.name]), (str(r), pins[r.name])


def stub_wheel(folder: Path, name: str, version: str, metadata: str | None = None) -> None:
    dist = f"{name.replace('-', '_')}-{version}"
    meta = metadata or f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    files = {
        f"{dist}.dist-info/METADATA": meta,
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: stub\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist}.dist-info/RECORD"] = "".join(f"{p},,\n" for p in [*files, f"{dist}.dist-info/RECORD"])
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as z:
        for p, text in files.items():
            z.writestr(p, text)


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A find-links dir: the package (its real metadata, built by setuptools) and stubs of its dependencies."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"  # a copy: setuptools writes its build files next to pyproject.toml
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    shutil.copytree(ROOT / "compile_cache", src / "compile_cache", ignore=shutil.ignore_patterns("__pycache__"))
    meta_dir = tmp / "meta"
    meta_dir.mkdir()
    code = (
        "import sys; from setuptools import build_meta as b; "
        "print(b.prepare_metadata_for_build_wheel(sys.argv[1]))"
    )
    cp = subprocess.run([sys.executable, "-c", code, str(meta_dir)], cwd=src, capture_output=True, text=True)
    assert cp.returncode == 0, cp.stderr[-3000:]
    metadata = (meta_dir / cp.stdout.strip().splitlines()[-1] / "METADATA").read_text()
    out = tmp / "wheels"
    out.mkdir()
    stub_wheel(out, PROJECT["name"], PROJECT["version"], metadata)
    for name, versions in STUBS.items():
        for v in versions:
            stub_wheel(out, name, v)
    return out


def resolve(wheels: Path, tmp_path: Path, *reqs: str) -> tuple[int, dict[str, str], str]:
    """pip's resolution of reqs against the stubs only: (exit status, {name: version}, stderr)."""
    report = tmp_path / "report.json"
    # --isolated: no pip config and no PIP_* variables (a machine's index, constraints or find-links stay out).
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    cp = subprocess.run(
        [sys.executable, "-m", "pip", "--isolated", "install", "--dry-run", "--ignore-installed", "--no-index",
         "--find-links", str(wheels), "--report", str(report), "--quiet", *reqs],
        capture_output=True, text=True, env=env, timeout=120,
    )
    got = {}
    if cp.returncode == 0:
        got = {i["metadata"]["name"]: i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    return cp.returncode, got, cp.stderr


@pytest.mark.parametrize("torch", ["2.11.0", "2.13.0"])
def test_metadata_resolves_beside_another_torch(wheels: Path, tmp_path: Path, torch: str) -> None:
    code, got, err = resolve(wheels, tmp_path, f"{PROJECT['name']}[s3]", f"torch=={torch}")
    assert code == 0, err
    assert got["torch"] == torch and got[PROJECT["name"]] == PROJECT["version"]
    assert {"cog", "pydantic", "filelock", "zstandard", "boto3"} <= set(got)
    assert Version(got["cog"]) >= Version("0.20.0")


def test_metadata_refuses_a_torch_below_the_range(wheels: Path, tmp_path: Path) -> None:
    code, _, err = resolve(wheels, tmp_path, PROJECT["name"], "torch==2.10.0")
    assert code != 0 and "torch" in err


def test_wheel_and_sdist_ship_every_module_and_py_typed(tmp_path: Path) -> None:
    """What `pip install .` installs: every module of the package, and ``py.typed`` (the package's type hints count
    for its users' type checkers)."""
    src = tmp_path / "src"
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    shutil.copytree(ROOT / "compile_cache", src / "compile_cache", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "dist"
    names = []
    for kind in ("wheel", "sdist"):  # one process each: setuptools keeps state between builds in one process
        code = f"import sys; from setuptools import build_meta as b; print('DIST', b.build_{kind}(sys.argv[1]))"
        cp = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, capture_output=True, text=True,
                            timeout=300)
        assert cp.returncode == 0, cp.stderr[-3000:]
        (line,) = [x for x in cp.stdout.splitlines() if x.startswith("DIST ")]  # setuptools logs to stdout too
        names.append(line.split()[1])
    wheel_name, sdist_name = names
    expected = {
        str(p.relative_to(ROOT)) for p in (ROOT / "compile_cache").rglob("*")
        if p.is_file() and (p.suffix == ".py" or p.name == "py.typed") and "__pycache__" not in p.parts
    }
    assert "compile_cache/py.typed" in expected
    with zipfile.ZipFile(out / wheel_name) as z:
        assert expected <= set(z.namelist())
    with tarfile.open(out / sdist_name) as t:
        prefix = sdist_name.removesuffix(".tar.gz") + "/"
        assert expected <= {n.removeprefix(prefix) for n in t.getnames()}
