"""Versions share a cache (docs/versions.md): the key hashes what compiles, not weight values; a miss seeds from
the newest entry of the same lineage and environment and says what differs; a seeded version uploads only what is
new. Key and store behaviour first (no compile; the store flow on both stores), then boots of the tiny model."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from compile_cache.config import CompileConfig
from compile_cache.entry import Entry
from compile_cache.key import CacheKey
from compile_cache.lineage import restore_or_seed
from compile_cache.manifest import manifest_name
from compile_cache.prune import apply_prune, plan_prune
from compile_cache.restore import RestoreOptions, read_manifest
from compile_cache.stores import LocalStore, Store
from compile_cache.trust import TrustPolicy
from compile_cache.upload import Uploader
from compile_cache.versions import identify, local_sources, weights_digest
from tests.conftest import ROOT, boot
from tests.tiny_predictor import BATCHES
from tests.tiny_versions_predictor import eager, write_weights

FACTORS = {"compile_cache.format": "2", "torch": "2.13.0", "python": "cpython-3.11.7", "device": "cpu",
           "cpu.isa": "avx512", "compile.strategy": "jit"}


# -- the key ---------------------------------------------------------------------------------------------------------
def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})


def make_project(d: Path) -> Path:
    (d / "pkg").mkdir(parents=True)
    (d / "predict.py").write_text("import os\nimport torch\nimport helpers\nfrom pkg.sub import f\n\n"
                                  "def g():\n    from pkg import lazy  # a lazy import counts too\n")
    (d / "helpers.py").write_text("X = 1\n")
    (d / "pkg" / "__init__.py").write_text("")
    (d / "pkg" / "sub.py").write_text("from .deep import h\n\ndef f(): return h()\n")
    (d / "pkg" / "deep.py").write_text("def h(): return 1\n")
    (d / "pkg" / "lazy.py").write_text("Y = 2\n")
    (d / "unused.py").write_text("Z = 3\n")
    (d / ".venv" / "lib").mkdir(parents=True)
    (d / ".venv" / "lib" / "torch.py").write_text("")  # never the project's own: an installed package
    (d / "requirements.txt").write_text("torch==2.13.0\n")
    (d / "cog.yaml").write_text("predict: predict.py:Predictor\n")
    write_safetensors(d / "weights" / "model.safetensors", {"w": torch.ones(4, 3), "b": torch.zeros(3)})
    (d / "weights" / "config.json").write_text('{"hidden": 3}')
    return d


def ident(d: Path, **kw: Any):  # type: ignore[no-untyped-def]
    args: dict[str, Any] = dict(predictor_file=d / "predict.py", weights_dir=d / "weights",
                                requirements_files=[d / "requirements.txt", d / "cog.yaml"], label=None, lineage=None,
                                predictor_class="Predictor")
    return identify(**{**args, **kw})


def test_source_is_the_predictor_and_the_local_modules_it_imports(tmp_path: Path) -> None:
    d = make_project(tmp_path / "p")
    names = sorted(p.relative_to(d).as_posix() for p in local_sources(d / "predict.py"))
    assert names == ["helpers.py", "pkg/__init__.py", "pkg/deep.py", "pkg/lazy.py", "pkg/sub.py", "predict.py"]
    before = ident(d).part
    (d / "unused.py").write_text("Z = 4\n")
    assert ident(d).part == before  # not imported: not in the key
    (d / "pkg" / "deep.py").write_text("def h(): return 2\n")
    after = ident(d)
    assert after.part != before and after.factors["model.source"] != ident(make_project(tmp_path / "q")).factors[
        "model.source"]


def test_weights_count_by_structure_and_non_tensor_files_in_full(tmp_path: Path) -> None:
    d = make_project(tmp_path / "p")
    st = d / "weights" / "model.safetensors"
    base = ident(d).part
    write_safetensors(st, {"w": torch.full((4, 3), 0.5), "b": torch.ones(3)})  # a fine-tune: values only
    assert ident(d).part == base
    for changed in ({"w": torch.ones(4, 4), "b": torch.zeros(3)},  # a shape
                    {"w": torch.ones(4, 3, dtype=torch.float16), "b": torch.zeros(3)},  # a dtype
                    {"w2": torch.ones(4, 3), "b": torch.zeros(3)}):  # a name
        write_safetensors(st, changed)
        assert ident(d).part != base, changed
    write_safetensors(st, {"w": torch.ones(4, 3), "b": torch.zeros(3)})
    assert ident(d).part == base
    (d / "weights" / "config.json").write_text('{"hidden": 4}')  # not a tensor file: every byte
    assert ident(d).part != base


def test_a_tensor_file_whose_structure_cannot_be_read_is_hashed_whole(tmp_path: Path) -> None:
    w = tmp_path / "w"
    w.mkdir()
    (w / "model.safetensors").write_bytes(b"\xff" * 64)  # not a safetensors header
    (w / "pytorch_model.bin").write_bytes(b"a" * 64)
    a = weights_digest(w, values=False)
    (w / "model.safetensors").write_bytes(b"\xfe" * 64)
    b = weights_digest(w, values=False)
    (w / "pytorch_model.bin").write_bytes(b"b" * 64)
    assert len({a, b, weights_digest(w, values=False)}) == 3


def test_a_config_that_bakes_weights_gets_a_new_key_when_values_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = make_project(tmp_path / "p")
    monkeypatch.delenv("TORCHINDUCTOR_FREEZING", raising=False)
    assert not CompileConfig().bakes_weights()
    baking = [CompileConfig(options={"freezing": True}), CompileConfig(key_weight_values=True)]
    monkeypatch.setenv("TORCHINDUCTOR_FREEZING", "1")
    baking.append(CompileConfig())
    assert all(c.bakes_weights() for c in baking)
    assert not CompileConfig(options={"freezing": False}).bakes_weights()  # the declared option wins over the env
    before = ident(d, weight_values=True)
    assert before.factors["model.weights"].startswith("values:")
    write_safetensors(d / "weights" / "model.safetensors", {"w": torch.full((4, 3), 0.5), "b": torch.ones(3)})
    assert ident(d, weight_values=True).part != before.part
    assert ident(d, weight_values=False).part == ident(d, weight_values=False).part


def test_label_and_lineage(tmp_path: Path) -> None:
    d = make_project(tmp_path / "p")
    a = ident(d)
    assert a.label == "v" + a.part[1:] and a.lineage == "Predictor-weights"
    b = ident(d, label="r2024.06", lineage="my.model")
    assert b.part == a.part and b.label == "r2024.06" and b.lineage == "my_model"  # a label never moves the key
    c = ident(d, label="r2024.06", key_by_version=True)  # the switch for a fresh compile per version
    assert c.part != a.part and ident(d, label="r2024.07", key_by_version=True).part != c.part
    assert CacheKey(a.part, FACTORS, lineage=a.lineage).name.startswith(f"Predictor-weights.{a.part}.torch2.13.0")


# -- the store: seeding and explaining (fake cache dirs, both stores) -------------------------------------------------
class Counting:
    """The store, with every call counted by kind."""

    def __init__(self, store: Store) -> None:
        self.store, self.calls = store, {}  # type: ignore[var-annotated]

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self.store, name)
        if not callable(fn):
            return fn

        def counted(*a: Any, **kw: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*a, **kw)

        return counted


def cache_dir(base: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        p = base / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.utime(p, (1_700_000_000, 1_700_000_000))
    return base


def publish(store: Any, lineage: str, part: str, files: dict[str, bytes], base: Path, *, label: str = "",
            **factors: str) -> str:
    f = {**FACTORS, **factors}
    key = CacheKey(part, f, lineage=lineage).name
    roots = {"inductor": cache_dir(base / key, files)}
    up = Uploader(entry_of(store, key, roots, f, lineage, {"model.source": part}), label or part)
    r = up.upload()
    assert r is not None and not r.error and r.files == len(files), r
    return key


def entry_of(store: Any, key: str, roots: dict[str, Path], factors: dict[str, str], lineage: str = "",
             model_factors: dict[str, str] | None = None) -> Entry:
    """The unsigned entry ``key`` of ``store`` (any object with a store's methods), restored into ``roots``."""
    return Entry(store, key, roots, factors, TrustPolicy(), lineage, model_factors or {})


def fresh(tmp_path: Path) -> dict[str, Path]:
    d = tmp_path / f"inductor-{time.monotonic_ns()}"
    d.mkdir()
    return {"inductor": d}


def test_seed_comes_from_the_same_lineage_and_fingerprint_only(store: Store, tmp_path: Path) -> None:
    same = publish(store, "lin", "m1", {"fxgraph/a": b"same lineage, same env"}, tmp_path)
    time.sleep(1.1)  # S3's LastModified has a 1 s resolution: the newer entries must be newer
    publish(store, "lin", "m2", {"fxgraph/b": b"other torch"}, tmp_path, torch="2.15.0")
    publish(store, "other", "m3", {"fxgraph/c": b"other lineage"}, tmp_path)
    publish(store, "lin2", "m4", {"fxgraph/d": b"a lineage whose name starts like it"}, tmp_path)
    roots = fresh(tmp_path)
    key = CacheKey("m9", FACTORS, lineage="lin").name
    r = restore_or_seed(entry_of(store, key, roots, FACTORS, "lin", {"model.source": "m9"}))
    assert r.status == "seeded" and r.seeded_from == same
    assert sorted(p.name for p in roots["inductor"].rglob("*") if p.is_file()) == ["a"]  # nothing foreign loaded
    assert "model.source m1 → m9" in r.reason and "torch 2.15.0 → 2.13.0" in r.reason


def test_a_miss_without_a_seed_names_the_differing_factor(store: Store, tmp_path: Path) -> None:
    publish(store, "lin", "m1", {"fxgraph/a": b"old torch"}, tmp_path, torch="2.11.0")
    publish(store, "other", "m1", {"fxgraph/b": b"other lineage, same env"}, tmp_path)
    roots = fresh(tmp_path)
    key = CacheKey("m1", FACTORS, lineage="lin").name
    r = restore_or_seed(entry_of(store, key, roots, FACTORS, "lin", {"model.source": "m1"}))
    assert r.status == "miss" and not r.seeded_from
    assert r.reason.startswith("no entry; nearest lin.m1.") and "torch 2.11.0 → 2.13.0" in r.reason
    assert not any(roots["inductor"].rglob("*"))
    r = restore_or_seed(entry_of(store, CacheKey("m1", FACTORS, lineage="new").name, roots, FACTORS, "new"))
    assert r.status == "miss" and r.reason == "no entry; no other entry of lineage new"


@pytest.mark.serial  # bounds wall time
def test_a_slow_lineage_listing_stays_within_the_restore_deadline(tmp_path: Path) -> None:
    """A miss lists the lineage (to explain it, and to seed): a store that lists slowly must not hold the boot past
    COMPILE_CACHE_RESTORE_TIMEOUT_S. Without the deadline, this call would take the listing's 3 s."""
    store = LocalStore(tmp_path / "store")
    publish(store, "lin", "m1", {"fxgraph/a": b"a seed the slow listing hides"}, tmp_path)

    class SlowList(LocalStore):
        def list(self, prefix: str = "") -> Iterator[Any]:
            time.sleep(3)
            return super().list(prefix)

    key = CacheKey("m2", FACTORS, lineage="lin").name
    t0 = time.monotonic()
    slow = entry_of(SlowList(tmp_path / "store"), key, fresh(tmp_path), FACTORS, "lin")
    r = restore_or_seed(slow, RestoreOptions(timeout_s=0.5))
    assert time.monotonic() - t0 < 2.5
    assert r.status == "miss" and not r.seeded_from
    assert r.reason == "no entry; could not list lineage lin: exceeded COMPILE_CACHE_RESTORE_TIMEOUT_S=0.5s"
    # The same store, listed in time: the seed is found.
    r = restore_or_seed(entry_of(store, key, fresh(tmp_path), FACTORS, "lin"))
    assert r.status == "seeded"


def test_a_seeded_versions_first_upload_puts_only_new_objects(store: Store, tmp_path: Path) -> None:
    files = {"fxgraph/used": b"u" * 3000, "cpp/used.so": b"k" * 3000}
    seed_key = publish(store, "lin", "m1", files, tmp_path)
    src = tmp_path / seed_key  # a second segment of the seed, which the new version will not read
    cache_dir(src, {"fxgraph/unused": b"n" * 3000})
    f = dict(FACTORS)
    r2 = Uploader(entry_of(store, seed_key, {"inductor": src}, f, "lin"), "m1").upload()
    assert r2 is not None and r2.segments == 1
    seed_manifest, _ = read_manifest(store, seed_key)
    assert seed_manifest is not None and len(seed_manifest.segments) == 2
    used_segment = next(s for s in seed_manifest.segments if any(x.path == "inductor/cpp/used.so" for x in s.files))

    roots = fresh(tmp_path)
    key = CacheKey("m2", f, lineage="lin").name
    r = restore_or_seed(entry_of(store, key, roots, f, "lin"))
    assert r.status == "seeded" and r.usage_tracked
    (roots["inductor"] / "cpp" / "used.so").read_bytes()  # what a warm-up's cache hit reads
    cache_dir(roots["inductor"], {"fxgraph/new": b"new graph of the new version"})
    counting = Counting(store)
    up = Uploader.after_restore(r, entry_of(counting, key, roots, f, "lin"), "v2")
    res = up.upload()
    assert res is not None and not res.error and res.files == 1
    assert counting.calls.get("put_immutable") == 1 and counting.calls.get("put_conditional") == 1
    m, _ = read_manifest(store, key)
    assert m is not None and m.seeded_from == seed_key and m.lineage == "lin" and "v2" in m.labels()
    assert [s.sha256 for s in m.segments[:1]] == [used_segment.sha256]  # referenced, not copied
    assert len(m.segments) == 2 and "inductor/fxgraph/unused" not in m.files()  # what it did not read stays out

    # A later boot of the same version hits and asks the store for nothing but the entry.
    counting = Counting(store)
    r = restore_or_seed(entry_of(counting, key, fresh(tmp_path), f, "lin"))
    assert r.status == "hit" and "list" not in counting.calls
    up = Uploader.after_restore(r, entry_of(counting, key, fresh(tmp_path), f, "lin"), "v2")
    assert up.upload() is not None and "put_conditional" not in counting.calls

    # Pruning the seed's version keeps the objects the new entry references.
    m_seed, token = read_manifest(store, seed_key)
    assert m_seed is not None
    old = m_seed.model_copy(update={"updated_at": time.time() - 86400, "created_at": time.time() - 86400})
    store.put_conditional(manifest_name(seed_key), old.to_bytes(), token)
    plan = plan_prune(store, keep=1, grace_s=0)
    assert [e.key for e in plan.entries] == [seed_key]
    apply_prune(store, plan)
    objects = {o.name for o in store.list("objects/")}
    assert {s.object for s in m.segments} <= objects
    unused = next(s for s in seed_manifest.segments if s.sha256 != used_segment.sha256)
    assert unused.object not in objects
    assert restore_or_seed(entry_of(store, key, fresh(tmp_path), f, "lin")).status == "hit"


def test_a_new_label_on_a_shared_entry_is_recorded_once(store: Store, tmp_path: Path) -> None:
    key = publish(store, "lin", "m1", {"fxgraph/a": b"x"}, tmp_path, label="r1")
    for label, writes in (("r2", 1), ("r2", 0), ("r1", 0)):
        counting = Counting(store)
        r = restore_or_seed(entry_of(counting, key, fresh(tmp_path), FACTORS, "lin"))
        assert r.status == "hit"
        up = Uploader.after_restore(r, entry_of(counting, key, fresh(tmp_path), FACTORS, "lin"), label)
        assert up.upload() is not None
        assert counting.calls.get("put_conditional", 0) == writes, (label, counting.calls)
    m, _ = read_manifest(store, key)
    assert m is not None and set(m.labels()) == {"r1", "r2"}
    plan = plan_prune(store, keep=1)  # r2 is the newest label and the entry serves it
    assert not plan.entries


def test_prune_ranks_a_shared_entrys_labels_by_when_each_was_pushed(store: Store, tmp_path: Path) -> None:
    """r1 then r3 on one shared entry, r2 (another entry) in between: keep=2 keeps r3 and r2, so both entries stay.
    Ranked by the shared entry's last update instead, r1 and r3 would take both places and r2's entry would go."""
    shared = publish(store, "lin", "m1", {"fxgraph/a": b"x"}, tmp_path, label="r1")
    time.sleep(1.1)  # S3's LastModified has a 1 s resolution
    other = publish(store, "lin", "m2", {"fxgraph/b": b"y"}, tmp_path, label="r2")
    time.sleep(1.1)
    r = restore_or_seed(entry_of(store, shared, fresh(tmp_path), FACTORS, "lin"))
    up = Uploader.after_restore(r, entry_of(store, shared, fresh(tmp_path), FACTORS, "lin"), "r3")
    assert up.upload() is not None
    assert [e.key for e in plan_prune(store, keep=2, grace_s=0).entries] == []
    assert [e.key for e in plan_prune(store, keep=1, grace_s=0).entries] == [other]


# -- boots of the tiny model -----------------------------------------------------------------------------------------
TARGET = "tests.tiny_versions_predictor:Predictor"


def tiny_boot(store: str, weights: Path, inductor: Path, *, target: str = TARGET, **env: str):  # type: ignore[no-untyped-def]
    return boot(target, {"TORCHINDUCTOR_CACHE_DIR": str(inductor), "COMPILE_CACHE_URL": store,
                         "TINY_WEIGHTS_DIR": str(weights), **env}, {"batch": 4}, count_calls=True)


def close(a: list, b: list) -> bool:
    return torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)


def code_change(tmp_path: Path, old: str = "SCALE = 1.0", new: str = "SCALE = 2.0", name: str = "v3",
                extra: str = "") -> str:
    """A copy of the predictor with other post-processing (same file name: see tiny_versions_predictor), and
    ``extra`` code at its end."""
    src = (ROOT / "tests" / "tiny_versions_predictor.py").read_text()
    assert src.count(old) == 1
    d = tmp_path / name
    d.mkdir()
    (d / "tiny_versions_predictor.py").write_text(src.replace(old, new) + extra)
    return f"{d}/tiny_versions_predictor.py:Predictor"


def model_change(tmp_path: Path) -> str:
    """A copy whose model computes something else (its graph changes)."""
    return code_change(tmp_path, "return load_model(WEIGHTS_DIR)",
                       "return torch.nn.Sequential(load_model(WEIGHTS_DIR), torch.nn.Tanh()).eval()", "v4")


def precompiled(b: Any) -> dict[str, Any]:
    return b.metrics["parts"]["model"]["precompiled"]


def test_precompiled_functions_follow_new_weights_and_code_only_versions(tmp_path: Path) -> None:
    """jit with precompiled functions: v1 builds one per shape; re-weighted, the same entry's functions serve the
    new weights (they are inputs, not constants); a code-only version adopts the seed's functions (traced sources
    unchanged, output equal to its own eager) by reference; a model change adopts none and builds its own."""
    w1 = write_weights(tmp_path / "w1" / "tiny")
    w2 = write_weights(tmp_path / "w2" / "tiny", perturb=0.05)
    store = str(tmp_path / "store")
    cold = tiny_boot(store, w1, tmp_path / "i1")
    assert cold.metrics["cache"] == "miss" and precompiled(cold) == {"loaded": 0, "adopted": 0,
                                                                      "built": len(BATCHES), "fallback": ""}

    hit = tiny_boot(store, w2, tmp_path / "i2")
    assert hit.metrics["cache"] == "hit" and hit.metrics["compiles"] == 0 and hit.metrics["bytes_uploaded"] == 0
    assert precompiled(hit)["loaded"] == len(BATCHES) and precompiled(hit)["built"] == 0
    assert close(hit.outputs[0], eager(w2, 4)) and not close(hit.outputs[0], eager(w1, 4))

    code = tiny_boot(store, w2, tmp_path / "i3", target=code_change(tmp_path))
    m = code.metrics
    assert m["cache"] == "seeded" and m["seeded_from"] == cold.metrics["key"] and m["compiles"] == 0
    assert precompiled(code) == {"loaded": 0, "adopted": len(BATCHES), "built": 0, "fallback": ""}
    assert code.stderr.count("(same sources and state)") == len(BATCHES)  # adopted without running them
    assert close(code.outputs[0], [[2 * x for x in row] for row in eager(w2, 4)])
    # References, not copies: one small new object (the .ref files), the seed's objects kept by the manifest.
    assert code.store_calls.get("put_immutable") == 1 and m["bytes_uploaded"] < 4000
    again = tiny_boot(store, w2, tmp_path / "i4", target=code_change(tmp_path, name="v3b"))
    assert again.metrics["cache"] == "hit" and again.metrics["compiles"] == 0
    assert precompiled(again)["loaded"] == len(BATCHES) and again.metrics["bytes_uploaded"] == 0

    # load() sets an attribute the model does not read: the state differs, so each function is run against this
    # version's eager output before it is adopted.
    noted = tiny_boot(store, w2, tmp_path / "i6", target=code_change(
        tmp_path, "return load_model(WEIGHTS_DIR)", "m = load_model(WEIGHTS_DIR)\n        m.note = 'v5'\n        return m",
        "v5"))
    assert noted.metrics["cache"] == "seeded" and precompiled(noted)["adopted"] == len(BATCHES)
    assert noted.stderr.count("(output equals eager)") == len(BATCHES) and noted.metrics["compiles"] == 0

    # The model's forward changes (a module of the copy's own): the seed's functions traced other code.
    tanh = code_change(tmp_path, "return load_model(WEIGHTS_DIR)", "return Tanh(load_model(WEIGHTS_DIR))", "v4",
                       extra="\n\nclass Tanh(torch.nn.Module):\n    def __init__(self, m):\n        super().__init__()\n"
                       "        self.m = m\n\n    def forward(self, x):\n        return torch.tanh(self.m(x))\n")
    changed = tiny_boot(store, w2, tmp_path / "i5", target=tanh)
    assert changed.metrics["cache"] == "seeded" and precompiled(changed)["adopted"] == 0
    assert precompiled(changed)["built"] == len(BATCHES) and changed.metrics["parts"]["model"]["request_path_eager_calls"] == 0
    assert close(changed.outputs[0], torch.tanh(torch.tensor(eager(w2, 4))).tolist())


def test_a_reweighted_version_under_export_loads_the_package_with_its_own_weights(tmp_path: Path) -> None:
    w1 = write_weights(tmp_path / "w1" / "tiny")
    w2 = write_weights(tmp_path / "w2" / "tiny", perturb=0.05)
    store = str(tmp_path / "store")
    cold = tiny_boot(store, w1, tmp_path / "ind1", COMPILE_CACHE_STRATEGY="export")
    assert cold.metrics["strategy"] == "export" and cold.metrics["cache"] == "miss"
    b = tiny_boot(store, w2, tmp_path / "ind2", COMPILE_CACHE_STRATEGY="export")
    m = b.metrics
    assert m["strategy"] == "export" and m["cache"] == "hit" and m["key"] == cold.metrics["key"]
    assert m["compiles"] == 0 and m["bytes_uploaded"] == 0
    assert close(b.outputs[0], eager(w2, 4)) and not close(b.outputs[0], eager(w1, 4))

    # Code only: the seed's package compiles the same exported program, so it serves (no build, a tiny upload).
    code = tiny_boot(store, w2, tmp_path / "ind3", target=code_change(tmp_path), COMPILE_CACHE_STRATEGY="export")
    m = code.metrics
    assert m["cache"] == "seeded" and m["seeded_from"] == cold.metrics["key"] and m["strategy"] == "export"
    assert "compiles this version's program: reusing it" in code.stderr and "built" not in code.stderr
    assert code.store_calls.get("put_immutable") == 1 and m["bytes_uploaded"] < 2000  # the .ref file
    assert close(code.outputs[0], [[2 * x for x in row] for row in eager(w2, 4)])
    again = tiny_boot(store, w2, tmp_path / "ind4", target=code_change(tmp_path, name="v3b"),
                      COMPILE_CACHE_STRATEGY="export")
    assert again.metrics["cache"] == "hit" and again.metrics["bytes_uploaded"] == 0  # the .ref leads to it

    # A model change: its program differs, so it builds its own package, and says so.
    changed = tiny_boot(store, w2, tmp_path / "ind5", target=model_change(tmp_path), COMPILE_CACHE_STRATEGY="export")
    assert changed.metrics["cache"] == "seeded" and changed.metrics["strategy"] == "export"
    assert "no restored package compiles this version's program; building one" in changed.stderr
    assert close(changed.outputs[0], torch.tanh(torch.tensor(eager(w2, 4))).tolist())


def test_versions_through_s3(s3_env: dict[str, str], tmp_path: Path) -> None:
    """The flow with the cache dir restore (jit_restore="dir": Inductor's own keys decide what hits), against the
    SeaweedFS store: a cold v1; a re-weighted version hits v1's entry, computes with its own weights and only records
    its label; a code-only version is seeded from v1, hits every FX graph and uploads only a manifest."""
    # jit_restore="dir", set here: the default (precompiled functions, test above) reads no FX graph
    env = {**s3_env, "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
           "COMPILE_CACHE_JIT_RESTORE": "dir"}
    env.pop("COMPILE_CACHE_URL")
    url = s3_env["COMPILE_CACHE_URL"]
    w1 = write_weights(tmp_path / "w1" / "tiny")
    w2 = write_weights(tmp_path / "w2" / "tiny", perturb=0.05)
    cold = tiny_boot(url, w1, tmp_path / "i1", **env)
    assert cold.metrics["cache"] == "miss" and cold.metrics["store"].startswith("s3://")
    assert cold.metrics["fxgraph_misses"] > 0
    hit = tiny_boot(url, w2, tmp_path / "i2", COMPILE_CACHE_MODEL_VERSION="finetune-2", **env)
    m = hit.metrics
    assert m["cache"] == "hit" and m["key"] == cold.metrics["key"] and m["version"] == "finetune-2"
    assert m["fxgraph_misses"] == 0 and m["fxgraph_hits"] > 0 and m["bytes_uploaded"] == 0
    assert close(hit.outputs[0], eager(w2, 4)) and not close(hit.outputs[0], eager(w1, 4))
    # The new label is recorded on the shared entry: one manifest write, no object; a hit lists nothing.
    assert hit.store_calls.get("put_conditional") == 1 and "put_immutable" not in hit.store_calls
    assert hit.store_calls.get("list") is None
    # The build lease off: its own requests (tests/test_fleet.py) would add to the manifest writes counted here.
    seeded = tiny_boot(url, w1, tmp_path / "i3", target=code_change(tmp_path), COMPILE_CACHE_BUILD_LEASE="0", **env)
    m = seeded.metrics
    assert m["cache"] == "seeded" and m["seeded_from"] == cold.metrics["key"] and m["key"] != cold.metrics["key"]
    assert "model.source" in m["cache_reason"] and m["fxgraph_misses"] == 0 and m["fxgraph_hits"] > 0
    # only a manifest: it lists v1's objects (content-addressed), nothing new is put
    assert seeded.store_calls.get("put_immutable") is None and seeded.store_calls.get("put_conditional") == 1
    assert seeded.store_calls.get("list") == 1
    assert close(seeded.outputs[0], [[2 * x for x in row] for row in eager(w1, 4)])
