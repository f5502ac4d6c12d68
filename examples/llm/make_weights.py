"""Write the LLM example's weights: deterministic random ones, as ``config.json`` + ``model.safetensors``.

    python examples/llm/make_weights.py [--out examples/llm/weights] [--seed 0] [--config example|small|tiny]

No small Llama's real weights come in a package this project can install, and nothing is fetched from a hub, so
the example serves random weights made here from a fixed seed (the same bytes on every machine with the same torch
and transformers). The text they generate is noise; what the example shows is the compile path. Real weights in
the same layout (a ``LlamaForCausalLM`` saved with ``save_pretrained``) drop in unchanged, if their vocabulary is
the byte tokenizer's (``model.VOCAB``). The weights (76 MB) are not in git; the example's ``load()`` makes them on
first boot through the same code (``model.ensure_weights``), so running this is needed only for another config, seed
or directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", choices=["example", "small", "tiny"], default="example")  # model.CONFIGS
    args = ap.parse_args(argv)

    sys.path.insert(0, str(HERE))
    from model import save_weights

    model = save_weights(args.out, args.config, args.seed)
    size = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    n = sum(p.numel() for p in model.parameters())
    sys.stdout.write(f"wrote {args.out}: {n / 1e6:.1f} M parameters, {size / 1e6:.1f} MB (seed {args.seed})\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
