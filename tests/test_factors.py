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
import types
import typing
from pathlib import Path

import pydantic
import pytest
import torch

import compile_cache.factors
from compile_cache.cli import main
from compile_cache.config import CompileConfig, Settings
from compile_cache.factors import (
    ENVIRONMENT,
    EXCLUDED,
    LEGACY,
    MODEL,
    SETTINGS_EXCLUDED,
    config_factors,
    environment_factors,
    is_environment,
    settings_field_factor,
)
from compile_cache.key import fingerprint_of
from compile_cache.lifecycle import CompiledRunner
from compile_cache.manifest import Manifest, manifest_name
from compile_cache.stores import open_store
from compile_cache.versions import identify

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


def test_inspect_diff_env_finds_no_difference_on_the_machine_that_built_the_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An entry's export spec and parts are the runner's, not the machine's: on the machine that built it,
    ``inspect --diff-env`` lists no difference; an environment factor that differs is listed alone."""
    _pin_facts(monkeypatch, tmp_path)
    keys = [_key_of(m, c, s, tmp_path, monkeypatch).key for m, c, s, _, _ in _EXPECTED]
    assert any("export.spec" in k.factors for k in keys) and any("part.head.compile.mode" in k.factors for k in keys)
    store = open_store(str(tmp_path / "store"))
    for key in keys:
        m = Manifest(key=key.name, model_version=key.model_version, fingerprint=key.fingerprint, factors=key.factors)
        store.put_conditional(manifest_name(key.name), m.to_bytes(), None)
        built_elsewhere = {**key.factors, "cpu.isa": "AVX512"}
        other = m.model_copy(update={"key": f"{key.name}x", "factors": built_elsewhere,
                                     "fingerprint": fingerprint_of(built_elsewhere)})
        store.put_conditional(manifest_name(other.key), other.to_bytes(), None)

    def diff_env(name: str) -> list[str]:
        capsys.readouterr()
        assert main(["--store", str(tmp_path / "store"), "inspect", name, "--diff-env", "--json"]) == 0
        return json.loads(capsys.readouterr().out)["diff_env"]

    for key in keys:
        assert diff_env(key.name) == [], key.name
        assert diff_env(f"{key.name}x") == ["cpu.isa: AVX512 != AVX2"], key.name


# -- every field classified ------------------------------------------------------------------------------------------
def test_every_settings_field_is_a_config_override_or_excluded_by_name() -> None:
    unclassified = []
    for name in Settings.model_fields:
        try:
            settings_field_factor(name)
        except KeyError:
            unclassified.append(name)
    assert not unclassified, f"add to factors.SETTINGS_EXCLUDED (with a reason) or override a CompileConfig field: " \
                             f"{unclassified}"
    assert set(SETTINGS_EXCLUDED) <= set(Settings.model_fields), "a stale name in SETTINGS_EXCLUDED"
    assert set(EXCLUDED) <= set(CompileConfig.model_fields), "a stale name in EXCLUDED"
    assert set(LEGACY) <= set(CompileConfig.model_fields) - set(EXCLUDED)


def _away_from_default(name: str) -> object:
    """A valid value of CompileConfig.<name> other than its default."""
    info = CompileConfig.model_fields[name]
    default = info.get_default(call_default_factory=True)
    annotation = info.annotation
    choices = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(choices) == 1:
        annotation = choices[0]
    if annotation is bool:
        return not default
    if annotation is str:
        return f"{default}x"
    if annotation is int or annotation is float:
        return default + 1
    if typing.get_origin(annotation) is dict:
        return {"x": 1}
    if typing.get_origin(annotation) is typing.Literal:
        return next(v for v in typing.get_args(annotation) if v != default)
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation()  # a model's defaults: away from a default of None
    pytest.fail(f"CompileConfig.{name}: no value away from the default for {annotation!r}; add its type here")


@pytest.mark.parametrize("name", list(CompileConfig.model_fields))
def test_a_field_away_from_its_default_moves_the_fingerprint_unless_excluded(name: str) -> None:
    base, other = CompileConfig(), CompileConfig(**{name: _away_from_default(name)})
    moved = fingerprint_of(config_factors(other)) != fingerprint_of(config_factors(base))
    assert moved == (name not in EXCLUDED), EXCLUDED.get(name, "a factor")


def test_a_field_added_later_is_a_factor_only_away_from_its_default() -> None:
    class Later(CompileConfig):
        later_knob: int = 0

    assert set(config_factors(CompileConfig())) == {f"compile.{n}" for n in LEGACY}  # today's factors, every value
    assert config_factors(Later()) == config_factors(CompileConfig())  # a new field at its default re-keys nothing
    assert config_factors(Later(later_knob=3)) == {**config_factors(CompileConfig()), "compile.later_knob": "3"}
    assert fingerprint_of(config_factors(Later(later_knob=3))) != fingerprint_of(config_factors(Later()))


def test_environment_and_model_factors_are_the_listed_ones(tmp_path: Path) -> None:
    env = environment_factors()
    assert set(env) <= set(ENVIRONMENT) and all(is_environment(k) for k in env)
    (tmp_path / "predict.py").write_text("x = 1\n")
    v = identify(predictor_file=tmp_path / "predict.py", weights_dir=None, requirements_files=[], label="v1",
                 lineage=None, predictor_class="P", key_by_version=True)
    assert set(v.factors) == set(MODEL)
    assert not any(is_environment(k) for k in (*MODEL, *(f"compile.{n}" for n in CompileConfig.model_fields)))
