"""Boot a runner in this (fresh) process as a container would, run predictions, print one JSON line.

    python tests/boot.py MODULE:CLASS [--predict JSON-kwargs ...] [--wait-upload]
                         [--wait-compiled SECONDS [--predict-after JSON-kwargs ...]]

The JSON line has the metrics, the outputs (an error message for a prediction that raised) and the compiles counted
on the request path. Used by the integration tests to get a truly fresh Dynamo/Inductor state per simulated
container. Predictions go through ``run()``, as the runtime calls them (a ``predict()`` class is reached through it).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("target")
    ap.add_argument("--predict", action="append", default=[], help="JSON object of predict() kwargs")
    ap.add_argument("--wait-upload", action="store_true", help="wait for the background upload before printing")
    ap.add_argument("--wait-compiled", type=float, default=None,
                    help="then wait up to this long until no part waits for a background build (on_miss=serve)")
    ap.add_argument("--predict-after", action="append", default=[], help="predictions after --wait-compiled")
    ap.add_argument("--count-store-calls", action="store_true",
                    help="count the store's calls by kind (the real store underneath); reported as store_calls")
    args = ap.parse_args()
    calls: dict[str, int] = {}
    if args.count_store_calls:
        _count_store_calls(calls)
    # Load the class exactly as Cog's worker does (cog.predictor.load_predictor_from_ref: the module is named after
    # the file). Inductor's FX-graph keys can depend on the predictor module's name (pickle finds
    # torch.contiguous_format through the first module holding `torch`), so importing it as `tests.x` instead of `x`
    # would make a boot here miss an entry a real container wrote, and vice versa.
    from cog.predictor import load_predictor_from_ref

    mod, cls = args.target.split(":")
    ref = mod if mod.endswith(".py") else str(ROOT / (mod.replace(".", "/") + ".py"))
    p = load_predictor_from_ref(f"{ref}:{cls}")
    p.setup()
    outputs = [_predict(p, k) for k in args.predict]
    if args.wait_upload:
        p.wait_for_upload()
    compiled = None
    if args.wait_compiled is not None:
        compiled = p.wait_until_compiled(args.wait_compiled)
        outputs += [_predict(p, k) for k in args.predict_after]
    from compile_cache.export import build_attempts

    out = {"metrics": p.metrics.to_dict(), "outputs": outputs,
           "request_path_compiles": p.metrics.request_path_compiles, "export_attempts": build_attempts(),
           "store_calls": calls, "compiled": compiled}
    print("BOOT-RESULT " + json.dumps(out), flush=True)


def _predict(p: object, kwargs: str) -> object:
    try:
        out = p.run(**json.loads(kwargs))  # type: ignore[attr-defined]
        return asyncio.run(out) if inspect.iscoroutine(out) else out  # an async run(), as the runtime awaits it
    except Exception as e:  # a failed prediction: the next one still runs, as in the runtime
        return {"error": f"{type(e).__name__}: {e}"}


def _count_store_calls(calls: dict[str, int]) -> None:
    """Wrap every store the framework opens so each primitive call is counted (a put_immutable is one PUT of an
    object, a put_conditional one manifest write, a list one listing, reads are GETs)."""
    import compile_cache.lifecycle as lifecycle
    import compile_cache.stores as stores

    real_open = stores.open_store

    def counting_open(*a, **kw):  # type: ignore[no-untyped-def]
        store = real_open(*a, **kw)
        for name in ("read_versioned", "open_read", "download", "put_immutable", "put_conditional", "list",
                     "exists", "delete"):
            fn = getattr(store, name)

            def counted(*fa, _fn=fn, _name=name, **fkw):  # type: ignore[no-untyped-def]
                calls[_name] = calls.get(_name, 0) + 1
                return _fn(*fa, **fkw)

            setattr(store, name, counted)
        return store

    stores.open_store = counting_open
    if hasattr(lifecycle, "open_store"):
        lifecycle.open_store = counting_open  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
