"""Download the wheels the GPU machine lacks into an ignored folder (``make gpu-wheels``), for ``scripts/gpu_check``.

The GPU machine (Python 3.12, torch with CUDA and Triton preinstalled) has no package registry: what the framework
needs beyond its image travels with the working tree as cp312 manylinux wheels. The versions are the ones installed
here (so the GPU run uses what CI tested); the whole set must stay well under the tree's 64 MiB transfer limit.

    python scripts/gpu_wheels.py [--dest .whl] [--max-mib 48]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

# What the GPU image lacks (its package list is read with `pip list` there; torch, triton, transformers,
# safetensors, filelock, numpy, matplotlib, requests, typing-extensions are present).
PACKAGES = (
    "cog",
    "coglet",
    "structlog",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "zstandard",
    "boto3",
    "botocore",
    "s3transfer",
    "jmespath",
    "diffusers",  # the diffusion example (pure Python; its other needs come with the image's transformers)
)
# manylinux tags pip matches exactly: list the ones these packages ship for.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux_2_5_x86_64", "manylinux1_x86_64", "manylinux_2_34_x86_64", "manylinux_2_35_x86_64")
PYTHON_VERSION = "3.12"


def pins(names: tuple[str, ...]) -> list[str]:
    """``name==version`` for each package, as installed in this environment."""
    out = []
    for name in names:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError as e:
            raise SystemExit(f"gpu-wheels: {name} is not installed here (run `make install` first)") from e
    return out


def download(specs: list[str], dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", PYTHON_VERSION, "--implementation", "cp", "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run(cmd + specs, check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=Path(".whl"), help="folder for the wheels (default: .whl, ignored)")
    ap.add_argument("--max-mib", type=float, default=48.0, help="fail if the wheels add up to more (default 48)")
    args = ap.parse_args(argv)
    specs = pins(PACKAGES)
    # Download into a fresh folder, then replace: one version of each package, never two (pip would refuse both).
    with tempfile.TemporaryDirectory(dir=args.dest.parent if args.dest.parent.exists() else None) as tmp:
        download(specs, Path(tmp))
        wheels = sorted(Path(tmp).glob("*.whl"))
        if len(wheels) != len(specs):
            raise SystemExit(f"gpu-wheels: expected {len(specs)} wheels, got {len(wheels)}: {[w.name for w in wheels]}")
        total = sum(w.stat().st_size for w in wheels)
        if total > args.max_mib * 2**20:
            raise SystemExit(f"gpu-wheels: {total / 2**20:.1f} MiB is over --max-mib {args.max_mib}")
        args.dest.mkdir(parents=True, exist_ok=True)
        for old in args.dest.glob("*.whl"):
            old.unlink()
        for w in wheels:
            w.rename(args.dest / w.name)
    for w in sorted(args.dest.glob("*.whl")):
        print(f"{w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
    print(f"{total / 2**20:7.2f} MiB  in {len(wheels)} wheels, in {args.dest}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
