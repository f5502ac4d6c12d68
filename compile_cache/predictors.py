"""Load a predictor ``FILE.py:CLASS`` as the Cog runtime does; shared by the CLI (``warm``) and the tools.

The tools import this module, never ``cli.py``: the CLI dispatches to the tools, so the dependency runs one way.
Importing it imports neither torch nor cog (cog only inside ``load_predictor``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["DEFAULT_PREDICTOR", "load_predictor"]

DEFAULT_PREDICTOR = "predict.py:Runner"


def load_predictor(ref: str) -> Any:
    """Instantiate the predictor ``FILE.py:CLASS`` exactly as the Cog runtime does (cog's own loader).

    How the module is imported changes Inductor's FX-graph keys: pickle names ``torch.contiguous_format`` after the
    first module in ``sys.modules`` with a ``torch`` attribute, and cog's loader leaves the predictor's module (named
    after its file) ahead of torch's. Imported any other way, a warm uploads graphs a production boot never finds.
    """
    import warnings

    target, sep, name = ref.partition(":")
    if not sep or not target.endswith(".py") or not name.isidentifier():
        raise ConfigError(f"--predictor {ref!r}: expected FILE.py:CLASS as in cog.yaml, e.g. {DEFAULT_PREDICTOR}")
    if not Path(target).is_file():
        raise ConfigError(f"--predictor {ref!r}: no file {target} (relative to {Path.cwd()})")
    from cog.predictor import load_predictor_from_ref

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # BasePredictor/predict() are fine for us
        try:
            return load_predictor_from_ref(ref)
        except AttributeError as e:
            raise ConfigError(f"--predictor {ref!r}: {e}") from e
