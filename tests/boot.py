"""Boot a predictor in this (fresh) process as a container would, run predictions, print one JSON line.

    python tests/boot.py MODULE:CLASS [--predict JSON-kwargs ...] [--no-exit-flush]

The JSON line has the metrics, the outputs and the compiles counted on the request path. Used by the integration
tests to get a truly fresh Dynamo/Inductor state per simulated container.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("target")
    ap.add_argument("--predict", action="append", default=[], help="JSON object of predict() kwargs")
    ap.add_argument("--wait-upload", action="store_true", help="wait for the background upload before printing")
    args = ap.parse_args()
    mod, cls = args.target.split(":")
    p = getattr(importlib.import_module(mod), cls)()
    p.setup()
    outputs = [p.predict(**json.loads(k)) for k in args.predict]
    if args.wait_upload and getattr(p, "_bg", None) is not None:
        p._bg.join()
    out = {"metrics": p.metrics.to_dict(), "outputs": outputs, "request_path_compiles": p.model.request_path_compiles}
    print("BOOT-RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
