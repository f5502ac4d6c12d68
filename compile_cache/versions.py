"""What a model version is to the cache: the model part of the key (what compiles), a label, a lineage.

Torch-free; docs/versions.md says what is in the key, what is left out and why leaving it out cannot give a wrong
result. In short, the model part of the key hashes what decides the generated code:

- ``model.source``: the predictor file and the local modules it imports (transitively; files under the project
  dir only: installed packages are the environment's business, their versions are environment factors);
- ``model.requirements``: the pinned requirements files and cog.yaml;
- ``model.weights``: every file of the weights dir in full, except tensor files in a format whose structure can be
  read without the tensors (``.safetensors``): for those, tensor names, shapes and dtypes. When the compile config
  bakes weight values into generated code (Inductor freezing, an opt-in), the values count again (every byte).

The version users see (``COMPILE_CACHE_MODEL_VERSION``, the predictor's ``model_version``, else the model part) is a
label: recorded in the manifest, shown by ``ls`` and the timeline, used by ``prune``; it does not move the key, unless
``COMPILE_CACHE_KEY_BY_VERSION`` asks for a fresh compile per version (``model.version``). factors.MODEL lists these
factors beside the key's others. The lineage (``COMPILE_CACHE_MODEL_NAME``,
else derived) groups the versions of one model: a new version seeds from the newest entry of its lineage.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .key import fingerprint_of

__all__ = [
    "ModelVersion",
    "identify",
    "local_sources",
    "weights_digest",
    "safetensors_structure",
    "derive_lineage",
    "model_part",
]

# Names a lineage may use: the first part of every key of its entries (no dot: the key's parts are dot-separated).
_LINEAGE_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_MAX_LINEAGE = 64
# A safetensors header is JSON of a few KB per thousand tensors; anything larger than this is not one.
_MAX_HEADER = 100 * 2**20
_SKIP_DIRS = {"__pycache__", ".git", ".venv", "venv", "site-packages", "node_modules"}


@dataclass(frozen=True)
class ModelVersion:
    """The model side of a cache key. ``part`` is the key's model part (``m`` + 12 hex digits of ``factors``)."""

    part: str
    label: str
    lineage: str
    factors: Mapping[str, str] = field(default_factory=dict)  # model.source, model.requirements, model.weights, ...
    sources: tuple[str, ...] = ()  # the source files hashed, relative to the project dir
    seconds: float = 0.0  # what computing it cost (the metrics' key_s)


def model_part(factors: Mapping[str, str]) -> str:
    return "m" + fingerprint_of(factors)


def _rel(p: Path, base: Path) -> str:
    try:
        return p.relative_to(base).as_posix()
    except ValueError:
        return p.name


def _hash_files(files: Iterable[Path], base: Path) -> str:
    """sha256 over (relative name, size, bytes) of each file, in name order; 16 hex digits."""
    h = hashlib.sha256()
    for p in sorted(set(files), key=lambda x: _rel(x, base)):
        h.update(f"{_rel(p, base)}\0{p.stat().st_size}\0".encode())
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]


# -- source ----------------------------------------------------------------------------------------------------------
def _imports(path: Path) -> list[tuple[str, int, list[str]]]:
    """(module, relative level, imported names) of every import statement anywhere in the file (function-level
    imports included: a lazy import still decides what runs)."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError):
        return []
    out: list[tuple[str, int, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, 0, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.module or "", node.level, [a.name for a in node.names]))
    return out


def _module_file(root: Path, dotted: str) -> Path | None:
    if not dotted:
        return None
    base = root.joinpath(*dotted.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _package_root(d: Path) -> Path:
    """The directory absolute imports start from when ``d`` is inside a package (``tests/`` with an __init__.py:
    ``tests.x`` is imported from its parent)."""
    while (d / "__init__.py").is_file() and d.parent != d:
        d = d.parent
    return d


def _excluded(p: Path, project: Path) -> bool:
    try:
        rel = p.resolve().relative_to(project.resolve())
    except ValueError:
        return True  # outside the project: an installed package (its version is an environment factor)
    return any(part in _SKIP_DIRS or part.startswith(".") for part in rel.parts[:-1])


def local_sources(entry: Path, project: Path | None = None) -> list[Path]:
    """The predictor file and every local module it imports, transitively: files under ``project`` (default: the
    predictor's directory, or the package root above it) that Python would import for those names."""
    entry = entry.resolve()
    roots = [entry.parent, _package_root(entry.parent)]
    project = (project or roots[-1]).resolve()
    seen: dict[Path, None] = {}
    todo = [entry]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen[f] = None
        pkg_dir = f.parent
        for module, level, names in _imports(f):
            found: list[Path | None] = []
            if level:  # relative: from the file's package, `level` dots up
                base = pkg_dir
                for _ in range(level - 1):
                    base = base.parent
                found.append(_module_file(base, module) if module else base / "__init__.py")
                found += [_module_file(base, f"{module}.{n}" if module else n) for n in names]
            else:
                for root in dict.fromkeys(roots):
                    parts = module.split(".")
                    # `import a.b.c` runs a/__init__.py, a/b/__init__.py and a/b/c.py
                    found += [_module_file(root, ".".join(parts[: i + 1])) for i in range(len(parts))]
                    found += [_module_file(root, f"{module}.{n}") for n in names]  # `from pkg import submodule`
            for p in found:
                if p is not None and p.is_file() and not _excluded(p, project):
                    todo.append(p.resolve())
    return list(seen)


# -- weights ---------------------------------------------------------------------------------------------------------
def safetensors_structure(path: Path) -> bytes | None:
    """The tensor names, dtypes and shapes of a safetensors file, canonical JSON, read from its header alone
    (8 bytes of length, then JSON); None if the file is not a well-formed safetensors file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                return None
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or n + 8 > size:
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(header, dict):
        return None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue  # free-form strings (a training run's notes): they change no generated code
        if not isinstance(info, dict) or "dtype" not in info or "shape" not in info:
            return None
        out[name] = [info["dtype"], info["shape"]]
    return json.dumps(out, sort_keys=True, separators=(",", ":")).encode()


def _weight_files(d: Path) -> list[Path]:
    if d.is_file():
        return [d]
    out = []
    for dirpath, dirs, files in os.walk(d, followlinks=True):
        dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS and not x.startswith("."))
        out += [Path(dirpath) / fn for fn in files if not fn.startswith(".")]
    return out


def weights_digest(d: Path, *, values: bool) -> str:
    """``structure:<hash>`` (safetensors by header, every other file in full) or ``values:<hash>`` (every byte);
    ``none`` when there is no such dir. Names count: a renamed file is a change."""
    if not d.exists():
        return "none"
    files = _weight_files(d)
    base = d if d.is_dir() else d.parent
    if values:
        return f"values:{_hash_files(files, base)}"
    h = hashlib.sha256()
    for p in sorted(files, key=lambda x: _rel(x, base)):
        struct_ = safetensors_structure(p) if p.name.endswith(".safetensors") else None
        if struct_ is not None:
            h.update(f"{_rel(p, base)}\0structure\0".encode() + struct_ + b"\0")
        else:
            h.update(f"{_rel(p, base)}\0file\0{_hash_files([p], p.parent)}\0".encode())
    return f"structure:{h.hexdigest()[:16]}"


# -- the version -----------------------------------------------------------------------------------------------------
def derive_lineage(predictor_class: str, weights_dir: Path | None) -> str:
    """The default lineage: the predictor class's name, and the weights dir's name when there is one
    (``Predictor-all-MiniLM-L6-v2``): fine-tunes pushed with the same code and a weights dir of the same name are
    one lineage; a copy of the code elsewhere stays in it too."""
    name = predictor_class
    if weights_dir is not None and weights_dir.name and weights_dir.exists():
        name += f"-{weights_dir.name}"
    return clean_lineage(name)


def clean_lineage(name: str) -> str:
    out = _LINEAGE_UNSAFE.sub("_", name)[:_MAX_LINEAGE].strip("_-")
    return out or "model"


def identify(
    *,
    predictor_file: Path,
    weights_dir: Path | None,
    requirements_files: Iterable[Path],
    label: str | None,
    lineage: str | None,
    predictor_class: str,
    weight_values: bool = False,
    key_by_version: bool = False,
) -> ModelVersion:
    """Compute the model part of the key, the label and the lineage. Reads the source and non-tensor files in full
    and safetensors headers only (unless ``weight_values``). ``key_by_version`` puts the label into the key."""
    t0 = time.monotonic()
    project = _package_root(predictor_file.resolve().parent)
    sources = local_sources(predictor_file, project)
    reqs = [p for p in requirements_files if p.is_file()]
    factors = {
        "model.source": _hash_files(sources, project),
        "model.requirements": _hash_files(reqs, project) if reqs else "none",
        "model.weights": weights_digest(weights_dir, values=weight_values) if weights_dir is not None else "none",
    }
    if key_by_version and label:
        factors["model.version"] = label
    part = model_part(factors)
    return ModelVersion(
        part=part,
        label=label or f"v{part[1:]}",
        lineage=clean_lineage(lineage) if lineage else derive_lineage(predictor_class, weights_dir),
        factors=factors,
        sources=tuple(sorted(_rel(p, project) for p in sources)),
        seconds=time.monotonic() - t0,
    )
