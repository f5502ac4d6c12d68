"""Inductor's CPU ISA decision travels with the entry (compile_cache/isa.py): a warm boot on a CPU that confirms the
record replays it (no probe) and still hits Inductor's caches; a CPU that does not confirm it probes."""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

import pytest

from compile_cache import isa
from tests.conftest import boot

AVX512 = "-mavx512f -mavx512dq -mavx512vl -mavx512bw -mfma"
HOST = "fpu sse avx avx2 fma f16c avx512f avx512dq avx512bw avx512vl avx512_vnni"


def _cpuinfo(tmp_path: Path, flags: str) -> Path:
    p = tmp_path / "cpuinfo"
    p.write_text(f"processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    return p


def _record(tmp_path: Path, asked: list[tuple[str, str, bool]], features: str, **over: str) -> Path:
    rec = {
        "format": 1,
        "torch": isa._torch_version(),
        "machine": platform.machine(),
        "compiler": isa._compiler(),
        "decision": "avx512 avx512_vnni",
        "cpu_features": features.split(),
        "answers": [{"question": [name, flags, "0123456789abcdef"], "ok": ok} for name, flags, ok in asked],
        **over,
    }
    p = tmp_path / "inductor" / isa.RECORD
    p.parent.mkdir(parents=True)
    p.write_text(json.dumps(rec))
    return p


def test_compiler_flags_name_cpu_features() -> None:
    assert isa.features_of(f"{AVX512} -mavx512vnni -mavx512bf16") == {
        "avx512f", "avx512dq", "avx512vl", "avx512bw", "fma", "avx512_vnni", "avx512_bf16"}
    assert isa.features_of("-mamx-tile -mamx-bf16 -mamx-int8 -mamx-fp16") == {
        "amx_tile", "amx_bf16", "amx_int8", "amx_fp16"}
    assert isa.features_of("-mavx2 -mfma -mf16c") == {"avx2", "fma", "f16c"}
    # what no cpuinfo flag confirms: the ISA is probed
    assert isa.features_of("-march=armv8-a+sve+bf16 -msve-vector-bits=256") is None
    assert isa.features_of("/arch:AVX512") is None


@pytest.mark.skipif(not platform.system() == "Linux", reason="/proc/cpuinfo is Linux's")
def test_cpu_flags_come_from_cpuinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isa.cpu_flags(_cpuinfo(tmp_path, HOST)) == set(HOST.split())
    assert isa.cpu_flags(tmp_path / "missing") is None
    monkeypatch.setattr(isa.sys, "platform", "darwin")
    assert isa.cpu_flags(_cpuinfo(tmp_path, HOST)) is None  # no /proc: probe


@pytest.mark.skipif(not platform.system() == "Linux", reason="/proc/cpuinfo is Linux's")
def test_a_record_replays_only_where_this_cpu_confirms_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    answers = [("avx512 avx512_vnni", f"{AVX512} -mavx512vnni -mavx512vl", True), ("avx512", AVX512, True),
               ("avx512", f"{AVX512} -mavx512bf16", False), ("avx2", "-mavx2 -mfma -mf16c", True)]
    features = "avx2 avx512bw avx512dq avx512f avx512_vnni avx512vl f16c fma"  # the recording host lacked bf16
    rec = _record(tmp_path, answers, features)
    monkeypatch.setattr(isa, "CPUINFO", _cpuinfo(tmp_path, HOST))
    got, why, rewrite = isa._usable_record(rec)
    assert len(got) == 4 and sum(got.values()) == 3 and why == "" and not rewrite

    monkeypatch.setattr(isa, "CPUINFO", _cpuinfo(tmp_path, HOST.replace(" avx512_vnni", "")))
    got, why, rewrite = isa._usable_record(rec)
    assert got == {} and why == "this CPU lacks avx512_vnni" and not rewrite  # another CPU's record stays

    # a feature a "no" was given for: the probe might say yes here; a better ISA is not given up
    monkeypatch.setattr(isa, "CPUINFO", _cpuinfo(tmp_path, f"{HOST} avx512_bf16"))
    got, why, _ = isa._usable_record(rec)
    assert got == {} and why == "this CPU also has avx512_bf16"

    monkeypatch.setattr(isa, "CPUINFO", tmp_path / "no-cpuinfo")
    assert isa._usable_record(rec)[:2] == ({}, "no /proc/cpuinfo flags to confirm it")


@pytest.mark.skipif(not platform.system() == "Linux", reason="/proc/cpuinfo is Linux's")
@pytest.mark.parametrize(("over", "why"), [
    ({"torch": "0.0.1"}, "recorded under another torch (0.0.1)"),
    ({"machine": "riscv64"}, "recorded under another machine (riscv64)"),
    ({"compiler": "another"}, "recorded with another C++ compiler"),
    ({"answers": "garbage"}, "malformed record"),
])
def test_a_record_of_another_build_is_not_replayed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, over: dict,
                                                   why: str) -> None:
    rec = _record(tmp_path, [("avx2", "-mavx2 -mfma -mf16c", True)], "avx2 f16c fma", **over)
    monkeypatch.setattr(isa, "CPUINFO", _cpuinfo(tmp_path, HOST))
    got, reason, rewrite = isa._usable_record(rec)
    assert got == {} and reason.startswith(why)
    assert rewrite == why.startswith("malformed")  # a broken record is replaced by what this boot probes
    assert isa._usable_record(tmp_path / "none.json") == ({}, "no record in the cache dir", True)


def _fake_cpu(tmp_path: Path, drop: str) -> dict[str, str]:
    """The environment of a boot that reads a fake /proc/cpuinfo: this host's, without ``drop``."""
    host = isa.cpu_flags()
    assert host is not None and drop in host
    fake = _cpuinfo(tmp_path, " ".join(sorted(host - {drop})))
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "from pathlib import Path\nimport compile_cache.isa\n"
        f"compile_cache.isa.CPUINFO = Path({str(fake)!r})\n")
    return {"PYTHONPATH": f"{site}:{Path(__file__).resolve().parent.parent}"}


@pytest.mark.skipif(isa.cpu_flags() is None, reason="no /proc/cpuinfo flags: every boot probes")
def test_warm_boot_replays_the_entry_decision_and_still_hits(tmp_path: Path) -> None:
    # The cache-dir restore looks every graph up by its FX-graph key, which hashes Inductor's config: a replayed
    # decision must leave those keys as a probing boot's, so this test runs jit_restore=dir.
    env = {"COMPILE_CACHE_URL": str(tmp_path / "store"), "COMPILE_CACHE_JIT_RESTORE": "dir"}
    cold = boot("tests.tiny_predictor:Predictor", {**env, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cold")})
    assert cold.metrics["isa"]["source"] == "probed" and cold.metrics["isa"]["probes"] > 0
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "warm")
    b = boot("tests.tiny_predictor:Predictor", env, {"batch": 1})
    m = b.metrics
    assert m["cache"] == "hit"
    rec = json.loads((tmp_path / "warm" / isa.RECORD).read_text())  # restored: the cold boot recorded it
    assert rec["answers"] and rec["decision"] == m["isa"]["decision"]
    assert m["isa"]["source"] == "recorded" and m["isa"]["probes"] == 0, m["isa"]
    # Inductor's cache keys are those of a probing boot: every graph hits, none compiles again
    assert m["fxgraph_hits"] > 0 and m["fxgraph_misses"] == 0
    part = m["parts"]["model"]
    assert all(part[k] >= 0 for k in ("import_s", "isa_s", "load_s", "first_calls_s"))
    assert part["compile_s"] == pytest.approx(sum(part[k] for k in ("import_s", "isa_s", "load_s", "first_calls_s")),
                                              abs=1e-3)
    assert "  cpu isa    " in b.stderr and "recorded, 0 probe(s)" in b.stderr

    # The same entry on a CPU without one of the recorded features: Inductor probes, and decides for this CPU.
    drop = "avx512_vnni" if "avx512_vnni" in rec["cpu_features"] else rec["cpu_features"][0]
    env = {**env, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "other-cpu"), **_fake_cpu(tmp_path, drop)}
    b = boot("tests.tiny_predictor:Predictor", env, {"batch": 1}, wait_upload=False)
    m = b.metrics
    assert m["isa"]["source"] == "probed" and m["isa"]["probes"] > 0, m["isa"]
    assert m["isa"]["reason"] == f"this CPU lacks {drop}"
    assert b.outputs[0] and not isinstance(b.outputs[0], dict)  # served
    # the record is the recording CPU's: a mismatching host leaves it as it was
    assert json.loads((tmp_path / "other-cpu" / isa.RECORD).read_text()) == rec


@pytest.mark.skipif(isa.cpu_flags() is None, reason="no /proc/cpuinfo flags: every boot probes")
def test_precompiled_functions_load_under_the_replayed_decision(tiny_seeded_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"  # the session's seed: a cold boot under the default restore (precompile)
    shutil.copytree(tiny_seeded_store, store)
    env = {"COMPILE_CACHE_URL": str(store), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "warm")}
    b = boot("tests.tiny_predictor:Predictor", env, {"batch": 4})
    assert (tmp_path / "warm" / isa.RECORD).is_file()  # the seed boot recorded its decision; the entry brought it
    m = b.metrics
    assert m["cache"] == "hit" and m["isa"]["source"] == "recorded" and m["isa"]["probes"] == 0, m["isa"]
    assert m["parts"]["model"]["precompiled"]["loaded"] == 2 and m["parts"]["model"]["precompiled"]["built"] == 0
    assert m["compiles"] == 0 and b.request_path_compiles == 0
