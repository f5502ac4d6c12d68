"""The diffusion example (examples/diffusion/): its eager pipeline, its two compile units under torch.compile and
as the export strategy's packages, its Cog files, and the example in the real Cog runtime. On the TINY config (one
block per side, 8x8 latents, served through DIFFUSION_WEIGHTS_DIR): the example's own size is measured by the bench,
not here.

In the runtime, ``scripts/predict``'s way of running it (CogServer.in_project: cwd the example's dir, its own input
schema) boots cold, then warm in a new container (fresh Inductor dir, the same local store). Warm: every part served
by its strategy with nothing compiled (an export part's package restored, none built; a jit part's FX graphs all
hits), no request-path compile, and the PNG equal to the eager pipeline's within the tolerance. The packages the
unit tests load are the ones that cold boot built: the units are exported once (about 50 s on 2 busy cores).

Tolerance (stated in examples/diffusion/README.md): the PNG's 8-bit pixels differ from the eager pipeline's by at
most 1 (rounding of float differences of ~1e-6), on every pixel.
"""

from __future__ import annotations

import ast
import base64
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from compile_cache.tools.cogrun import CogServer
from tests.conftest import ROOT

EXAMPLE_DIR = ROOT / "examples" / "diffusion"
REF = f"{EXAMPLE_DIR / 'predict.py'}:Runner"
READY_S = 600.0
PIXEL_TOLERANCE = 1  # max |compiled - eager| per 8-bit channel value (examples/diffusion/README.md, "Tolerance")
REQUESTS = [{"prompt": "a red fox", "steps": 3, "seed": 7}, {"prompt": "a lighthouse at dusk", "steps": 2, "seed": 1}]
PARTS = ("decoder", "denoiser")


def example_model() -> ModuleType:
    """examples/diffusion/model.py, loaded by file under its own name (other examples have a model.py too)."""
    name = "diffusion_example_model"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLE_DIR / "model.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


M = example_model()


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return M.Pipeline(M.TINY, tmp_path_factory.mktemp("diffusion-weights"))


def pixels(image: torch.Tensor) -> torch.Tensor:
    return M.to_uint8(image).to(torch.int16)


# -- weights and the eager pipeline ----------------------------------------------------------------------------------
def test_weights_are_made_by_code_from_the_seed(tmp_path: Path) -> None:
    state = torch.random.get_rng_state()
    a = M.ensure_weights(M.TINY, tmp_path / "a")
    b = M.ensure_weights(M.TINY, tmp_path / "b")
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    assert a.read_bytes() == b.read_bytes()  # same seed and config -> the same file, byte for byte
    mtime = a.stat().st_mtime_ns
    assert M.ensure_weights(M.TINY, tmp_path / "a") == a and a.stat().st_mtime_ns == mtime  # written once
    assert a.name != M.EXAMPLE.weights_file(tmp_path / "a").name  # a test's tiny weights never pose as the example's
    other = M.ensure_weights(M.TinyConfig(**{**M.TINY.__dict__, "seed": 1}), tmp_path / "a")
    assert other != a and other.read_bytes() != a.read_bytes()
    # A file drawn for another config under the same name is drawn again, not loaded into the wrong shapes.
    (tmp_path / "c").mkdir()
    other.rename(tmp_path / "c" / a.name)
    assert M.ensure_weights(M.TINY, tmp_path / "c").read_bytes() == a.read_bytes()
    assert a.stat().st_size < 1_000_000  # tiny: nothing large is ever committed (the file is not committed at all)


def test_eager_pipeline_is_deterministic(pipe) -> None:  # type: ignore[no-untyped-def]
    img = M.generate(pipe, "a red fox", 3, seed=7)
    assert img.shape == (1, 3, M.TINY.image_size, M.TINY.image_size)
    png = M.to_png(img)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert M.to_png(M.generate(pipe, "a red fox", 3, seed=7)) == png  # same inputs -> same bytes
    px = pixels(img)
    # Not a saturated image: a tolerance on its pixels means something.
    assert ((px == 0) | (px == 255)).float().mean() < 0.1 and px.float().std() > 10
    for other in (M.generate(pipe, "a red fox", 3, seed=8), M.generate(pipe, "a blue fox", 3, seed=7),
                  M.generate(pipe, "a red fox", 4, seed=7)):
        assert (pixels(other) - px).abs().max() > PIXEL_TOLERANCE  # seed, prompt and steps all matter


# -- torch.compile of the two units ----------------------------------------------------------------------------------
def served(fn):  # type: ignore[no-untyped-def]
    """A unit called as the runner calls its parts: each call in inference mode."""

    def call(*args):  # type: ignore[no-untyped-def]
        with torch.inference_mode():
            return fn(*args)

    return call


@pytest.fixture(scope="module")
def compiled(pipe):  # type: ignore[no-untyped-def]
    """The two units compiled once (a cold compile, ~10-70 s here) and warmed up as the runner does: on the declared
    examples (ordinary tensors), not inside a request. Returns the units and the graphs compiling them took."""
    from compile_cache.compiler import counts

    before = counts()
    denoise, decode = served(torch.compile(pipe.denoiser, dynamic=False)), served(torch.compile(pipe.decoder, dynamic=False))
    latents, t, cond = pipe.denoise_example()
    denoise(latents, t, cond)
    decode(latents)
    return (denoise, decode), counts() - before


@pytest.mark.parametrize(("prompt", "steps", "seed"), [("a red fox", 3, 7), ("a lighthouse at dusk", 6, 123)])
def test_compiled_units_match_eager(pipe, compiled, prompt: str, steps: int, seed: int) -> None:  # type: ignore[no-untyped-def]
    from compile_cache.compiler import counts

    (denoise, decode), warm = compiled
    assert warm.compiles == 2 and warm.graph_breaks == 0  # one graph per unit, whole
    before = counts()
    got = M.generate(pipe, prompt, steps, seed, denoise_step=denoise, decode=decode)
    # Requests' inputs pass the guards warm-up compiled: no recompile for other steps, timesteps, seeds, prompts, nor
    # for the form of the tensors the loop makes (an inference tensor would fail them).
    assert (counts() - before).compiles == 0
    want = M.generate(pipe, prompt, steps, seed)
    assert (got - want).abs().max() < 1e-3
    assert (pixels(got) - pixels(want)).abs().max() <= PIXEL_TOLERANCE


# -- the example in the real Cog runtime, cold then warm ------------------------------------------------------------
@pytest.fixture(scope="module")
def diffusion_boots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """{"weights": dir, "cold"/"warm": {"resps", "logs" (setup logs), "metrics", "log", "inductor" (its cache dir)}}.
    The TINY weights are served through DIFFUSION_WEIGHTS_DIR; one cold boot (two small exports, ~40 s)."""
    d = tmp_path_factory.mktemp("diffusion-runtime")
    M.ensure_weights(M.TINY, d / "weights")  # what `python model.py --config tiny --out DIR` writes
    store = f"file://{d / 'store'}"
    out: dict[str, Any] = {"weights": d / "weights"}
    for name in ("cold", "warm"):
        root = d / name  # a new container: its own empty TORCHINDUCTOR_CACHE_DIR, the same store
        env = {"DIFFUSION_WEIGHTS_DIR": str(d / "weights"), "COMPILE_CACHE_URL": store,
               "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"), "COMPILE_CACHE_METRICS_FILE": str(root / "m.json"),
               "COMPILE_CACHE_LOG_FILE": str(root / "log.txt")}
        b: dict[str, Any] = {"inductor": root / "inductor", "resps": []}
        with CogServer.in_project(REF, env=env, log_path=root / "server.log") as srv:
            srv.wait_ready(READY_S)
            for inputs in REQUESTS:
                code, resp = srv.predict(inputs)
                assert code == 200 and resp["status"] == "succeeded", resp
                b["resps"].append(resp)
            b["logs"] = srv.wait_ready(30)["setup"]["logs"]
            assert srv.shutdown("post") == 0
        b["metrics"] = json.loads((root / "m.json").read_text())
        b["log"] = (root / "log.txt").read_text()
        out[name] = b
    return out


def png_pixels(output: Any) -> torch.Tensor:
    """The runtime's answer for a Path output (a data: URI, no upload URL given) -> [H, W, 3] int16 pixels."""
    from PIL import Image

    assert isinstance(output, str) and output.startswith("data:image/png;base64,"), str(output)[:80]
    image = Image.open(io.BytesIO(base64.b64decode(output.split(",", 1)[1])))
    assert image.format == "PNG" and image.mode == "RGB"
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(
        image.height, image.width, 3).to(torch.int16)


def test_cold_boot_compiles_each_part_and_uploads(diffusion_boots: dict[str, Any]) -> None:
    m = diffusion_boots["cold"]["metrics"]
    assert m["cache"] == "miss" and m["eager_fallback"] == ""
    assert sorted(m["parts"]) == list(PARTS)
    for name, p in m["parts"].items():
        assert p["strategy"] in ("export", "jit") and not p["eager_fallback"], (name, p)
    exported = sorted(n for n, p in m["parts"].items() if p["strategy"] == "export")
    assert sorted(w["part"] for w in m["warmup"] if "package built" in w["shape"]) == exported
    assert diffusion_boots["cold"]["log"].count("export: built") == len(exported)
    assert m["bytes_uploaded"] > 0 and m["upload_state"] == "done"


def test_warm_boot_restores_every_part_and_compiles_nothing(diffusion_boots: dict[str, Any]) -> None:
    cold, warm = diffusion_boots["cold"]["metrics"], diffusion_boots["warm"]["metrics"]
    assert warm["key"] == cold["key"] and warm["cache"] == "hit", warm["cache_reason"]
    # Each part is served as the cold boot served it (no fallback on the warm boot).
    assert {n: p["strategy"] for n, p in warm["parts"].items()} == {n: p["strategy"] for n, p in cold["parts"].items()}
    restored = sorted(w["part"] for w in warm["warmup"] if "package restored" in w["shape"])
    for name, p in warm["parts"].items():
        assert p["request_path_compiles"] == 0 and p["request_path_eager_calls"] == 0 and not p["eager_fallback"]
        if p["strategy"] == "export":
            assert name in restored, (name, warm["warmup"])  # the package came from the store
        else:  # jit: Dynamo traces again, every FX graph is found in the restored cache
            assert p["fxgraph_misses"] == 0 and p["fxgraph_hits"] > 0, (name, p)
        assert f"part {name}: {p['strategy']}" in diffusion_boots["warm"]["logs"]
    assert "export: built" not in diffusion_boots["warm"]["log"]  # 0 export attempts: every build logs that line
    assert not [w for w in warm["warmup"] if "package built" in w["shape"]]
    assert warm["fxgraph_misses"] == 0 and warm["request_path_compiles"] == 0
    assert warm["bytes_uploaded"] == 0 and warm["bytes_downloaded"] > 0 and warm["eager_fallback"] == ""


@pytest.mark.parametrize("name", ["cold", "warm"])
def test_png_equals_the_eager_pipelines(diffusion_boots: dict[str, Any], name: str) -> None:
    pipe = M.Pipeline(M.TINY, diffusion_boots["weights"])
    got = [png_pixels(r["output"]) for r in diffusion_boots[name]["resps"]]
    for inputs, px in zip(REQUESTS, got, strict=True):
        want = M.to_uint8(M.generate(pipe, inputs["prompt"], inputs["steps"], inputs["seed"])).to(torch.int16)
        assert px.shape == want.shape == (M.TINY.image_size, M.TINY.image_size, 3)
        assert (px - want).abs().max() <= PIXEL_TOLERANCE, inputs
    assert (got[0] - got[1]).abs().max() > PIXEL_TOLERANCE  # the inputs reached the pipeline: not all dropped


# -- the export strategy's build -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def packages(pipe, diffusion_boots):  # type: ignore[no-untyped-def]
    """Each unit's package as the export strategy built it (weights kept out) in the runtime's cold boot of the tiny
    config (``diffusion_boots``: the module's one export of the two units), loaded here on this module's
    units: ``{name: (package path, ExportedModel)}``."""
    from compile_cache.export import ExportedModel, ExportSpec

    latents, t, cond = pipe.denoise_example()
    out = {}
    for name, unit, args in (("denoiser", pipe.denoiser, (latents, t, cond)), ("decoder", pipe.decoder, (latents,))):
        (path,) = (diffusion_boots["cold"]["inductor"] / "aoti").glob(f"*-{name}.pt2")
        out[name] = (path, ExportedModel.load(ExportSpec(args), path, unit, keep_weights_out=True))
    return out


@pytest.mark.parametrize("name", ["denoiser", "decoder"])
def test_each_unit_exports_with_its_weights_out(pipe, packages, name: str) -> None:  # type: ignore[no-untyped-def]
    from compile_cache.export import package_metadata

    path, model = packages[name]
    unit = pipe.denoiser if name == "denoiser" else pipe.decoder
    assert package_metadata(path)["compile_cache.keep_weights_out"] == "1"
    # Every parameter and buffer the unit has is a constant loaded from the model, none baked into the code (the
    # load checks that too): GroupNorm and LayerNorm have no num_batches_tracked-style buffers to bake.
    names = {n for n, _ in unit.named_parameters()} | {n for n, _ in unit.named_buffers()}
    assert set(model.runner.constant_fqns) == names
    weights = sum(p.numel() * p.element_size() for p in unit.parameters())
    assert path.stat().st_size < weights + 4_000_000  # code (~2 MB here), not code plus a copy of the weights
    args = pipe.denoise_example() if name == "denoiser" else pipe.denoise_example()[:1]
    with torch.inference_mode():
        assert (model(*args) - unit(*args)).abs().max() < 1e-4


def test_exported_units_match_eager(pipe, packages) -> None:  # type: ignore[no-untyped-def]
    got = M.generate(pipe, "a red fox", 4, seed=3, denoise_step=packages["denoiser"][1], decode=packages["decoder"][1])
    want = M.generate(pipe, "a red fox", 4, seed=3)
    assert (pixels(got) - pixels(want)).abs().max() <= PIXEL_TOLERANCE
    assert packages["denoiser"][1].calls >= 4 and packages["decoder"][1].calls >= 1  # the packages ran, not eager


# -- the example's Cog files -----------------------------------------------------------------------------------------
def test_cog_yaml_matches_schema_and_points_at_the_runner() -> None:
    import jsonschema
    import yaml

    cfg = yaml.safe_load((EXAMPLE_DIR / "cog.yaml").read_text())
    schema = json.loads((ROOT / "tests" / "data" / "cog_config_schema_v1.0.json").read_text())
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in jsonschema.Draft7Validator(schema).iter_errors(cfg)]
    assert not errors, errors
    assert (EXAMPLE_DIR / cfg["build"]["python_requirements"]).is_file()
    path, _, name = cfg["run"].partition(":")
    tree = ast.parse((EXAMPLE_DIR / path).read_text())  # no import: the runner API may not be importable here
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    assert name == "Runner" and [ast.unparse(b) for b in classes[name].bases] == ["CompiledRunner"]
    run = next(n for n in classes[name].body if isinstance(n, ast.FunctionDef) and n.name == "run")
    assert [a.arg for a in run.args.args] == ["self", "prompt", "steps", "seed"]
    assert ast.unparse(run.returns) == "CogPath"


def test_committed_input_schema_matches_run() -> None:
    """The runtime validates inputs against .cog/openapi_schema.json in its working directory and drops fields it
    does not list: the example's own schema must list run()'s inputs with run()'s defaults (regenerate it with
    ``cd examples/diffusion && python ../../scripts/gen_schema.py predict.py:Runner``)."""
    tree = ast.parse((EXAMPLE_DIR / "predict.py").read_text())
    runner = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Runner")
    run = next(n for n in runner.body if isinstance(n, ast.FunctionDef) and n.name == "run")
    defaults = {}
    for arg, default in zip(run.args.args[1:], run.args.defaults, strict=True):
        assert isinstance(default, ast.Call)
        defaults[arg.arg] = next(ast.literal_eval(k.value) for k in default.keywords if k.arg == "default")
    doc = json.loads((EXAMPLE_DIR / ".cog" / "openapi_schema.json").read_text())
    props = doc["components"]["schemas"]["Input"]["properties"]
    assert {k: v["default"] for k, v in props.items()} == defaults
    assert doc["info"]["x-predictor"] == "predict.py:Runner"
    assert doc["components"]["schemas"]["Output"] == {"title": "Output", "type": "string", "format": "uri"}


def test_diffusers_is_pinned_where_it_is_used() -> None:
    import diffusers

    pin = f"diffusers=={diffusers.__version__}"
    assert pin == "diffusers==0.42.1"
    for req in (ROOT / "requirements-dev.txt", EXAMPLE_DIR / "requirements.txt"):
        assert pin in req.read_text().split("\n"), req
    assert "diffusers" not in (ROOT / "requirements.txt").read_text()  # not a dependency of the framework


def test_the_weights_file_is_ignored_by_git() -> None:
    weights = M.EXAMPLE.weights_file(EXAMPLE_DIR / "weights").relative_to(ROOT)
    cp = subprocess.run(["git", "check-ignore", "-q", str(weights)], cwd=ROOT)
    assert cp.returncode == 0, f"{weights} is not ignored: generated weights must never be committed"
