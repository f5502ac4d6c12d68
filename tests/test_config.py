"""Settings and compile config: defaults, env overrides, and errors that name the variable."""

from __future__ import annotations

import pytest

from compile_cache.config import DEFAULT_STORE_URL, CompileConfig, Settings, env_table
from compile_cache.errors import ConfigError


def test_defaults_without_env() -> None:
    s = Settings.from_env({})
    assert s.url == DEFAULT_STORE_URL
    assert s.disable is False
    assert s.flush_budget_s == 8.0
    assert s.signing_key is None


def test_empty_values_count_as_unset() -> None:
    assert Settings.from_env({"COMPILE_CACHE_URL": " ", "COMPILE_CACHE_DISABLE": ""}).url == DEFAULT_STORE_URL


@pytest.mark.parametrize(
    "var,value,accepted",
    [
        ("COMPILE_CACHE_URL", "gs://bucket/x", "s3://bucket"),
        ("COMPILE_CACHE_URL", "s3:///nobucket", "s3://bucket"),
        ("COMPILE_CACHE_DISABLE", "maybe", "1/true"),
        ("COMPILE_CACHE_FLUSH_BUDGET_S", "12", "< 10"),
        ("COMPILE_CACHE_FLUSH_BUDGET_S", "abc", "< 10"),
        ("COMPILE_CACHE_RESTORE_TIMEOUT_S", "-1", "> 0"),
        ("COMPILE_CACHE_MODEL_VERSION", "bad/version", "A-Z a-z 0-9"),
        ("COMPILE_CACHE_MODE", "turbo", "reduce-overhead"),
        ("COMPILE_CACHE_OPTIONS", "{not json", "JSON object"),
        ("COMPILE_CACHE_OPTIONS", "[1, 2]", "JSON object"),
        ("COMPILE_CACHE_STRATEGY", "aot", "jit | export"),
        ("COMPILE_CACHE_BATCH", "on", "JSON object"),
        ("COMPILE_CACHE_BATCH", '{"max_size": 0}', "max_size"),
        ("COMPILE_CACHE_BATCH", '{"collate": "x"}', "max_delay_ms"),
    ],
)
def test_invalid_value_names_variable_and_accepted_forms(var: str, value: str, accepted: str) -> None:
    with pytest.raises(ConfigError) as e:
        Settings.from_env({var: value})
    msg = str(e.value)
    assert var in msg and accepted in msg
    assert isinstance(e.value, ValueError)


def test_signing_key_never_in_error_messages() -> None:
    s = Settings.from_env({"COMPILE_CACHE_SIGNING_KEY": "s3cr3t-value"})
    assert "s3cr3t-value" not in repr(s) and "s3cr3t-value" not in str(s.model_dump())
    assert s.signing_key_bytes == b"s3cr3t-value"


def test_compile_overrides_from_env() -> None:
    base = CompileConfig(backend="inductor", dynamic=False, options={"a": 1})
    s = Settings.from_env(
        {
            "COMPILE_CACHE_BACKEND": "aot_eager",
            "COMPILE_CACHE_DYNAMIC": "auto",
            "COMPILE_CACHE_FULLGRAPH": "1",
            "COMPILE_CACHE_OPTIONS": '{"b": 2}',
            "COMPILE_CACHE_COMPILE": "0",
        }
    )
    c = base.with_overrides(s)
    assert (c.backend, c.dynamic, c.fullgraph, c.enable) == ("aot_eager", None, True, False)
    assert c.options == {"a": 1, "b": 2}
    assert base.with_overrides(Settings.from_env({})) == base


def test_batch_override_applies_over_the_declared_batching_or_its_defaults() -> None:
    from compile_cache import Batch

    declared = CompileConfig(batch=Batch(max_size=4, collate=len))
    c = declared.with_overrides(Settings.from_env({"COMPILE_CACHE_BATCH": '{"max_delay_ms": 2}'}))
    assert c.batch == Batch(max_size=4, max_delay_ms=2.0, collate=len)  # the declared collate stays
    assert declared.with_overrides(Settings.from_env({"COMPILE_CACHE_BATCH": "Off"})).batch is None
    assert CompileConfig().with_overrides(Settings.from_env({"COMPILE_CACHE_BATCH": '{"dim": 1}'})).batch == Batch(dim=1)
    assert "collate" not in declared.model_dump()["batch"]


def test_compile_config_rejects_unknown_fields_and_modes() -> None:
    with pytest.raises(ValueError, match="reduce-overhead"):
        CompileConfig(mode="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        CompileConfig(backnd="inductor")  # type: ignore[call-arg]


def test_env_table_lists_every_variable_once() -> None:
    names = [row[0] for row in env_table()]
    assert len(names) == len(set(names))
    assert {"COMPILE_CACHE_URL", "COMPILE_CACHE_DISABLE", "COMPILE_CACHE_METRICS_FILE"} <= set(names)


def test_readme_env_table_matches_the_settings_model() -> None:
    """The README's table is exactly what `python -m compile_cache env` prints from the settings model. To update it,
    paste that command's output between the env-table markers."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    block = readme.split("<!-- env-table: python -m compile_cache env -->\n", 1)[1].split("<!-- /env-table -->", 1)[0]
    cp = subprocess.run([sys.executable, "-m", "compile_cache", "env"], cwd=root, capture_output=True, text=True)
    assert cp.returncode == 0, cp.stderr
    assert block == cp.stdout
    for name, _default, _meaning in env_table():
        assert f"| `{name}` |" in block, f"{name} is missing from README's environment table"
