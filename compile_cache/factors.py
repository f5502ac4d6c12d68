"""Every factor of the cache key, each with the reason it is there (vLLM's habit): read this file and you know what
the key covers.

A key is ``<lineage>.<model part>.<summary>.<fingerprint>`` (key.py). The model part hashes the model factors; the
fingerprint hashes the environment, config and runner factors. A factor decides whether an artifact built elsewhere
is right here; nothing else goes in (host name, paths, time), so equal environments share entries.

- Model factors (``MODEL``): computed by versions.identify, which reads the files.
- Environment factors (``ENVIRONMENT``): this process's torch, Python and hardware.
- Config factors: derived from ``CompileConfig``'s fields, included by default; ``EXCLUDED`` names the others.
- Runner factors: the export spec, and the ``part.<name>.`` prefixes of a runner with named parts.
- ``Settings``: each field overrides a config field (and is then whatever that field is) or is in
  ``SETTINGS_EXCLUDED``.

Torch is imported only when the environment is read: the key's store-side users (CLI ls/prune) need no torch.
"""

from __future__ import annotations

import json
import platform
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import __version__
from .config import CompileConfig, env_overrides

if TYPE_CHECKING:
    from .strategies import Plan

__all__ = [
    "FORMAT_VERSION",
    "MODEL",
    "ENVIRONMENT",
    "LEGACY",
    "EXCLUDED",
    "SETTINGS_EXCLUDED",
    "environment_factors",
    "config_factors",
    "runner_factors",
    "is_environment",
    "settings_field_factor",
]

# Bump when the store layout or snapshot format changes, or when the default of a config field outside LEGACY
# changes (such a field is in the key only away from its default: entries built at the old default would hit).
# 2: keys are <lineage>.<model part>.<summary>.<fingerprint> and manifests carry lineage, labels and the seed.
FORMAT_VERSION = "2"

# -- model factors (the key's model part: versions.identify computes them, docs/versions.md) --------------------------
MODEL: dict[str, str] = {
    "model.source": "the runner file and the local modules it imports decide what is traced",
    "model.requirements": "pinned requirements and cog.yaml decide the packages the model's code runs on",
    "model.weights": "tensor names, shapes and dtypes shape the graph (every byte where the config bakes values)",
    "model.version": "the version's label, only with COMPILE_CACHE_KEY_BY_VERSION: a fresh compile per label",
}


# -- environment factors ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Env:
    why: str
    value: Callable[[Any], str]  # of the torch module
    gpu: bool = False  # read only where CUDA (or ROCm) is available


def _triton(torch: Any) -> str:
    try:
        import triton
    except ImportError:
        return "none"
    return str(triton.__version__)


ENVIRONMENT: dict[str, _Env] = {
    "compile_cache.format": _Env("the store layout and snapshot format this code reads", lambda t: FORMAT_VERSION),
    "compile_cache.version": _Env("our code writes and loads the artifacts", lambda t: __version__),
    "python": _Env("bytecode and Dynamo's guards belong to one interpreter",
                   lambda t: f"{sys.implementation.name}-{platform.python_version()}"),
    "platform": _Env("generated C++ and its ABI belong to one OS and architecture",
                     lambda t: f"{platform.system()}-{platform.machine()}"),
    "torch": _Env("Dynamo's and Inductor's code and cache formats change between releases", lambda t: t.__version__),
    "torch.git": _Env("two builds of one version can differ (nightlies, local builds)",
                      lambda t: str(getattr(t.version, "git_version", ""))),
    "cpu.isa": _Env("Inductor builds C++ for the host ISA: on a CPU without it the code can die of SIGILL",
                    lambda t: t.backends.cpu.get_cpu_capability()),
    "device": _Env("CPU and GPU code differ", lambda t: "cuda" if t.cuda.is_available() else "cpu"),
    "gpu.arch": _Env("kernels are built for one compute capability",
                     lambda t: "sm_{}{}".format(*t.cuda.get_device_capability()), gpu=True),
    "gpu.name": _Env("autotuned configs are chosen for one GPU model", lambda t: t.cuda.get_device_name(), gpu=True),
    "cuda": _Env("kernels link against one CUDA runtime", lambda t: str(t.version.cuda or ""), gpu=True),
    "hip": _Env("kernels link against one ROCm runtime", lambda t: str(getattr(t.version, "hip", "") or ""),
                gpu=True),
    "triton": _Env("Triton compiles the GPU kernels; its cache format changes between releases", _triton, gpu=True),
}


def environment_factors(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Every factor of this process's environment that decides whether an artifact can be loaded here, plus
    ``extra`` (the runner's factors)."""
    import torch

    gpu = torch.cuda.is_available()
    f = {name: e.value(torch) for name, e in ENVIRONMENT.items() if gpu or not e.gpu}
    f.update(extra or {})
    return f


def is_environment(name: str) -> bool:
    """Whether a factor describes the machine (what ``inspect --diff-env`` compares), not the runner."""
    return name in ENVIRONMENT


# -- config factors (CompileConfig's fields, as ``compile.<field>``) -------------------------------------------------
# LEGACY: the fields every key of format 2 carries, at every value and spelled as below, so existing entries keep
# their key. Any other field is a factor only where its value differs from its default: adding one re-keys nothing.
LEGACY: dict[str, str] = {
    "enable": "False serves eager: nothing is compiled",
    "strategy": "jit keeps Inductor's cache dir, export an AOTInductor package",
    "backend": "the compiler that generates the code",
    "mode": "autotuning and CUDA graphs change the kernels",
    "dynamic": "static or symbolic shapes give other graphs",
    "fullgraph": "where graphs break decides what is compiled",
    "options": "Inductor's options change its code (freezing folds weights into it)",
    "inference_mode": "tracing without autograd gives other graphs",
    "memory_format": "channels_last changes the layouts the kernels are built for",
    "sdpa_backend": "the attention kernel is traced into the graph",
}
EXCLUDED: dict[str, str] = {
    "jit_restore": "both restores read and write the same entry",
    "on_new_shape": "what a call with an undeclared shape gets after setup; it changes no generated code",
    "on_miss": "whether a miss compiles in setup or in the background; both build the same entry",
    "key_weight_values": "it moves the model part instead: model.weights then hashes every weight byte",
    "batch": "batching pads or splits calls to shapes the part already declares; it compiles nothing new",
}


def _spelling(value: Any) -> str:
    # json for mappings (sorted: declaration order is not a change); str() for the rest, as the key has always had
    return json.dumps(value, sort_keys=True) if isinstance(value, Mapping) else str(value)


def config_factors(cfg: CompileConfig) -> dict[str, str]:
    """The fields of ``cfg`` that change generated code: every field not in ``EXCLUDED``, as ``compile.<field>``."""
    out: dict[str, str] = {}
    for name, info in type(cfg).model_fields.items():
        if name in EXCLUDED:
            continue
        value = getattr(cfg, name)
        if name in LEGACY or value != info.get_default(call_default_factory=True):
            out[f"compile.{name}"] = _spelling(value)
    return out


# -- runner factors --------------------------------------------------------------------------------------------------
def runner_factors(plans: Iterable[Plan], *, single: bool) -> dict[str, str]:
    """What the key covers besides the environment. One part declared as a module (``single``) keeps the factor
    names a single-model runner always had (its entries stay valid); named parts prefix theirs with
    ``part.<name>.``, and ``compile.strategy`` then names every strategy for the key's readable summary."""
    plans = list(plans)
    factors: dict[str, str] = {}
    for plan in plans:
        f = config_factors(plan.cfg)
        if plan.spec is not None:  # the exported package serves exactly these shapes, dtypes and dim ranges
            f["export.spec"] = json.dumps(plan.spec.describe(), sort_keys=True)
        factors.update(f if single else {f"part.{plan.name}.{k}": v for k, v in f.items()})
    if not single:
        factors["compile.strategy"] = "+".join(sorted({p.cfg.strategy for p in plans}))
    return factors


# -- settings --------------------------------------------------------------------------------------------------------
SETTINGS_EXCLUDED: dict[str, str] = {
    "url": "where entries live, not what they hold: one entry can move between stores",
    "disable": "turns the store off; what compiles is the same",
    "model_version": "a label (docs/versions.md); it joins the key as model.version only with key_by_version",
    "model_name": "the lineage: the key's first name part, not hashed",
    "key_by_version": "it decides whether model.version is a model factor",
    "metrics_file": "where the metrics go",
    "log_file": "where the logs go",
    "restore_timeout_s": "a deadline of the restore, not of what it restores",
    "flush_budget_s": "a deadline of the exit upload",
    "upload_interval_s": "when uploads happen",
    "signing_key": "trust decides whether an entry may load, not which entry is the right one",
    "verify_keys": "trust, as signing_key",
    "allow_unsigned": "trust, as signing_key",
    "require_signed": "trust, as signing_key",
    "max_restore_bytes": "a cap on a restore, not part of what is restored",
    "max_restore_files": "a cap on a restore, not part of what is restored",
    "progress": "progress bars in the CLI",
    "build_lease": "who builds a missing entry, not what it holds",
    "lease_ttl_s": "when a build lease counts as abandoned",
    "lease_wait_s": "how long a replica waits for another's build",
}


def settings_field_factor(name: str) -> str | None:
    """The config field a ``Settings`` field overrides (it is then a factor exactly when that field is one), or None
    for the settings in ``SETTINGS_EXCLUDED``. Raises ``KeyError`` for a field that is neither."""
    overridden = {o.setting: field for field, o in env_overrides().items()}
    if name in overridden:
        return overridden[name]
    if name in SETTINGS_EXCLUDED:
        return None
    raise KeyError(f"Settings.{name} is neither a compile-config override nor in factors.SETTINGS_EXCLUDED")
