"""Tests for compile_cache.export (AOTInductor "export" strategy).

One tiny model, built twice (weights in / weights out) and shared by the whole
module; each build takes ~10-25 s on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from compile_cache.export import (
    Dim,
    ExportedModel,
    ExportError,
    ExportSpec,
    PackageLoadError,
    ShapeOutOfRange,
    build_package,
    check_shapes,
    load_package,
    package_metadata,
)
from tests.tiny_predictor import TinyCNN, images

REPO = Path(__file__).resolve().parents[1]
D_IN, D_OUT = 16, 8
BATCH = Dim("batch", 1, 32)
SEQ = Dim("seq", 2, 64)
SHAPES = [(1, 2), (3, 5), (4, 10), (32, 64), (7, 33)]


class TinyAttn(torch.nn.Module):
    """A tiny attention block with a mask: (x [B,S,D], mask [B,S]) -> [B,S,D_OUT]."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(D_IN, 3 * D_IN)
        self.out = torch.nn.Linear(D_IN, D_OUT)  # bias has 8 elements: Inductor would inline it
        self.norm = torch.nn.LayerNorm(D_IN)
        self.register_buffer("scale", torch.tensor(D_IN**-0.5))  # 0-d buffer: also inlinable

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        att = (q @ k.transpose(-1, -2)) * self.scale
        att = att.masked_fill(mask[:, None, :] == 0, float("-inf")).softmax(-1)
        return self.out(att @ v)


class DataDependent(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(D_IN, D_OUT)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.lin(x)
        return -self.lin(x)


def make_model(seed: int) -> TinyAttn:
    torch.manual_seed(seed)
    return TinyAttn().eval()


def make_inputs(b: int, s: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1000 + b * 100 + s)
    x = torch.randn(b, s, D_IN, generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[:, s // 2 + 1 :] = 0  # padding on the right, first token always visible
    return x, mask


def make_spec() -> ExportSpec:
    return ExportSpec(make_inputs(4, 10), {0: {0: BATCH, 1: SEQ}, 1: {0: BATCH, 1: SEQ}})


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("inductor_cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(d))
    yield d
    mp.undo()


@pytest.fixture(scope="module")
def built(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("pkgs")
    model = make_model(0)
    spec = make_spec()
    res = {"model": model, "spec": spec, "dir": out}
    for kwo in (False, True):
        path = out / f"tiny_{'out' if kwo else 'in'}.pt2"
        res[kwo] = (path, build_package(model, spec, path, keep_weights_out=kwo))
    return res


# ------------------------------------------------------------------ spec / shapes (no build)


def test_spec_describe_is_stable_and_ignores_dynamic_example_sizes() -> None:
    a = make_spec()
    b = ExportSpec(make_inputs(9, 20), {0: {0: BATCH, 1: SEQ}, 1: {0: BATCH, 1: SEQ}})
    assert a.describe() == b.describe()
    d = a.describe()
    assert json.loads(json.dumps(d, sort_keys=True)) == d
    assert d["args"][0] == {"shape": ["batch", "seq", D_IN], "dtype": "float32", "device": "cpu"}
    assert d["args"][1]["dtype"] == "int64"
    assert d["dims"]["seq"] == {"name": "seq", "min": 2, "max": 64}
    c = ExportSpec(make_inputs(4, 10), {0: {0: BATCH, 1: Dim("seq", 2, 128)}, 1: {0: BATCH, 1: Dim("seq", 2, 128)}})
    assert c.describe() != d


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="two ranges"):
        ExportSpec(make_inputs(4, 10), {0: {0: BATCH}, 1: {0: Dim("batch", 1, 8)}})
    with pytest.raises(ValueError, match="outside"):
        ExportSpec(make_inputs(4, 10), {0: {1: Dim("seq", 11, 64)}})
    with pytest.raises(ValueError, match="dim 3"):
        ExportSpec(make_inputs(4, 10), {0: {3: BATCH}})


def test_check_shapes_messages() -> None:
    spec = make_spec()
    check_shapes(spec, make_inputs(1, 2))
    check_shapes(spec, make_inputs(32, 64))
    with pytest.raises(ShapeOutOfRange, match=r"arg 0 dim 0 \(batch\): size 33 outside range \[1, 32\]"):
        check_shapes(spec, make_inputs(33, 10))
    with pytest.raises(ShapeOutOfRange, match=r"arg 0 dim 1 \(seq\): size 1 outside range \[2, 64\]"):
        check_shapes(spec, make_inputs(4, 1))
    x, m = make_inputs(4, 10)
    with pytest.raises(ShapeOutOfRange, match=r"arg 0 dim 2: size 17, but this dim is static \(must be 16\)"):
        check_shapes(spec, (torch.randn(4, 10, 17), m))
    with pytest.raises(ShapeOutOfRange, match=r"arg 1 dim 1 \(seq\): size 11 differs from arg 0 dim 1 size 10"):
        check_shapes(spec, (x, torch.ones(4, 11, dtype=torch.long)))
    with pytest.raises(ShapeOutOfRange, match="arg 1: dtype torch.int32"):
        check_shapes(spec, (x, m.int()))
    with pytest.raises(ShapeOutOfRange, match="expected 2 args"):
        check_shapes(spec, (x,))


# ------------------------------------------------------------------ builds


def test_build_info(built: dict) -> None:
    for kwo in (False, True):
        path, info = built[kwo]
        assert path.exists() and info["package_bytes"] == path.stat().st_size > 0
        assert info["export_s"] > 0 and info["compile_s"] > 0
        assert info["keep_weights_out"] is kwo
        assert set(info["constant_fqns"]) == {"qkv.weight", "qkv.bias", "out.weight", "out.bias", "norm.weight",
                                              "norm.bias", "scale"}
        meta = package_metadata(path)
        assert meta["compile_cache.keep_weights_out"] == ("1" if kwo else "0")
        assert json.loads(meta["compile_cache.spec"]) == built["spec"].describe()
        assert meta["AOTI_DEVICE_KEY"] == "cpu" and meta["AOTI_CPU_ISA"]
    assert not [p for p in os.listdir(built["dir"]) if p.startswith(".build-")]  # no temp files left


def test_weights_in_matches_eager(built: dict) -> None:
    model, spec = built["model"], built["spec"]
    em = ExportedModel.load(spec, built[False][0], keep_weights_out=False)
    for b, s in SHAPES:
        x, m = make_inputs(b, s)
        with torch.no_grad():
            ref = model(x, m)
        out = em(x, m)
        assert out.shape == (b, s, D_OUT) and out.dtype == torch.float32
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with torch.inference_mode():  # same inside inference mode
        x, m = make_inputs(5, 9)
        torch.testing.assert_close(em(x, m), model(x, m), atol=1e-5, rtol=1e-5)
    assert em.calls == len(SHAPES) + 1


def test_non_contiguous_input_is_handled(built: dict) -> None:
    model, spec = built["model"], built["spec"]
    em = ExportedModel.load(spec, built[False][0], keep_weights_out=False)
    x, m = make_inputs(6, 12)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    assert not xt.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(em(xt, m), model(x, m), atol=1e-5, rtol=1e-5)


def test_out_of_range_raises(built: dict) -> None:
    em = ExportedModel.load(built["spec"], built[False][0], keep_weights_out=False)
    with pytest.raises(ShapeOutOfRange, match=r"arg 0 dim 1 \(seq\): size 65 outside range \[2, 64\]"):
        em(*make_inputs(2, 65))
    assert em.calls == 0


def test_weights_out_uses_the_models_weights(built: dict) -> None:
    spec = built["spec"]
    other = make_model(seed=1)  # different weights, including the small inlinable ones
    with torch.no_grad():
        other.scale.fill_(0.3)
    for share in (True, False):
        em = ExportedModel.load(spec, built[True][0], other, keep_weights_out=True, share_weights=share)
        assert sorted(em.runner.constant_fqns) == built[True][1]["constant_fqns"]
        for b, s in SHAPES:
            x, m = make_inputs(b, s)
            with torch.no_grad():
                torch.testing.assert_close(em(x, m), other(x, m), atol=1e-5, rtol=1e-5)
    # and the original model's weights give the original results
    em0 = ExportedModel.load(spec, built[True][0], built["model"], keep_weights_out=True)
    x, m = make_inputs(3, 7)
    with torch.no_grad():
        torch.testing.assert_close(em0(x, m), built["model"](x, m), atol=1e-5, rtol=1e-5)


def test_weights_out_load_errors(built: dict) -> None:
    path = built[True][0]
    with pytest.raises(PackageLoadError, match="needs the model"):
        load_package(path, None, keep_weights_out=True)
    with pytest.raises(PackageLoadError, match="built with keep_weights_out=True"):
        load_package(path, built["model"], keep_weights_out=False)
    with pytest.raises(PackageLoadError, match="no tensor for these package constants"):
        load_package(path, torch.nn.Linear(2, 2), keep_weights_out=True)


def test_weights_out_refuses_a_package_with_inlined_weights(built: dict) -> None:
    # Without always_keep_tensor_constants Inductor inlines out.bias (8 values) and the 0-d `scale`
    # into the C++ code; such a package must not pretend to take its weights from the model.
    path = built["dir"] / "inlined.pt2"
    build_package(built["model"], built["spec"], path, keep_weights_out=True,
                  inductor_configs={"always_keep_tensor_constants": False})
    with pytest.raises(PackageLoadError, match=r"baked into the package's code") as ei:
        load_package(path, make_model(1), keep_weights_out=True)
    assert "out.bias" in str(ei.value) and "scale" in str(ei.value)


def test_tiny_package_is_mostly_code(built: dict) -> None:
    # the tiny model's weights are ~3 KB; the package is mostly code either way
    assert abs(built[True][1]["package_bytes"] - built[False][1]["package_bytes"]) < 200_000


def test_corrupt_package_raises(tmp_path: Path) -> None:
    p = tmp_path / "bad.pt2"
    p.write_bytes(b"not a zip")
    with pytest.raises(PackageLoadError):
        load_package(p, keep_weights_out=False)


def test_export_failure_raises_export_error(tmp_path: Path) -> None:
    spec = make_spec()
    with pytest.raises(ExportError) as ei:
        build_package(DataDependent().eval(), spec, tmp_path / "dd.pt2", keep_weights_out=False)
    assert ei.value.__cause__ is not None
    assert "torch.export.export failed" in str(ei.value)
    assert not (tmp_path / "dd.pt2").exists()


# ------------------------------------------------------------------ BatchNorm (unread buffers, inlinable stats)


class ReadsCounter(torch.nn.Module):
    """Reads a 0-d int64 buffer like ``num_batches_tracked``: a read one must stay expected from the model."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(D_IN).eval()
        self.register_buffer("steps", torch.tensor(3, dtype=torch.long))
        self.register_buffer("unused", torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x) * self.steps


def test_split_constants_leaves_out_only_what_the_graph_never_reads() -> None:
    from compile_cache.export import _split_constants

    x = torch.randn(4, D_IN)
    ep = torch.export.export(ReadsCounter().eval(), (x,))
    read, unread = _split_constants(ep)
    assert unread == ["bn.num_batches_tracked", "unused"]
    assert read == ["bn.bias", "bn.running_mean", "bn.running_var", "bn.weight", "steps"]
    cnn_read, cnn_unread = _split_constants(torch.export.export(TinyCNN().eval(), (images(2),)))
    assert cnn_unread == ["b1.num_batches_tracked", "b2.num_batches_tracked"]
    assert len(cnn_read) == 14


@pytest.fixture(scope="module")
def bn_spec() -> ExportSpec:
    return ExportSpec((images(3),), {0: {0: Dim("batch", 1, 16)}})


def test_batchnorm_cnn_exports_with_weights_out(cache_dir: Path, tmp_path: Path, bn_spec: ExportSpec) -> None:
    path = tmp_path / "cnn.pt2"
    info = build_package(TinyCNN(0).eval(), bn_spec, path, keep_weights_out=True)
    assert info["unused_constant_fqns"] == ["b1.num_batches_tracked", "b2.num_batches_tracked"]
    assert not any("num_batches_tracked" in n for n in info["constant_fqns"])
    other = TinyCNN(seed=1).eval()  # other conv weights, BatchNorm stats and affine weights
    em = ExportedModel.load(bn_spec, path, other, keep_weights_out=True)
    assert sorted(em.runner.constant_fqns) == info["constant_fqns"]  # every read weight comes from the model
    for b in (1, 3, 16):
        with torch.no_grad():
            ref = other(images(b))
        assert not torch.allclose(ref, TinyCNN(0).eval()(images(b)))  # the weights really differ
        torch.testing.assert_close(em(images(b)), ref, atol=1e-5, rtol=1e-5)


def test_batchnorm_weights_baked_in_are_still_refused(cache_dir: Path, tmp_path: Path, bn_spec: ExportSpec) -> None:
    # Without always_keep_tensor_constants Inductor inlines BatchNorm's 8-element weights and stats, which the
    # graph reads: such a package is refused, naming them (and not the unread num_batches_tracked).
    path = tmp_path / "cnn-inlined.pt2"
    build_package(TinyCNN(0).eval(), bn_spec, path, keep_weights_out=True,
                  inductor_configs={"always_keep_tensor_constants": False})
    with pytest.raises(PackageLoadError, match=r"baked into the package's code") as ei:
        load_package(path, TinyCNN(1).eval(), keep_weights_out=True)
    assert "b1.running_var" in str(ei.value) and "num_batches_tracked" not in str(ei.value)


_CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    t0 = time.perf_counter()
    import torch
    sys.path.insert(0, sys.argv[1])
    from compile_cache.export import ExportedModel
    from tests import test_export as T
    spec = T.make_spec()
    kwo = sys.argv[3] == "1"
    model = T.make_model(0)
    t1 = time.perf_counter()
    em = ExportedModel.load(spec, sys.argv[2], model if kwo else None, keep_weights_out=kwo)
    load_s = time.perf_counter() - t1
    diffs = []
    with torch.inference_mode():
        for b, s in T.SHAPES:
            x, m = T.make_inputs(b, s)
            diffs.append((em(x, m) - model(x, m)).abs().max().item())
    from torch._dynamo.utils import counters
    print(json.dumps({"unique_graphs": counters["stats"]["unique_graphs"], "max_diff": max(diffs),
                      "load_s": load_s, "cache_files": sorted(os.listdir(os.environ["TORCHINDUCTOR_CACHE_DIR"]))}))
    """
)


@pytest.mark.parametrize("kwo", [False, True], ids=["weights_in", "weights_out"])
def test_fresh_process_runs_without_dynamo(built: dict, tmp_path: Path, kwo: bool) -> None:
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    fresh = tmp_path / "fresh_cache"
    fresh.mkdir()
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(fresh))
    proc = subprocess.run(
        [sys.executable, str(script), str(REPO), str(built[kwo][0]), "1" if kwo else "0"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["unique_graphs"] == 0
    assert res["max_diff"] < 1e-5
    assert res["cache_files"] == []  # loading compiles nothing into the Inductor cache dir
    assert res["load_s"] < 10
