"""The CLI, run as users run it (``python -m compile_cache ...`` in a subprocess), against both stores.

Entries are seeded without compiling: upload.Uploader on a fake cache dir of a few small files. Only the ``warm`` test
compiles (the tiny predictor, ~20 s), and then boots a fresh "container" in the real Cog runtime that must report a
cache hit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from compile_cache.entry import Entry
from compile_cache.key import CacheKey
from compile_cache.manifest import Manifest, manifest_name
from compile_cache.restore import read_manifest, restore
from compile_cache.stores import LocalStore, Store
from compile_cache.tools.cogrun import CogServer
from compile_cache.trust import TrustPolicy
from compile_cache.upload import Uploader
from tests.conftest import ROOT, precompiled
from tests.s3server import apply_s3_env

PREDICTOR = "tests/tiny_predictor.py:Predictor"  # as cog.yaml would name it
FACTORS = {
    "compile_cache.format": "1",
    "python": "cpython-3.11.7",
    "platform": "Linux-x86_64",
    "torch": "2.13.0",
    "cpu.isa": "avx512",
    "device": "cpu",
    "compile.strategy": "jit",
}


# -- helpers ---------------------------------------------------------------------------------------------------------
def store_url(store: Store) -> str:
    # An S3Store's display url carries "(endpoint ...)"; the s3 fixtures put the real URL in the environment.
    return store.url if isinstance(store, LocalStore) else os.environ["COMPILE_CACHE_URL"]


def cli(store: Store | None, *args: str, flag: bool = False, env: dict[str, str] | None = None, timeout: float = 120):
    """Run ``python -m compile_cache ARGS`` with the store in COMPILE_CACHE_URL (or ``--store`` when ``flag``)."""
    full = {**os.environ, "PYTHONPATH": str(ROOT), "COMPILE_CACHE_PROGRESS": "0"}
    full.pop("COMPILE_CACHE_URL", None)
    argv = list(args)
    if store is not None:
        if flag:
            argv = ["--store", store_url(store), *argv]
        else:
            full["COMPILE_CACHE_URL"] = store_url(store)
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "compile_cache", *argv], cwd=ROOT, env=full, capture_output=True, text=True,
        timeout=timeout,
    )


def fake_cache(base: Path, files: dict[str, bytes]) -> Path:
    root = base / f"cache-{uuid.uuid4().hex[:8]}"
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.utime(p, (1_700_000_000, 1_700_000_000))  # equal mtimes: equal files pack into the same object
    return root


def seed(store: Store, version: str, root: Path, *, signing_key: bytes | None = None, **factors: str) -> str:
    f = {**FACTORS, **factors}
    key = CacheKey(version, f).name
    r = Uploader(Entry(store, key, {"inductor": root}, f, TrustPolicy(signing_key)), version).upload()
    assert r is not None and not r.error, r
    return key


def age(store: Store, key: str, seconds: float) -> None:
    """Pretend ``key`` was last updated ``seconds`` ago."""
    m, token = read_manifest(store, key)
    assert m is not None
    old = m.model_copy(update={"updated_at": time.time() - seconds, "created_at": time.time() - seconds})
    store.put_conditional(manifest_name(key), old.to_bytes(), token)


def names(store: Store) -> set[str]:
    return {o.name for o in store.list()}


def put_orphan(store: Store, tmp_path: Path) -> str:
    """An object no manifest lists, as a crashed upload leaves behind."""
    src = tmp_path / "orphan.bin"
    src.write_bytes(os.urandom(300))
    name = f"objects/ee/{'e' * 64}.tar.zst"
    store.put_immutable(name, src)
    return name


@pytest.fixture
def two_versions(store: Store, tmp_path: Path) -> dict[str, str]:
    """v1 (older) = shared object + one of its own; v2 (newer) = the shared object only."""
    shared = fake_cache(tmp_path, {"fxgraph/ab/graph1": b"g" * 500, "cpp/k1.so": b"k" * 800})
    own = fake_cache(tmp_path, {"cpp/only_v1.so": b"v" * 700})
    k1 = seed(store, "v1", shared)
    seed(store, "v1", own)  # a second segment for the same entry
    k2 = seed(store, "v2", shared)
    age(store, k1, 3 * 86400)
    m1, _ = read_manifest(store, k1)
    m2, _ = read_manifest(store, k2)
    assert m1 and m2 and len(m1.segments) == 2 and len(m2.segments) == 1
    assert m2.segments[0].object in {s.object for s in m1.segments}  # really shared
    only_v1 = next(s.object for s in m1.segments if s.object != m2.segments[0].object)
    return {"k1": k1, "k2": k2, "shared": m2.segments[0].object, "only_v1": only_v1}


# -- ls / inspect ----------------------------------------------------------------------------------------------------
def test_ls_table_and_json(store: Store, two_versions: dict[str, str]) -> None:
    cp = cli(store, "ls", flag=True)
    assert cp.returncode == 0, cp.stderr
    lines = cp.stdout.splitlines()
    assert lines[0].split()[:7] == ["VERSION", "ENVIRONMENT", "FINGERPRINT", "SIZE", "OBJECTS", "FILES", "UPDATED"]
    row1 = next(ln for ln in lines if two_versions["k1"] in ln)
    assert row1.split()[0] == "v1" and "torch2.13.0-py311-cpu-avx512-jit" in row1
    assert "2 entries" in lines[-1]

    cp = cli(store, "ls", "--json")
    assert cp.returncode == 0, cp.stderr
    rows = {r["key"]: r for r in json.loads(cp.stdout)}
    assert set(rows) == {two_versions["k1"], two_versions["k2"]}
    r1 = rows[two_versions["k1"]]
    m1 = Manifest.from_bytes(store.read(manifest_name(two_versions["k1"])))
    assert r1["model_version"] == "v1" and r1["objects"] == 2 and r1["files"] == 3
    assert r1["bytes"] == sum(s.size for s in m1.segments) and r1["signed"] is False
    assert r1["updated_at"] < rows[two_versions["k2"]]["updated_at"]


def test_ls_empty_store(store: Store) -> None:
    cp = cli(store, "ls", "--json")
    assert cp.returncode == 0 and json.loads(cp.stdout) == []


def test_inspect_shows_factors_segments_and_writers(store: Store, two_versions: dict[str, str]) -> None:
    k1 = two_versions["k1"]
    cp = cli(store, "inspect", k1)
    assert cp.returncode == 0, cp.stderr
    out = cp.stdout
    assert f"key            {k1}" in out and "model version  v1" in out and "signed         no" in out
    factor_lines = out.split("factors\n")[1].split("segments")[0].splitlines()
    assert [ln.split()[0] for ln in factor_lines] == sorted(FACTORS)  # every factor, sorted, one per line
    assert any(ln.split() == ["torch", "2.13.0"] for ln in factor_lines)
    segs = [ln for ln in out.splitlines() if ln.strip().startswith("objects/")]
    assert len(segs) == 2 and all("written by " in s and ":" in s for s in segs)
    assert two_versions["only_v1"] in out
    assert "parts covered  (not listed" in out  # seeded by an uploader that compiled no part

    cp = cli(store, "inspect", "v2.", "--json")  # a unique prefix is enough
    assert cp.returncode == 0, cp.stderr
    body = json.loads(cp.stdout)
    assert body["key"] == two_versions["k2"] and body["factors"] == FACTORS and body["signed"] is False
    assert body["parts"] == {}
    assert body["segments"][0]["written_by"] and body["segments"][0]["written_at"] > 0


def test_inspect_signed_and_missing(store: Store, tmp_path: Path) -> None:
    key = seed(store, "sig", fake_cache(tmp_path, {"a/b": b"x"}), signing_key=b"k")
    cp = cli(store, "inspect", key)
    assert cp.returncode == 0 and "signed         yes" in cp.stdout
    cp = cli(store, "inspect", "nope")
    assert cp.returncode == 1 and "no entry 'nope'" in cp.stderr and "Traceback" not in cp.stderr


def test_inspect_shows_recorded_failures_by_what_failed(store: Store, tmp_path: Path) -> None:
    from compile_cache.failures import Failure

    rec = Failure(stage="export", error="ExportError", reason="torch.export.export failed for Net: boom",
                  detail="torch.export.export failed for Net: boom\n...", torch="2.13.0", at=1_700_000_000.0)
    pre = Failure(stage="precompile", error="RoundTripError", reason="it differs from eager", detail="it differs",
                  torch="2.13.0", at=1_700_000_000.0)
    files = {"fxgraph/aa/graph": os.urandom(3000), "aoti/v9.x-export.abc.failed.json": rec.to_bytes(),
             "precompile/v9.x-export.abc-head/precompile.failed.json": pre.to_bytes(), "fxgraph/zz/later": b"y" * 700}
    key = seed(store, "v9", fake_cache(tmp_path, files), **{"compile.strategy": "export"})
    cp = cli(store, "inspect", key)
    assert cp.returncode == 0, cp.stderr
    line = next(ln for ln in cp.stdout.splitlines() if ln.startswith("export FAILED"))
    assert line == "export FAILED  export failed: ExportError: torch.export.export failed for Net: boom"
    line = next(ln for ln in cp.stdout.splitlines() if ln.startswith("precompile FAILED"))
    assert line == "precompile FAILED  precompile failed: RoundTripError: it differs from eager"
    assert "inductor/aoti/v9.x-export.abc.failed.json" in cp.stdout and "torch 2.13.0" in cp.stdout
    body = json.loads(cli(store, "inspect", key, "--json").stdout)
    assert body["failures"] == body["export_failures"]  # the old key stays, with the same list
    assert sorted(body["failures"], key=lambda f: f["failed"]) == [
        {"path": "inductor/aoti/v9.x-export.abc.failed.json", "failed": "export", "stage": "export",
         "error": "ExportError", "reason": rec.reason, "detail": rec.detail, "torch": "2.13.0",
         "at": 1_700_000_000.0, "format": 1},
        {"path": "inductor/precompile/v9.x-export.abc-head/precompile.failed.json", "failed": "precompile",
         "stage": "precompile", "error": "RoundTripError", "reason": pre.reason, "detail": pre.detail,
         "torch": "2.13.0", "at": 1_700_000_000.0, "format": 1}]
    plain = seed(store, "v8", fake_cache(tmp_path, {"a/b": b"x"}))
    assert "FAILED" not in cli(store, "inspect", plain).stdout
    body = json.loads(cli(store, "inspect", plain, "--json").stdout)
    assert body["failures"] == [] and body["export_failures"] == []


# -- prune -----------------------------------------------------------------------------------------------------------
def test_prune_dry_run_deletes_nothing(store: Store, two_versions: dict[str, str], tmp_path: Path) -> None:
    before = names(store)
    cp = cli(store, "prune", "--keep", "1")
    assert cp.returncode == 0, cp.stderr
    assert f"would delete entry   {two_versions['k1']}" in cp.stdout
    assert f"would delete object  {two_versions['only_v1']}" in cp.stdout
    assert two_versions["shared"] not in cp.stdout  # v2 still lists it
    assert "--yes" in cp.stdout.splitlines()[-1]
    assert names(store) == before


def test_prune_yes_keeps_shared_objects_and_collects_orphans(
    store: Store, two_versions: dict[str, str], tmp_path: Path
) -> None:
    orphan = put_orphan(store, tmp_path)
    cp = cli(store, "prune", "--keep", "1", "--yes")  # default grace 1h: the fresh orphan may be an upload in flight
    assert cp.returncode == 0, cp.stderr
    left = names(store)
    assert manifest_name(two_versions["k1"]) not in left and two_versions["only_v1"] not in left
    assert manifest_name(two_versions["k2"]) in left and two_versions["shared"] in left
    assert orphan in left

    time.sleep(2.1)  # S3 LastModified has 1 s resolution
    cp = cli(store, "prune", "--grace", "1s", "--yes")  # no entry rule: only orphans past the grace go
    assert cp.returncode == 0, cp.stderr
    assert f"delete orphan  {orphan}" in cp.stdout
    left = names(store)
    assert orphan not in left and two_versions["shared"] in left
    # What is left still restores completely.
    r = restore(Entry(store, two_versions["k2"], {"inductor": tmp_path / "restored"}, FACTORS, TrustPolicy()))
    assert r.status == "hit", r.reason
    assert (tmp_path / "restored" / "cpp" / "k1.so").read_bytes() == b"k" * 800


def test_prune_older_than(store: Store, two_versions: dict[str, str]) -> None:
    cp = cli(store, "prune", "--older-than", "2d", "--yes")
    assert cp.returncode == 0, cp.stderr
    assert [e["key"] for e in json.loads(cli(store, "ls", "--json").stdout)] == [two_versions["k2"]]
    # With --keep too, an entry goes only if both rules say so: the newest version survives however old.
    age(store, two_versions["k2"], 30 * 86400)
    cp = cli(store, "prune", "--keep", "1", "--older-than", "1d", "--yes")
    assert cp.returncode == 0 and manifest_name(two_versions["k2"]) in names(store)


@pytest.mark.parametrize(
    "args, message",
    [
        (["prune", "--older-than", "7x"], "invalid duration '7x'"),
        (["prune", "--older-than", "7"], "invalid duration '7'"),
        (["prune", "--grace", "soon"], "invalid duration 'soon'"),
        (["prune", "--keep", "0"], "invalid count '0'"),
        (["--store", "ftp://host/x", "ls"], "COMPILE_CACHE_URL='ftp://host/x' is invalid"),
        (["ls", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    cp = cli(None, *args, env={"COMPILE_CACHE_URL": str(tmp_path / "s")})
    assert cp.returncode == 2, (cp.stdout, cp.stderr)
    assert message in cp.stderr and "Traceback" not in cp.stderr


def test_bad_setting_in_environment_exits_2(tmp_path: Path) -> None:
    cp = cli(None, "ls", env={"COMPILE_CACHE_URL": str(tmp_path), "COMPILE_CACHE_FLUSH_BUDGET_S": "20"})
    assert cp.returncode == 2 and "COMPILE_CACHE_FLUSH_BUDGET_S" in cp.stderr and "Traceback" not in cp.stderr


# -- verify ----------------------------------------------------------------------------------------------------------
def flip_byte(store: Store, name: str, tmp_path: Path) -> None:
    data = bytearray(store.read(name))
    data[len(data) // 2] ^= 0xFF
    tmp = tmp_path / "flipped"
    tmp.write_bytes(bytes(data))
    store.delete(name)
    assert store.put_immutable(name, tmp)


def test_verify_ok_then_flipped_byte_fails(store: Store, two_versions: dict[str, str], tmp_path: Path) -> None:
    pytest.importorskip("compile_cache.verify")
    cp = cli(store, "verify", two_versions["k2"])
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert cp.stdout.startswith(f"OK  {two_versions['k2']}")
    flip_byte(store, two_versions["shared"], tmp_path)
    cp = cli(store, "verify", two_versions["k2"], "--json")
    assert cp.returncode == 1, cp.stdout + cp.stderr
    report = json.loads(cp.stdout)
    assert report["ok"] is False and any("sha256" in p or "corrupt" in p for p in report["problems"]), report
    cp = cli(store, "verify", two_versions["k2"])
    assert cp.returncode == 1 and cp.stdout.startswith("FAILED") and "PROBLEM" in cp.stdout


# -- env, help, imports ----------------------------------------------------------------------------------------------
def test_env_prints_the_reference_table() -> None:
    cp = cli(None, "env")
    assert cp.returncode == 0, cp.stderr
    lines = cp.stdout.splitlines()
    assert lines[0] == "| Variable | Default | Meaning |"
    url = next(ln for ln in lines if ln.startswith("| `COMPILE_CACHE_URL` |"))
    assert "`file://.cache/compile-store`" in url


def test_help_teaches_and_imports_stay_light() -> None:
    from compile_cache.cli import _COMMANDS, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, *_ in _COMMANDS:
        text = sub.choices[name].format_help()
        assert "python -m compile_cache" in text.split("example:\n", 1)[1], name
    code = (
        "import sys, compile_cache.cli; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'boto3', 'botocore')]; "
        "assert not bad, bad"
    )
    cp = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert cp.returncode == 0, cp.stderr


def test_bench_forwards_its_arguments() -> None:
    cp = cli(None, "bench", "--help")  # --help belongs to the benchmark, not to the CLI
    assert cp.returncode == 0 and "usage: python -m compile_cache bench" in cp.stdout and "--out" in cp.stdout


def test_bench_without_its_module_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from compile_cache.cli import main

    monkeypatch.setitem(sys.modules, "compile_cache.tools.bench", None)  # import fails as if the file were missing
    assert main(["bench", "--out", "x"]) == 1
    assert "compile_cache.tools.bench is missing" in capsys.readouterr().err


def test_warm_usage_errors(tmp_path: Path) -> None:
    env = {"COMPILE_CACHE_URL": str(tmp_path / "s")}
    cp = cli(None, "warm", "--predictor", "no_such_file.py:Predictor", env=env)
    assert cp.returncode == 2 and "no file no_such_file.py" in cp.stderr
    cp = cli(None, "warm", env={**env, "COMPILE_CACHE_DISABLE": "1"})
    assert cp.returncode == 2 and "COMPILE_CACHE_DISABLE" in cp.stderr


# -- warm (compiles once) ----------------------------------------------------------------------------------------------
def test_warm_preseeds_so_a_fresh_boot_hits(
    s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`warm` against the real S3 store, then a new container boots with cache == "hit"."""
    apply_s3_env(monkeypatch, s3_env)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # warm must make its own fresh dir
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    cp = cli(None, "warm", "--predictor", PREDICTOR, env=s3_env, timeout=300)
    assert cp.returncode == 0, cp.stdout + cp.stderr[-3000:]
    out = dict(ln.split(None, 1) for ln in cp.stdout.splitlines() if ln.strip())
    key = out["key"].strip()
    assert key.startswith("Predictor.m") and out["restore"].startswith("miss")  # <lineage>.<model part>...
    assert out["version"].startswith("tiny-1 ")  # the predictor's label
    assert int(out["uploaded"].split()[0]) > 0 and out["uploaded"].rstrip().endswith("done")
    assert not list(tmp_path.glob("compile-cache-warm-*"))  # its temp cache dir is gone

    # The next boot in the real Cog runtime, in a fresh cache dir. Not tests/boot.py: the FX-graph key depends on
    # how the predictor module was imported (pickle.whichmodule names the first module in sys.modules that has a
    # `torch` attribute), so only a boot that loads it as Cog does proves that `warm` seeds what production reads.
    metrics_file = tmp_path / "metrics.json"
    env = {
        **s3_env,
        "PYTHONPATH": str(ROOT),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "fresh-container"),
        "COMPILE_CACHE_METRICS_FILE": str(metrics_file),
    }
    with CogServer(PREDICTOR, cwd=ROOT, env=env, log_path=tmp_path / "server.log") as srv:
        srv.wait_ready(300)
        code, body = srv.predict({"batch": 1}, timeout=120)
        assert code == 200 and body["status"] == "succeeded", body
        assert srv.shutdown("post", timeout=30) == 0
    m = json.loads(metrics_file.read_text())
    assert m["key"] == key
    assert m["cache"] == "hit" and m["compiles"] == 0 and precompiled(m)["loaded"] > 0, m  # no Dynamo
    assert m["bytes_uploaded"] == 0


def test_verify_and_inspect_judge_signatures_as_a_restore_does(store: Store, tmp_path: Path) -> None:
    """Keys only from the environment, the runtime's rules: with a key, signed-only; earlier keys verify; the
    opt-out for unsigned entries; --require-signed."""
    pytest.importorskip("compile_cache.verify")
    old = seed(store, "old", fake_cache(tmp_path, {"a/b": b"x"}), signing_key=b"old-key")
    unsigned = seed(store, "unsigned", fake_cache(tmp_path, {"a/c": b"y"}))
    new = {"COMPILE_CACHE_SIGNING_KEY": "new-key"}
    rotating = {**new, "COMPILE_CACHE_VERIFY_KEYS": "older-key, old-key"}
    cases = [
        (old, new, 1, "does not verify"),
        (old, rotating, 0, "earlier key"),
        (unsigned, new, 1, "unsigned"),
        (unsigned, {**new, "COMPILE_CACHE_ALLOW_UNSIGNED": "1"}, 0, "COMPILE_CACHE_ALLOW_UNSIGNED is on"),
        (unsigned, {}, 0, "no COMPILE_CACHE_SIGNING_KEY"),
    ]
    for key, env, rc, text in cases:
        cp = cli(store, "verify", key, env=env)
        assert cp.returncode == rc and text in cp.stdout, (key, env, cp.stdout, cp.stderr)
        body = json.loads(cli(store, "inspect", key, "--json", env=env).stdout)
        assert body["trust"]["loads"] is (rc == 0) and text in body["trust"]["reason"], body["trust"]
    cp = cli(store, "verify", unsigned, "--require-signed", env={**new, "COMPILE_CACHE_ALLOW_UNSIGNED": "1"})
    assert cp.returncode == 1 and "unsigned" in cp.stdout
    cp = cli(store, "inspect", old, env=new)
    assert "loads here     NO, a restore refuses it: manifest signature does not verify" in cp.stdout
    assert "old-key" not in cp.stdout + cp.stderr
