"""`make gpu-wheels` (scripts/gpu_wheels.py): the wheels the GPU machine lacks, for Python 3.12, under the size cap.

Downloads from the package registry (about 31 MiB, from pip's cache after the first run)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import gpu_wheels  # noqa: E402


def _tags(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as z:
        (meta,) = [n for n in z.namelist() if n.endswith(".dist-info/WHEEL")]
        return z.read(meta).decode()


def test_gpu_wheels_are_cp312_or_pure_and_one_per_package(tmp_path: Path) -> None:
    dest = tmp_path / "whl"
    dest.mkdir()
    (dest / "stale-0.0.1-py3-none-any.whl").write_bytes(b"old")  # a second version would stop pip there
    cp = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_wheels.py"), "--dest", str(dest)],
                        capture_output=True, text=True, timeout=600)
    assert cp.returncode == 0, cp.stderr[-2000:]
    wheels = sorted(dest.glob("*.whl"))
    names = {w.name.split("-")[0].lower().replace("_", "-") for w in wheels}
    assert names == set(gpu_wheels.PACKAGES)
    assert len(wheels) == len(gpu_wheels.PACKAGES)
    for w in wheels:
        tags = _tags(w)
        assert "Tag: py3-none-any" in tags or "cp312" in tags or "abi3" in tags, (w.name, tags)
        assert "linux" in tags or "none-any" in tags, (w.name, tags)
    assert sum(w.stat().st_size for w in wheels) < 48 * 2**20


def test_gpu_wheels_refuses_over_the_cap(tmp_path: Path) -> None:
    cp = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_wheels.py"), "--dest", str(tmp_path / "w"),
                         "--max-mib", "1"], capture_output=True, text=True, timeout=600)
    assert cp.returncode != 0 and "over --max-mib" in cp.stderr
    assert not (tmp_path / "w").exists()  # nothing half-done left where make gpu-wheels puts them
