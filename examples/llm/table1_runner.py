"""The example's ``Runner`` as ``make table1`` (scripts/table1.py) boots it: the same ``load()`` (model, parts, each
part's own config), with two changes that the environment of each Table 1 cell chooses:

    TABLE1_BATCH     rows the parts are warmed up at (default 1): the batch that cell generates. ``run()`` serves one
                     prompt, so the served example only ever declares batch 1.
    TABLE1_COMPILE   the parts compiled, comma-separated (default ``prefill,decode``): every other part gets the
                     per-part override ``enable=False`` and is served eager ("compile decode" is ``decode``).

Everything else is the framework's, from the environment, as in a container: ``COMPILE_CACHE_STRATEGY=jit`` (the
strategy where compiling one part and not the other is a choice; the example declares ``export``),
``COMPILE_CACHE_COMPILE=0`` for the all-eager cell, the store, the Inductor cache dir.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from compile_cache import Example, Part

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import part_examples  # noqa: E402

from predict import BOUNDS, EXAMPLE_PROMPT, Runner  # noqa: E402


class Table1Runner(Runner):
    def load(self, weights=None):  # type: ignore[no-untyped-def]
        parts = super().load(weights)
        batch = int(os.environ.get("TABLE1_BATCH", "1"))
        compiled = {p.strip() for p in os.environ.get("TABLE1_COMPILE", "prefill,decode").split(",") if p.strip()}
        if batch < 1 or not compiled <= set(parts):
            raise ValueError(f"TABLE1_BATCH={batch} must be >= 1 and TABLE1_COMPILE={sorted(compiled)} name parts of "
                             f"{sorted(parts)}")
        prefill_args, decode_args = part_examples(self.lm.config, BOUNDS, EXAMPLE_PROMPT, batch)
        examples = {
            "prefill": Example(prefill_args, label=f"batch={batch} prompt={EXAMPLE_PROMPT} (dynamic)"),
            "decode": Example(decode_args, label=f"batch={batch} one token"),
        }
        return {
            name: Part(part.module, examples=[examples[name]], export_spec=part.export_spec,
                       **{**part.config_overrides, **({} if name in compiled else {"enable": False})})
            for name, part in parts.items()
        }
