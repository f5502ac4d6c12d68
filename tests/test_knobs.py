"""Compile knobs: memory_format, sdpa_backend, mode reduce-overhead and max-autotune, on CPU.

Each knob: validated (a wrong value names the accepted ones), overridable from the environment, part of the cache
key, applied by compiler.py. The compiling tests use tiny modules; max-autotune runs in fresh processes with fresh
Inductor cache dirs (Inductor memoises its autotune-cache path per process).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from compile_cache.compiler import CompiledModel, Example, compile_model, sdpa_backend
from compile_cache.config import CompileConfig, Settings
from compile_cache.errors import ConfigError
from compile_cache.factors import environment_factors
from compile_cache.key import CacheKey, diff_factors
from compile_cache.snapshot import scan
from tests.tiny_predictor import TinyMLP, inputs

ROOT = Path(__file__).resolve().parent.parent
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU degradation path")


@pytest.fixture
def warnings_log() -> Iterator[list[str]]:
    """Messages the library logger emits (it may not propagate once the lifecycle configured it)."""
    got: list[str] = []

    class H(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            got.append(record.getMessage())

    h, lg = H(level=logging.WARNING), logging.getLogger("compile_cache")
    lg.addHandler(h)
    yield got
    lg.removeHandler(h)


class Conv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c = torch.nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.c(x)).mean((2, 3))


class Attn(torch.nn.Module):
    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, q, q) * 2


# -- config: validation, env overrides, key -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "field,value,accepted",
    [
        ("memory_format", "nhwc", "contiguous, channels_last"),
        ("memory_format", None, "contiguous, channels_last"),
        ("sdpa_backend", "flash2", "None, math, flash, efficient, cudnn"),
        ("mode", "turbo", "reduce-overhead, max-autotune"),
    ],
)
def test_wrong_knob_value_names_the_accepted_ones(field: str, value: object, accepted: str) -> None:
    with pytest.raises(ValueError, match=accepted):
        CompileConfig(**{field: value})


@pytest.mark.parametrize(
    "var,value,accepted",
    [
        ("COMPILE_CACHE_MEMORY_FORMAT", "nchw", "contiguous | channels_last"),
        ("COMPILE_CACHE_SDPA_BACKEND", "fast", "math | flash | efficient | cudnn | default"),
    ],
)
def test_wrong_knob_env_value_names_variable_and_accepted(var: str, value: str, accepted: str) -> None:
    with pytest.raises(ConfigError) as e:
        Settings.from_env({var: value})
    assert var in str(e.value) and accepted in str(e.value)


def test_knob_env_overrides() -> None:
    base = CompileConfig(sdpa_backend="math")
    c = base.with_overrides(
        Settings.from_env({"COMPILE_CACHE_MEMORY_FORMAT": "Channels_Last", "COMPILE_CACHE_SDPA_BACKEND": "flash"})
    )
    assert (c.memory_format, c.sdpa_backend) == ("channels_last", "flash")
    assert base.with_overrides(Settings.from_env({"COMPILE_CACHE_SDPA_BACKEND": "default"})).sdpa_backend is None
    assert base.with_overrides(Settings.from_env({})) == base


def test_knobs_change_the_key() -> None:
    def factors(**kw: object) -> dict[str, str]:
        return environment_factors(CompileConfig(**kw).cache_factors())  # type: ignore[arg-type]

    base = factors()
    assert diff_factors(base, factors(memory_format="channels_last")) == [
        "compile.memory_format: contiguous != channels_last"
    ]
    assert diff_factors(base, factors(sdpa_backend="math")) == ["compile.sdpa_backend: None != math"]
    assert CacheKey("v", base).name != CacheKey("v", factors(mode="max-autotune")).name


# -- memory_format ------------------------------------------------------------------------------------------------
def test_channels_last_converts_4d_inputs_on_every_call() -> None:
    seen: list[tuple[bool, ...]] = []

    def spy(*args: object, **kwargs: object) -> None:
        seen.append(
            tuple(
                x.is_contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x.is_contiguous()
                for x in (*args, *kwargs.values())
                if isinstance(x, torch.Tensor)
            )
        )

    m = CompiledModel(spy, spy, CompileConfig(memory_format="channels_last"))
    x4, x2 = torch.randn(2, 3, 4, 5), torch.randn(2, 3)
    m.warm_up([Example((x4, x2, 7), {"mask": x4})])
    m(x4, x2, 7, mask=x4)
    assert seen == [(True, True, True)] * 2
    assert not x4.is_contiguous(memory_format=torch.channels_last)  # the caller's tensor is left alone

    seen.clear()
    CompiledModel(spy, spy, CompileConfig())(x4)  # contiguous: nothing converted
    assert seen == [(False,)]


def test_channels_last_model_compiles_and_requests_match_the_guards() -> None:
    ref = Conv().eval()
    model = Conv().eval()
    cfg = CompileConfig(memory_format="channels_last", dynamic=False)
    fn, why = compile_model(model, cfg)
    assert why == "" and model.c.weight.is_contiguous(memory_format=torch.channels_last)
    m = CompiledModel(fn, model, cfg)
    x = torch.randn(1, 3, 8, 8)
    timings, why = m.warm_up([Example((x,))])
    assert why == "" and len(timings) == 1
    # Callers pass either layout: both are converted to what warm-up compiled for, so nothing recompiles.
    out = m(x)
    out_cl = m(x.contiguous(memory_format=torch.channels_last))
    assert m.request_path_compiles == 0
    with torch.no_grad():
        expected = ref(x)
    assert torch.allclose(out, expected, atol=1e-5) and torch.allclose(out_cl, expected, atol=1e-5)


def test_without_conversion_a_stride_change_recompiles() -> None:
    """Why inputs are converted on every call: Dynamo guards on strides (aot_eager keeps it cheap)."""
    torch._dynamo.reset()
    cfg = CompileConfig(backend="aot_eager", dynamic=False)
    model = Conv().eval()
    fn, _ = compile_model(model, cfg)
    m = CompiledModel(fn, model, cfg)
    x = torch.randn(1, 3, 8, 8)
    m.warm_up([Example((x,))])
    m(x.contiguous(memory_format=torch.channels_last))
    assert m.request_path_compiles == 1


# -- sdpa_backend -------------------------------------------------------------------------------------------------
def test_sdpa_backend_is_active_during_calls() -> None:
    flags: list[tuple[bool, bool]] = []

    def spy(*args: object) -> None:
        flags.append((torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()))

    before = (torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled())
    m = CompiledModel(spy, spy, CompileConfig(sdpa_backend="math"))
    m.warm_up([Example(())])
    m()
    assert flags == [(True, False)] * 2
    assert (torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()) == before


def test_failed_compiled_warm_up_serves_eager_without_the_kernel_restriction() -> None:
    """A pinned kernel that cannot run the shapes (flash with an unsupported head size on GPU) fails the compiled
    warm-up; eager then runs with torch's own choice, so predictions stay correct."""
    flags: list[bool] = []

    def broken(*args: object) -> None:
        raise RuntimeError("No available kernel. Aborting execution.")

    def eager(*args: object) -> None:
        flags.append(torch.backends.cuda.flash_sdp_enabled())

    m = CompiledModel(broken, eager, CompileConfig(sdpa_backend="math"))
    _, why = m.warm_up([Example(())])
    assert "No available kernel" in why and "attention kernel left to torch" in why
    m()
    assert flags == [True] and not m.is_compiled


@CPU_ONLY
@pytest.mark.parametrize("name", ["efficient", "cudnn"])
def test_gpu_only_sdpa_backend_degrades_on_cpu(name: str, warnings_log: list[str]) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(RuntimeError, match="No viable backend"):
        with sdpa_kernel(getattr(SDPBackend, name.upper() + "_ATTENTION")):
            F.scaled_dot_product_attention(q, q, q)  # what torch 2.13 does on CPU if we passed it through
    cfg = CompileConfig(sdpa_backend=name)  # type: ignore[arg-type]
    m = CompiledModel(Attn(), Attn(), cfg)
    assert torch.allclose(m(q), Attn()(q))
    assert any(f"sdpa_backend={name!r} needs a GPU" in w for w in warnings_log)


@CPU_ONLY
def test_flash_and_math_run_on_cpu() -> None:
    from torch.nn.attention import SDPBackend

    assert sdpa_backend(CompileConfig(sdpa_backend="flash")) == SDPBackend.FLASH_ATTENTION
    assert sdpa_backend(CompileConfig(sdpa_backend="math")) == SDPBackend.MATH
    q = torch.randn(1, 2, 8, 16)
    for name in ("flash", "math"):
        m = CompiledModel(Attn(), Attn(), CompileConfig(sdpa_backend=name))  # type: ignore[arg-type]
        assert torch.allclose(m(q), Attn()(q), atol=1e-6)


def test_math_sdpa_lets_inductor_fuse_attention() -> None:
    """Default on CPU: the compiled graph calls the flash kernel as an opaque op. math: Inductor sees the
    decomposition (bmm, softmax) and generates its own fused C++ kernels. Default first, same cache dir: without
    the cache-key tag, torch 2.13 would hand the math run the cached flash graph (pytorch/pytorch#185449)."""
    from torch._inductor.utils import run_and_get_code

    q = torch.randn(1, 4, 32, 16)
    code = {}
    for name in (None, "math"):
        torch._dynamo.reset()
        cfg = CompileConfig(sdpa_backend=name, dynamic=False)  # type: ignore[arg-type]
        fn, _ = compile_model(Attn(), cfg)
        m = CompiledModel(fn, Attn(), cfg)
        out, src = run_and_get_code(m, q)
        assert torch.allclose(out, Attn()(q), atol=1e-5)
        code[name] = "\n".join(src)
    assert "_scaled_dot_product_flash_attention_for_cpu" in code[None]
    assert "_scaled_dot_product_flash_attention_for_cpu" not in code["math"]
    assert "softmax" in code["math"] and "cpp_fused" in code["math"]


# -- mode ---------------------------------------------------------------------------------------------------------
@CPU_ONLY
def test_reduce_overhead_degrades_to_default_on_cpu(warnings_log: list[str]) -> None:
    torch._dynamo.reset()
    cfg = CompileConfig(mode="reduce-overhead", dynamic=False)
    model = TinyMLP().eval()
    fn, why = compile_model(model, cfg)
    assert why == "" and fn is not model
    assert any("reduce-overhead" in w and "no GPU" in w for w in warnings_log)
    m = CompiledModel(fn, model, cfg)
    _, why = m.warm_up([Example((inputs(4),))])
    assert why == ""
    with torch.no_grad():
        assert torch.allclose(m(inputs(4)), TinyMLP()(inputs(4)), atol=1e-5)
    assert m.request_path_compiles == 0


# One process = one container boot. Freezing makes the weights constants, which is what lets Inductor's CPU GEMM
# template compete with ATen/MKL under max-autotune (torch 2.13: use_cpp_gemm_template needs a constant weight);
# it is set on torch's config because options={"freezing": True} did not take effect (measured). Freezing
# bypasses the FX-graph cache (measured: this test shows it), so the second boot recompiles: what it must not redo is the benchmarking.
_AUTOTUNE_BOOT = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import torch._inductor.config as ic
from torch._dynamo.utils import counters
from compile_cache.compiler import CompiledModel, Example, compile_model
from compile_cache.config import CompileConfig
from tests.tiny_predictor import TinyMLP, inputs

ic.freezing = True
cfg = CompileConfig(mode="max-autotune", dynamic=False)
model = TinyMLP().eval()
fn, why = compile_model(model, cfg)
m = CompiledModel(fn, model, cfg)
_, why2 = m.warm_up([Example((inputs(4),))])
ok = torch.allclose(m(inputs(4)), TinyMLP().eval()(inputs(4)).detach(), atol=1e-5)
bench = {k: v for k, v in counters["inductor"].items() if k.startswith(("select_algorithm", "benchmarking"))}
print("RESULT " + json.dumps({"why": why or why2, "ok": ok, "bench": bench}))
"""


def _autotune_boot(cache_dir: Path) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}
    cp = subprocess.run(
        [sys.executable, "-c", _AUTOTUNE_BOOT, str(ROOT)], env=env, capture_output=True, text=True, timeout=600
    )
    line = next((ln for ln in cp.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert cp.returncode == 0 and line, cp.stderr[-3000:]
    r = json.loads(line[len("RESULT ") :])
    assert r["why"] == "" and r["ok"], r
    return r


def test_max_autotune_results_are_shipped_and_reused(tmp_path: Path) -> None:
    first = tmp_path / "boot1"
    r1 = _autotune_boot(first)
    assert r1["bench"].get("select_algorithm_autotune", 0) > 0, r1  # GEMM choices were benchmarked

    shipped = scan({"inductor": first})
    # The benchmark timings: <cache dir>/cache/<system hash>, one JSON file (on GPU, Triton's per-kernel
    # *.best_config files sit next to the kernels in <cache dir>/<2 chars>/).
    timings = [n for n in shipped if n.startswith("inductor/cache/")]
    assert len(timings) == 1, sorted(shipped)
    assert json.loads(shipped[timings[0]].read_text())["cache"]
    left_out = {
        p.relative_to(first).as_posix()
        for p in first.rglob("*")
        if p.is_file() and f"inductor/{p.relative_to(first).as_posix()}" not in shipped
    }
    assert all(p.startswith("locks/") for p in left_out), left_out

    # A new container restored from exactly what a snapshot ships does not benchmark again.
    second = tmp_path / "boot2"
    for name, src in shipped.items():
        dest = second / name.partition("/")[2]
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)
    r2 = _autotune_boot(second)
    assert not any(k.startswith("benchmarking") for k in r2["bench"]), r2


def test_an_inference_tensor_input_is_copied_and_the_loss_of_its_writes_is_said_once(
        caplog: pytest.LogCaptureFixture) -> None:
    """A part's in-place write to an input made under inference mode lands in the copy the call gets (a KV cache
    made that way stops being updated): the first such call says so, and a part that only reads such an input
    does not."""
    def write(cache: torch.Tensor) -> torch.Tensor:
        cache.add_(1)
        return cache

    m = CompiledModel(write, lambda cache: cache, CompileConfig(), name="decode")
    with torch.inference_mode():
        inf = torch.zeros(2)
    ordinary = torch.zeros(2)
    with caplog.at_level(logging.WARNING, logger="compile_cache"):
        m(inf)
        m(inf)
        m(ordinary)
    assert inf.tolist() == [0.0, 0.0] and ordinary.tolist() == [1.0, 1.0]
    warned = [r for r in caplog.records if "made under torch.inference_mode" in r.getMessage()]
    assert len(warned) == 1 and "'decode'" in warned[0].getMessage()

    # An inference-tensor input the part only reads (token ids, another part's output) is copied too, silently.
    caplog.clear()
    reader = CompiledModel(lambda ids: ids * 2, lambda ids: ids * 2, CompileConfig(), name="prefill")
    with caplog.at_level(logging.WARNING, logger="compile_cache"):
        assert reader(inf).tolist() == [0.0, 0.0]
    assert not [r for r in caplog.records if "made under torch.inference_mode" in r.getMessage()]
