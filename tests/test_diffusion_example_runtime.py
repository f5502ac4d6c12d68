"""The diffusion example (examples/diffusion) in the real Cog runtime, on the tests' TINY config (served through
DIFFUSION_WEIGHTS_DIR): ``scripts/predict``'s way of running it (CogServer.in_project: cwd the example's dir, its
own input schema) boots cold, then warm in a new container (fresh Inductor dir, the same local store). Warm: every
part served by its strategy with nothing compiled (an export part's package restored, none built; a jit part's FX
graphs all hits), no request-path compile, and the PNG equal to the eager pipeline's within the tolerance
examples/diffusion/README.md states. One cold boot (two small exports) and one warm boot, shared with
tests/test_diffusion_example.py (tests/diffusion_boots.py); about 50 s on 2 busy cores.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import pytest
import torch

from tests.diffusion_boots import PIXEL_TOLERANCE, REQUESTS, example_model

M = example_model()
PARTS = ("decoder", "denoiser")


def png_pixels(output: Any) -> torch.Tensor:
    """The runtime's answer for a Path output (a data: URI, no upload URL given) -> [H, W, 3] int16 pixels."""
    from PIL import Image

    assert isinstance(output, str) and output.startswith("data:image/png;base64,"), str(output)[:80]
    image = Image.open(io.BytesIO(base64.b64decode(output.split(",", 1)[1])))
    assert image.format == "PNG" and image.mode == "RGB"
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(
        image.height, image.width, 3).to(torch.int16)


@pytest.fixture(scope="module")
def boots(diffusion_boots: dict[str, Any]) -> dict[str, Any]:
    return diffusion_boots  # one cold + one warm boot per session (tests/diffusion_boots.py)


def test_cold_boot_compiles_each_part_and_uploads(boots: dict[str, Any]) -> None:
    m = boots["cold"]["metrics"]
    assert m["cache"] == "miss" and m["eager_fallback"] == ""
    assert sorted(m["parts"]) == list(PARTS)
    for name, p in m["parts"].items():
        assert p["strategy"] in ("export", "jit") and not p["eager_fallback"], (name, p)
    exported = sorted(n for n, p in m["parts"].items() if p["strategy"] == "export")
    assert sorted(w["part"] for w in m["warmup"] if "package built" in w["shape"]) == exported
    assert boots["cold"]["log"].count("export: built") == len(exported)
    assert m["bytes_uploaded"] > 0 and m["upload_state"] == "done"


def test_warm_boot_restores_every_part_and_compiles_nothing(boots: dict[str, Any]) -> None:
    cold, warm = boots["cold"]["metrics"], boots["warm"]["metrics"]
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
        assert f"part {name}: {p['strategy']}" in boots["warm"]["logs"]
    assert "export: built" not in boots["warm"]["log"]  # 0 export attempts: every build logs that line
    assert not [w for w in warm["warmup"] if "package built" in w["shape"]]
    assert warm["fxgraph_misses"] == 0 and warm["request_path_compiles"] == 0
    assert warm["bytes_uploaded"] == 0 and warm["bytes_downloaded"] > 0 and warm["eager_fallback"] == ""


@pytest.mark.parametrize("name", ["cold", "warm"])
def test_png_equals_the_eager_pipelines(boots: dict[str, Any], name: str) -> None:
    pipe = M.Pipeline(M.TINY, boots["weights"])
    got = [png_pixels(r["output"]) for r in boots[name]["resps"]]
    for inputs, px in zip(REQUESTS, got, strict=True):
        want = M.to_uint8(M.generate(pipe, inputs["prompt"], inputs["steps"], inputs["seed"])).to(torch.int16)
        assert px.shape == want.shape == (M.TINY.image_size, M.TINY.image_size, 3)
        assert (px - want).abs().max() <= PIXEL_TOLERANCE, inputs
    assert (got[0] - got[1]).abs().max() > PIXEL_TOLERANCE  # the inputs reached the pipeline: not all dropped
