"""Cache key derivation: what changes the key, and what must not."""

from __future__ import annotations

from compile_cache.config import CompileConfig
from compile_cache.factors import environment_factors
from compile_cache.key import CacheKey, diff_factors


def test_key_is_stable_and_readable() -> None:
    f = environment_factors(CompileConfig().cache_factors())
    a, b = CacheKey("v1", f), CacheKey("v1", dict(f))
    assert a.name == b.name
    assert a.name.startswith("v1.torch2.13.0")
    assert "-cpu-" in a.name and a.name.endswith(a.fingerprint)
    assert "/" not in a.name


def test_every_factor_changes_the_fingerprint() -> None:
    f = environment_factors(CompileConfig().cache_factors())
    base = CacheKey("v1", f).fingerprint
    for k in f:
        changed = {**f, k: f[k] + "x"}
        assert CacheKey("v1", changed).fingerprint != base, k


def test_factors_cover_the_environment() -> None:
    f = environment_factors({})
    for k in ("torch", "python", "cpu.isa", "device", "platform"):
        assert f.get(k), k


def test_compile_config_changes_the_key_but_not_the_version() -> None:
    a = CacheKey("v1", environment_factors(CompileConfig().cache_factors()))
    b = CacheKey("v1", environment_factors(CompileConfig(dynamic=True).cache_factors()))
    c = CacheKey("v1", environment_factors(CompileConfig(options={"max_autotune": True}).cache_factors()))
    assert len({a.name, b.name, c.name}) == 3
    assert diff_factors(a.factors, b.factors) == ["compile.dynamic: None != True"]
