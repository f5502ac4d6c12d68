"""Declaring parts and on_new_shape: clear errors for bad declarations, config layering, the env override. Fast: no
compile, no runtime."""

from __future__ import annotations

import pytest

from compile_cache import CompileConfig, ConfigError, Part, Settings
from compile_cache.metrics import PART_KEYS, BootMetrics
from compile_cache.parts import Parts, check_name


def test_part_overrides_layer_over_the_runner_config_and_the_environment_wins() -> None:
    base = CompileConfig(dynamic=False, backend="inductor")
    part = Part(print, strategy="export", backend="aot_eager")
    cfg = part.config(base, "p")
    assert (cfg.strategy, cfg.backend, cfg.dynamic) == ("export", "aot_eager", False)
    env = Settings.from_env({"COMPILE_CACHE_STRATEGY": "jit", "COMPILE_CACHE_ON_NEW_SHAPE": "ERROR"})
    cfg = cfg.with_overrides(env)
    assert (cfg.strategy, cfg.backend, cfg.on_new_shape) == ("jit", "aot_eager", "error")
    assert Part(print).config(base, "p") is base  # no overrides: the runner's own


def test_bad_part_declarations_say_what_is_wrong() -> None:
    with pytest.raises(TypeError, match="unknown config field.*'strategey'"):
        Part(print, strategey="jit")
    with pytest.raises(TypeError, match="nn.Module or a callable"):
        Part("not a model")
    with pytest.raises(ConfigError, match="part 'p'.*on_new_shape"):
        Part(print, on_new_shape="sometimes").config(CompileConfig(), "p")
    for bad in ("", "has space", "1st", "a/b", 3):
        with pytest.raises(ConfigError, match="part name"):
            check_name(bad)


def test_on_new_shape_default_and_its_setting() -> None:
    assert CompileConfig().on_new_shape == "eager"
    assert "compile.on_new_shape" not in str(CompileConfig(on_new_shape="error").cache_factors())  # not a key factor
    with pytest.raises(ConfigError, match="COMPILE_CACHE_ON_NEW_SHAPE.*eager \\| compile \\| error"):
        Settings.from_env({"COMPILE_CACHE_ON_NEW_SHAPE": "later"})


def test_parts_by_key_and_by_attribute() -> None:
    parts = Parts({"decoder": len})
    assert parts["decoder"] is len and parts.decoder is len and list(parts) == ["decoder"]
    with pytest.raises(KeyError, match="no part 'unet'; this runner has \\['decoder'\\]"):
        parts["unet"]
    with pytest.raises(AttributeError, match="no part 'unet'"):
        parts.unet  # noqa: B018


def test_one_word_per_concept_the_strategy_and_the_jit_restore_mode() -> None:
    from compile_cache.strategies import chain

    def tried(**cfg: object) -> list[tuple[str, str]]:
        return [(s.name, getattr(s, "restore", "")) for s in chain(CompileConfig(**cfg))]

    assert tried(jit_restore="precompile") == [("jit", "precompile")]
    assert tried(jit_restore="dir") == [("jit", "dir")]
    # the export strategy falls back to jit, which restores the dir: jit_restore is the jit strategy's setting
    assert tried(strategy="export", jit_restore="precompile") == [("export", ""), ("jit", "dir")]
    assert tried(strategy="export", enable=False) == [("jit", "precompile")]  # eager by choice: jit, no export
    assert PART_KEYS[:2] == ("strategy", "jit_restore")


def test_the_timeline_names_each_part_by_its_strategy_and_restore_mode() -> None:
    part = {"compile_s": 1.0, "fxgraph_hits": 0, "fxgraph_misses": 2, "request_path_compiles": 0,
            "request_path_eager_calls": 0, "eager_fallback": ""}
    m = BootMetrics(strategy="mixed", parts={"enc": {**part, "strategy": "export", "jit_restore": ""},
                                             "head": {**part, "strategy": "jit", "jit_restore": "precompile"}})
    lines = m.timeline().splitlines()
    assert "    part enc: export  1.00s  fx graph hits 0  misses 2" in lines
    assert "    part head: jit, jit_restore precompile  1.00s  fx graph hits 0  misses 2" in lines
