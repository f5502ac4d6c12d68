"""Settings (read from the environment when asked for) and the declarative compile config.

Every environment variable the framework reads is declared here, once, with its default and the forms it accepts;
the README's table and the CLI's defaults are derived from these models.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from .errors import ConfigError

__all__ = ["Settings", "CompileConfig", "Batch", "EnvOverride", "DEFAULT_STORE_URL", "env_table", "env_overrides"]

DEFAULT_STORE_URL = "file://.cache/compile-store"

_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_MEMORY_FORMATS = ("contiguous", "channels_last")
# Names of torch.nn.attention.SDPBackend members; None (env: "default") lets torch choose per call.
_SDPA_BACKENDS = ("math", "flash", "efficient", "cudnn")
# What a call with a shape nobody declared gets once setup is done (docs/runner.md says why "eager" is the default).
_ON_NEW_SHAPE = ("eager", "compile", "error")
# What a part that no restored entry covers does until it is compiled (docs/fleet.md).
_ON_MISS = ("wait", "serve")


def _invalid(name: str, value: object, accepted: str, reason: str = "") -> ConfigError:
    why = f" ({reason})" if reason else ""
    return ConfigError(f"{name}={value!r} is invalid{why}. Accepted: {accepted}")


class _Settings(BaseModel):
    """Runtime settings. Build with :meth:`from_env`; field aliases are the environment variable names."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    url: str = Field(
        DEFAULT_STORE_URL,
        alias="COMPILE_CACHE_URL",
        description="where the store lives: file:///abs/dir, file://rel/dir, a plain directory path, "
        "or s3://bucket[/prefix]",
    )
    disable: bool = Field(
        False, alias="COMPILE_CACHE_DISABLE", description="1/true turns the store off (compile still runs)"
    )
    model_version: str | None = Field(
        None,
        alias="COMPILE_CACHE_MODEL_VERSION",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="the version's label (1-64 of A-Z a-z 0-9 . _ -), e.g. a platform's version id: shown by ls, "
        "the timeline and the manifest, used by prune; it does not change the key (docs/versions.md); default: "
        "the key's model part",
    )
    model_name: str | None = Field(
        None,
        alias="COMPILE_CACHE_MODEL_NAME",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$",
        description="the model's lineage (1-64 of A-Z a-z 0-9 _ -): a new version seeds its cache from the newest "
        "entry of its lineage; default: <predictor class>-<weights dir name>",
    )
    key_by_version: bool = Field(
        False,
        alias="COMPILE_CACHE_KEY_BY_VERSION",
        description="1/true: a fresh compile for every new version label (the label joins the key, no seeding)",
    )
    metrics_file: Path | None = Field(
        None, alias="COMPILE_CACHE_METRICS_FILE", description="path of a JSON metrics file, rewritten after uploads"
    )
    log_file: Path | None = Field(
        None,
        alias="COMPILE_CACHE_LOG_FILE",
        description="log file (shutdown logs only reach a file); default <inductor cache dir>/compile_cache/log.txt",
    )
    restore_timeout_s: float = Field(
        60.0, gt=0, alias="COMPILE_CACHE_RESTORE_TIMEOUT_S", description="restore deadline in seconds, > 0"
    )
    flush_budget_s: float = Field(
        8.0,
        gt=0,
        lt=10,
        alias="COMPILE_CACHE_FLUSH_BUDGET_S",
        description="hard budget of the exit flush in seconds, > 0 and < 10 (Cog kills the worker at 10 s)",
    )
    upload_interval_s: float = Field(
        0.0,
        ge=0,
        alias="COMPILE_CACHE_UPLOAD_INTERVAL_S",
        description="after the first upload, look for new artifacts every N seconds; 0 = only at exit",
    )
    signing_key: SecretStr | None = Field(
        None,
        alias="COMPILE_CACHE_SIGNING_KEY",
        description="HMAC-SHA256 key: uploads sign manifests with it; restores load only entries it (or "
        "COMPILE_CACHE_VERIFY_KEYS) verifies",
    )
    verify_keys: SecretStr | None = Field(
        None,
        alias="COMPILE_CACHE_VERIFY_KEYS",
        description="earlier signing keys, comma-separated, that still verify while a key rotation rolls out; the "
        "next upload re-signs what they verified with COMPILE_CACHE_SIGNING_KEY (needs it set)",
    )
    allow_unsigned: bool = Field(
        False,
        alias="COMPILE_CACHE_ALLOW_UNSIGNED",
        description="1/true: with a signing key, still load unsigned entries (migrating from an unsigned store); "
        "entries signed with another key stay refused",
    )
    require_signed: bool = Field(
        False,
        alias="COMPILE_CACHE_REQUIRE_SIGNED",
        description="1/true refuses unsigned entries, and without a signing key every entry",
    )
    max_restore_bytes: int = Field(
        8 * 2**30, gt=0, alias="COMPILE_CACHE_MAX_RESTORE_BYTES", description="cap on unpacked bytes per restore"
    )
    max_restore_files: int = Field(
        200_000, gt=0, alias="COMPILE_CACHE_MAX_RESTORE_FILES", description="cap on unpacked files per restore"
    )
    progress: bool = Field(
        True, alias="COMPILE_CACHE_PROGRESS", description="0/false turns progress bars off (CLI)"
    )
    build_lease: bool = Field(
        True,
        alias="COMPILE_CACHE_BUILD_LEASE",
        description="0/false: no build lease, every replica that misses compiles; on: one replica builds a new key "
        "while the others wait for its entry (docs/fleet.md)",
    )
    lease_ttl_s: float = Field(
        60.0,
        gt=0,
        alias="COMPILE_CACHE_LEASE_TTL_S",
        description="seconds a build lease may stay unchanged before a waiting replica takes it over, > 0; the "
        "holder renews it every third of that",
    )
    lease_wait_s: float = Field(
        300.0,
        ge=0,
        alias="COMPILE_CACHE_LEASE_WAIT_S",
        description="seconds a replica's setup waits for another replica's build before it compiles itself, >= 0; "
        "keep it + a cold compile below COG_SETUP_TIMEOUT (docs/fleet.md)",
    )
    # The compile-config overrides follow, generated from CompileConfig's fields (see Settings below).

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        if "://" in v and not v.startswith(("file://", "s3://")):
            raise ValueError("unknown scheme")
        if v.startswith("s3://") and not v[len("s3://") :].split("/", 1)[0]:
            raise ValueError("no bucket")
        if v in ("", "file://"):
            raise ValueError("empty path")
        return v

    @model_validator(mode="after")
    def _check_trust(self) -> _Settings:
        if self.verify_keys is not None and self.signing_key is None:
            raise ValueError(
                "COMPILE_CACHE_VERIFY_KEYS is set without COMPILE_CACHE_SIGNING_KEY: it adds earlier keys to the "
                "signing key during a rotation; set COMPILE_CACHE_SIGNING_KEY to the current key"
            )
        if self.allow_unsigned and self.require_signed:
            raise ValueError("COMPILE_CACHE_ALLOW_UNSIGNED and COMPILE_CACHE_REQUIRE_SIGNED contradict each other")
        return self

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the settings from ``environ`` (default ``os.environ``, read now, not at import).

        Empty values count as unset. Raises :class:`ConfigError` naming the variable and what it accepts.
        """
        environ = os.environ if environ is None else environ
        names = {f.alias: name for name, f in cls.model_fields.items() if f.alias}
        data = {k: v for k, v in environ.items() if k in names and v.strip() != ""}
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            if not err["loc"]:  # a rule between settings (_check_trust): its message names them
                raise ConfigError(str(err["msg"]).removeprefix("Value error, ")) from e
            alias = str(err["loc"][0])
            field = cls.model_fields.get(names.get(alias, ""), None)
            accepted = field.description if field is not None and field.description else "see README"
            secret = alias in ("COMPILE_CACHE_SIGNING_KEY", "COMPILE_CACHE_VERIFY_KEYS")
            shown = "***" if secret else data.get(alias)
            raise _invalid(alias, shown, accepted, err["msg"]) from e

    # -- derived values ---------------------------------------------------------------------------------------------
    @property
    def signing_key_bytes(self) -> bytes | None:
        return self.signing_key.get_secret_value().encode() if self.signing_key else None

    @property
    def verify_keys_bytes(self) -> tuple[bytes, ...]:
        """COMPILE_CACHE_VERIFY_KEYS split at commas, blanks around each key dropped (a key has no comma)."""
        if self.verify_keys is None:
            return ()
        return tuple(k.strip().encode() for k in self.verify_keys.get_secret_value().split(",") if k.strip())


def env_table() -> list[tuple[str, str, str]]:
    """(variable, default, meaning) for every setting: the README's table is generated from this."""
    rows = []
    for f in Settings.model_fields.values():
        default = "" if f.default is None else str(f.default)
        rows.append((f.alias or "", default, f.description or ""))
    return rows


@dataclass(frozen=True)
class EnvOverride:
    """On a ``CompileConfig`` field: the environment variable that overrides it. The ``Settings`` field, its row in
    the env table and the override itself (:meth:`CompileConfig.with_overrides`) are derived from this.

    The variable accepts the field's own values (a ``Literal``'s words, case-insensitive; 0/1/true/false for a bool;
    a JSON object for a dict, which adds to the declared one) and the extra ``words``, each standing for a value."""

    env: str
    doc: str = ""  # what the env table says the variable accepts; default: the accepted words joined by " | "
    words: Mapping[str, Any] = field(default_factory=dict)
    setting: str = ""  # the Settings field's name where it is not the config field's


Strategy = Literal["jit", "export"]


class Batch(BaseModel):
    """Request batching for a part (compile_cache/batching.py, docs/runner.md "Batching"): calls to the part's
    ``batched`` that arrive within ``max_delay_ms`` of the first queued one, up to ``max_size`` rows, are joined
    along ``dim`` into one model call. ``collate(calls) -> (args, kwargs, sizes)`` replaces the default join (e.g. to
    pad token ids to a common length); it is code, so it is in no dump and no key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_size: int = Field(32, ge=1)
    max_delay_ms: float = Field(5.0, ge=0)
    dim: int = 0
    collate: Callable[..., Any] | None = Field(None, exclude=True)


class CompileConfig(BaseModel):
    """What to compile and how: declared on the predictor class, like TorchServe's ``pt2:`` section.

    ``strategy="jit"`` is ``torch.compile`` with the Inductor cache dir restored; ``"export"`` is torch.export plus
    an AOTInductor package kept in the store (no Dynamo at boot). Every field is a cache key factor unless
    compile_cache/factors.py excludes it by name.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # The order of the fields with an EnvOverride is the order of their rows in the env table.
    strategy: Annotated[Strategy, EnvOverride("COMPILE_CACHE_STRATEGY")] = "jit"
    enable: Annotated[
        bool, EnvOverride("COMPILE_CACHE_COMPILE", "0/false serves eager, 1/true compiles", setting="compile_enable")
    ] = True
    backend: Annotated[
        str, EnvOverride("COMPILE_CACHE_BACKEND", "torch.compile backend, e.g. inductor, aot_eager, eager")
    ] = "inductor"
    mode: Annotated[Literal[_COMPILE_MODES] | None, EnvOverride("COMPILE_CACHE_MODE")] = None  # type: ignore[valid-type]
    dynamic: Annotated[
        bool | None, EnvOverride("COMPILE_CACHE_DYNAMIC", words={"true": True, "false": False, "auto": None})
    ] = None
    fullgraph: Annotated[bool, EnvOverride("COMPILE_CACHE_FULLGRAPH", "0/1")] = False
    options: Annotated[
        dict[str, Any],
        EnvOverride("COMPILE_CACHE_OPTIONS", 'a JSON object of Inductor options, e.g. {"freezing": false}'),
    ] = Field(default_factory=dict)
    inference_mode: bool = True
    # "channels_last": model and 4-D tensor inputs converted before compiling and on every call (helps CNNs).
    memory_format: Annotated[
        Literal[_MEMORY_FORMATS], EnvOverride("COMPILE_CACHE_MEMORY_FORMAT")  # type: ignore[valid-type]
    ] = "contiguous"
    # Attention kernel for F.scaled_dot_product_attention during compile, warm-up and calls; None = torch's choice.
    sdpa_backend: Annotated[
        Literal[_SDPA_BACKENDS] | None,  # type: ignore[valid-type]
        EnvOverride("COMPILE_CACHE_SDPA_BACKEND", " | ".join(_SDPA_BACKENDS) + " | default (torch chooses)",
                    words={"default": None}),
    ] = None
    # strategy="jit": what a warm boot restores. "precompile": AOT-precompiled functions per shape on top of the
    # Inductor cache dir, so no Dynamo tracing, for each part where they round-trip (else that part uses the dir
    # alone); "dir": the cache dir only, Dynamo traces every shape with its full guards (compile_cache/precompile.py,
    # docs/restore-strategies.md). Not a cache factor: both read and write the same entry.
    jit_restore: Annotated[
        Literal["dir", "precompile"],
        EnvOverride("COMPILE_CACHE_JIT_RESTORE",
                    "precompile | dir (jit strategy: what a warm boot restores; docs/restore-strategies.md)"),
    ] = "precompile"
    # After setup, a call whose shape no warm-up example (jit) or export dim (export) declared: "eager" serves it
    # uncompiled (logged once per shape, counted as request_path_eager_calls), "compile" compiles it on the request
    # path (seconds to minutes on a real model), "error" fails that prediction. Not a cache factor: it changes no
    # generated code.
    on_new_shape: Annotated[
        Literal[_ON_NEW_SHAPE],  # type: ignore[valid-type]
        EnvOverride("COMPILE_CACHE_ON_NEW_SHAPE",
                    "eager | compile | error: what a call with an undeclared shape gets after setup "
                    "(default eager: served uncompiled, logged once per shape, counted)"),
    ] = "eager"
    # On a miss (no entry covers the part): "wait" compiles in setup (the default: a boot that predicts and stops,
    # like make predict or the warm CLI, leaves an entry behind); "serve" serves the part eager as soon as load() is
    # done while a child process builds the entry, then swaps the compiled part in (docs/fleet.md). Not a cache
    # factor: both build the same entry.
    on_miss: Annotated[
        Literal[_ON_MISS],  # type: ignore[valid-type]
        EnvOverride("COMPILE_CACHE_ON_MISS",
                    "wait | serve: on a miss, compile in setup (wait) or serve eager at once, build in the "
                    "background and swap in (serve; docs/fleet.md)"),
    ] = "wait"
    # The model's weight values decide generated code (e.g. the model branches on a weight's value while tracing,
    # or folds weights into constants itself): the key then hashes every weight byte (docs/versions.md).
    key_weight_values: bool = False
    # Join concurrent calls of a part into one model call (compile_cache/batching.py); None: each call runs alone.
    # Not a cache factor: a batch is padded or split to shapes the part already declares.
    batch: Annotated[
        Batch | None,
        EnvOverride("COMPILE_CACHE_BATCH",
                    'off | a JSON object of max_size, max_delay_ms, dim, over the declared batching (or its '
                    'defaults), e.g. {"max_size": 16}', words={"off": None}),
    ] = None

    @field_validator("mode", "memory_format", "sdpa_backend", "on_new_shape", "on_miss", mode="before")
    @classmethod
    def _one_of(cls, v: Any, info: Any) -> Any:
        """A wrong value names the accepted ones (``None`` only where the field allows it)."""
        accepted, none_ok = {
            "mode": (_COMPILE_MODES, True),
            "memory_format": (_MEMORY_FORMATS, False),
            "sdpa_backend": (_SDPA_BACKENDS, True),
            "on_new_shape": (_ON_NEW_SHAPE, False),
            "on_miss": (_ON_MISS, False),
        }[info.field_name]
        if (v is None and none_ok) or v in accepted:
            return v
        names = ", ".join((("None",) if none_ok else ()) + tuple(accepted))
        raise ValueError(f"{info.field_name} {v!r} is not one of {names}")

    @field_validator("options")
    @classmethod
    def _options_json(cls, v: dict[str, Any]) -> dict[str, Any]:
        try:
            json.dumps(v, sort_keys=True)
        except TypeError as e:
            raise ValueError(f"options must be JSON-serialisable: {e}") from e
        return v

    def with_overrides(self, s: Settings) -> CompileConfig:
        """Apply the environment's overrides (``COMPILE_CACHE_BACKEND`` ...) on top of the declared config."""
        upd: dict[str, Any] = {}
        for name, o in env_overrides().items():
            v = getattr(s, o.setting)
            if v is None:
                continue
            if isinstance(v, dict) and (model := _model_of(name)) is not None:  # over the declared one, or defaults
                v = model.model_validate({**dict(getattr(self, name) or {}), **v})
            elif isinstance(v, dict):  # a JSON object adds to the declared options
                v = {**getattr(self, name), **v}
            elif isinstance(v, str):
                v = o.words.get(v, v)
            upd[name] = v
        return self.model_copy(update=upd) if upd else self

    def bakes_weights(self) -> bool:
        """Whether compiled code may hold weight values as constants, so that weight values belong in the key:
        Inductor ``freezing`` (declared in ``options`` or through TORCHINDUCTOR_FREEZING) or the user's opt-in."""
        freezing = self.options.get("freezing", os.environ.get("TORCHINDUCTOR_FREEZING", "0") == "1")
        return self.key_weight_values or bool(freezing)

    def cache_factors(self) -> dict[str, str]:
        """The parts of this config that change generated code: they go into the cache key (factors.py)."""
        from .factors import config_factors

        return config_factors(self)


def env_overrides() -> dict[str, EnvOverride]:
    """The ``CompileConfig`` fields the environment overrides, by field name, in field order (``setting`` filled in)."""
    out = {}
    for name, f in CompileConfig.model_fields.items():
        for o in f.metadata:
            if isinstance(o, EnvOverride):
                out[name] = replace(o, setting=o.setting or name)
    return out


def _lower(v: Any) -> Any:
    return v.lower() if isinstance(v, str) else v


def _json_object(v: Any) -> Any:
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON: {e}") from e
    if v is not None and not isinstance(v, dict):
        raise ValueError("not a JSON object")
    return v


def _unwrap(annotation: Any) -> Any:
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) in (Union, UnionType) and len(args) == 1:  # X | None: what X accepts
        return args[0]
    return annotation


def _model_of(name: str) -> type[BaseModel] | None:
    """The pydantic model a ``CompileConfig`` field holds (``batch``: :class:`Batch`), or None."""
    annotation = _unwrap(CompileConfig.model_fields[name].annotation)
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _model_fields_json(model: type[BaseModel], words: tuple[str, ...]) -> Callable[[Any], Any]:
    """A word, or a JSON object of the model's dumped fields, each checked as the model checks it."""
    def check(v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() in words:
            return v.strip().lower()
        v = _json_object(v)
        known = {n for n, f in model.model_fields.items() if not f.exclude}
        if set(v) - known:
            raise ValueError(f"unknown key(s) {sorted(set(v) - known)}; accepted: {sorted(known)}")
        try:
            model.model_validate(v)
        except ValidationError as e:
            err = e.errors()[0]
            raise ValueError(f"{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
        return v
    return check


def _setting(name: str, o: EnvOverride) -> tuple[Any, Any]:
    """The Settings field (type, Field) of one override: None = keep what the predictor declares."""
    annotation = _unwrap(CompileConfig.model_fields[name].annotation)
    words = (get_args(annotation) if get_origin(annotation) is Literal else ()) + tuple(o.words)
    if (model := _model_of(name)) is not None:
        typ: Any = Annotated[Literal[words] | dict[str, Any],  # type: ignore[valid-type]
                             BeforeValidator(_model_fields_json(model, words))]
    elif words:
        typ = Annotated[Literal[words], BeforeValidator(_lower)]
    elif get_origin(annotation) is dict:
        typ = Annotated[annotation, BeforeValidator(_json_object)]
    else:
        typ = annotation
    return typ | None, Field(None, alias=o.env, description=o.doc or " | ".join(words))


Settings = create_model(
    "Settings",
    __base__=_Settings,
    __module__=__name__,
    __doc__=_Settings.__doc__,
    **{o.setting: _setting(name, o) for name, o in env_overrides().items()},
)
