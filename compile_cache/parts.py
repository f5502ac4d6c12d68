"""Declaring what a runner compiles: one :class:`Part` per compiled module, and :class:`Parts`, what ``run()`` calls.

A runner's ``load()`` returns either one module (a single part named ``"model"``, configured by the runner's own
``compile_config``, ``warmup_examples()`` and ``export_spec()``) or ``{name: Part(...)}``. No torch here: a part holds
whatever the user gives it, and the strategies (compile_cache/strategies.py) make it fast.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from .config import CompileConfig
from .errors import ConfigError

__all__ = ["Part", "Parts", "SINGLE_PART"]

SINGLE_PART = "model"  # the name of the part when load() returns one module
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")  # an identifier: self.parts.<name>, and safe in file names


class Part:
    """One compiled part of a runner.

    ``module``: an ``nn.Module`` or any callable (``pipe.vae.decode``; the export strategy needs an ``nn.Module``).
    ``examples``: warm-up calls covering every shape requests will bring (``Example(args, kwargs, label)``).
    ``export_spec``: for ``strategy="export"``: the example inputs and the dynamic dims one package serves.
    ``config_overrides``: any :class:`CompileConfig` field, over the runner's ``compile_config`` (the environment's
    ``COMPILE_CACHE_*`` overrides still win: they are the operator's).
    """

    def __init__(self, module: Callable[..., Any], *, examples: Sequence[Any] = (), export_spec: Any = None,
                 **config_overrides: Any) -> None:
        if not callable(module):
            raise TypeError(f"Part(module): expected an nn.Module or a callable, got {type(module).__name__}")
        unknown = sorted(set(config_overrides) - set(CompileConfig.model_fields))
        if unknown:
            raise TypeError(f"Part() got unknown config field(s) {unknown}; CompileConfig has "
                            f"{sorted(CompileConfig.model_fields)}")
        self.module = module
        self.examples = list(examples)
        self.export_spec = export_spec
        self.config_overrides = dict(config_overrides)

    def config(self, base: CompileConfig, name: str) -> CompileConfig:
        """``base`` with this part's overrides, validated like the runner's own config."""
        if not self.config_overrides:
            return base
        try:
            # dict(base), not a dump: a dump leaves out what is code (a Batch's collate)
            return CompileConfig.model_validate({**dict(base), **self.config_overrides})
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(map(str, err["loc"]))
            raise ConfigError(f"part {name!r}: {field}={self.config_overrides.get(field)!r} is invalid "
                              f"({err['msg']})") from e

    def __repr__(self) -> str:
        return f"Part({type(self.module).__name__}, {len(self.examples)} example(s), {self.config_overrides})"


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"part name {name!r} is invalid: use a Python identifier (letters, digits, _; 1-64)")
    return name


class Parts(Mapping[str, Callable[..., Any]]):
    """The served callables by part name: ``self.parts["decoder"](...)`` or ``self.parts.decoder(...)``."""

    def __init__(self, served: Mapping[str, Callable[..., Any]]) -> None:
        self._served = dict(served)

    def __getitem__(self, name: str) -> Callable[..., Any]:
        try:
            return self._served[name]
        except KeyError:
            raise KeyError(f"no part {name!r}; this runner has {sorted(self._served)}") from None

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._served[name]
        except KeyError:
            raise AttributeError(f"no part {name!r}; this runner has {sorted(self._served)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._served)

    def __len__(self) -> int:
        return len(self._served)

    def __repr__(self) -> str:
        return f"Parts({sorted(self._served)})"
