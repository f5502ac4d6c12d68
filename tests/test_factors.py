"""The key's factors: runners outside this repository keep their keys; every config field is classified; a field
added later joins the key only when set away from its default."""

from __future__ import annotations

import importlib
import json
import os
import platform
import struct
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import compile_cache.factors
from compile_cache.lifecycle import CompiledRunner

# -- runners outside the repository keep their key -------------------------------------------------------------------
# Each runner lives in its own project dir (a tmp dir), imports compile_cache as a library and has local files of its
# own: the key covers those, not compile_cache's. The expected names were computed by the code before the factors
# moved into compile_cache/factors.py, with the torch and host facts pinned below: a change here re-keys every user.
_NET = """
import torch


class Net(torch.nn.Module):
    def __init__(self, n: int = 4) -> None:
        super().__init__()
        self.l = torch.nn.Linear(n, 2)

    def forward(self, x):
        return torch.relu(self.l(x))
"""

_ONE = """
import torch
from outside_net import Net

from compile_cache import CompileConfig, CompiledRunner, Example


class OneModule(CompiledRunner):
    compile_config = CompileConfig(mode="max-autotune-no-cudagraphs", options={"freezing": False})

    def load(self, weights=None):
        return Net().eval()

    def warmup_examples(self):
        return [Example((torch.zeros(b, 4),)) for b in (1, 4)]

    def run(self, batch: int = 1) -> list:
        return self.model(torch.zeros(batch, 4)).tolist()
"""

_PARTS = """
import torch
from outside_net import Net

from compile_cache import CompileConfig, CompiledRunner, Dim, Example, ExportSpec, Part


class TwoParts(CompiledRunner):
    compile_config = CompileConfig(dynamic=False)
    model_name = "outside-parts"
    weights_dir = None

    def load(self, weights=None):
        return {
            "encoder": Part(Net(4).eval(), examples=[Example((torch.zeros(3, 4),))], strategy="export",
                            export_spec=ExportSpec((torch.zeros(3, 4),), {0: {0: Dim("batch", 1, 16)}})),
            "head": Part(Net(2).eval(), examples=[Example((torch.zeros(3, 2),))], sdpa_backend="math"),
        }

    def run(self, batch: int = 1) -> list:
        return self.parts["head"](self.parts["encoder"](torch.zeros(batch, 4))).tolist()
"""

_EXPORT = """
import torch
from outside_net import Net

from compile_cache import CompileConfig, CompiledRunner, Dim, ExportSpec


class ExportOne(CompiledRunner):
    compile_config = CompileConfig(strategy="export", memory_format="contiguous")
    model_version = "export-1"

    def load(self, weights=None):
        return Net().eval()

    def export_spec(self):
        return ExportSpec((torch.zeros(5, 4),), {0: {0: Dim("batch", 2, 64)}})

    def run(self, batch: int = 2) -> list:
        return self.model(torch.zeros(batch, 4)).tolist()
"""

# (runner module, class, source, key name, fingerprint): computed by the code before the refactor (see above).
_EXPECTED = [
    ("outside_one", "OneModule", _ONE,
     "OneModule-weights.ma9a502017d01.torch2.99.0+cpu-py311-cpu-avx2-jit.1f203ce533e2", "1f203ce533e2"),
    ("outside_parts", "TwoParts", _PARTS,
     "outside-parts.ma0af227a3cc8.torch2.99.0+cpu-py311-cpu-avx2-export+jit.420061b75948", "420061b75948"),
    ("outside_export", "ExportOne", _EXPORT,
     "ExportOne-weights.m9086cdf7750e.torch2.99.0+cpu-py311-cpu-avx2-export.f857066a6e4a", "f857066a6e4a"),
]


def _safetensors(tensors: dict[str, tuple[str, list[int]]]) -> bytes:
    """A safetensors file of zeros: the key reads only its header (names, dtypes, shapes)."""
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = 4 * (shape[0] * shape[1] if len(shape) == 2 else shape[0])
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + bytes(offset)


class _KeyReached(Exception):
    pass


def _pin_facts(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    """The torch and host facts the environment factors read, fixed: the expected keys hold on every machine."""
    monkeypatch.setattr(torch, "__version__", "2.99.0+cpu")
    monkeypatch.setattr(torch.version, "git_version", "0123456789abcdef")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(platform, "python_version", lambda: "3.11.7")
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(compile_cache.factors, "__version__", "0.1.0")
    for name in [n for n in os.environ if n.startswith(("COMPILE_CACHE_", "TORCHINDUCTOR_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("COMPILE_CACHE_DISABLE", "1")
    monkeypatch.setenv("COMPILE_CACHE_LOG_FILE", str(tmp / "log.txt"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp / "inductor"))

    def stop(self: CompiledRunner, *a: object, **k: object) -> None:
        raise _KeyReached  # setup() derived the key; nothing is restored or compiled

    monkeypatch.setattr(CompiledRunner, "_restore", stop)


def _key_of(module: str, cls: str, source: str, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> CompiledRunner:
    project = tmp / module
    project.mkdir()
    (project / f"{module}.py").write_text(textwrap.dedent(source))
    (project / "outside_net.py").write_text(_NET)
    (project / "requirements.txt").write_text("torch==2.99.0\n")
    (project / "weights").mkdir()
    (project / "weights" / "config.json").write_text('{"hidden": 4}\n')
    (project / "weights" / "model.safetensors").write_bytes(_safetensors({"l.weight": ("F32", [2, 4]),
                                                                         "l.bias": ("F32", [2])}))
    monkeypatch.syspath_prepend(str(project))
    for m in (module, "outside_net"):
        sys.modules.pop(m, None)
    try:
        runner = getattr(importlib.import_module(module), cls)()
        with pytest.raises(_KeyReached):
            runner.setup()
    finally:
        for m in (module, "outside_net"):
            sys.modules.pop(m, None)
    return runner


@pytest.mark.parametrize(("module", "cls", "source", "name", "fingerprint"), _EXPECTED, ids=[e[1] for e in _EXPECTED])
def test_runners_outside_the_repository_keep_their_key(module: str, cls: str, source: str, name: str,
                                                       fingerprint: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _pin_facts(monkeypatch, tmp_path)
    runner = _key_of(module, cls, source, tmp_path, monkeypatch)
    factors = json.dumps(dict(runner.key.factors), indent=1, sort_keys=True)
    assert (runner.key.name, runner.key.fingerprint) == (name, fingerprint), factors
