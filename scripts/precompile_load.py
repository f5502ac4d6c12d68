"""What loading precompiled functions costs a fresh process, and whether their first call costs more than the next.

The figures behind a choice in compile_cache and a cost it documents: warm-up only checks a loaded function's guards
(its first call costs what later ones do), and the first function a process loads pays Inductor's import and CPU ISA
probe, the next ones do not (scripts/isa_probe.py splits that one-off cost). On the example (predict.py, its four
warm-up shapes):

    .venv/bin/python scripts/precompile_load.py             # build in one process, then load and call in another

Prints, per shape: load seconds (in order), first / second / third call ms, and eager ms, 1 torch thread.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _runner_and_model():  # type: ignore[no-untyped-def]
    import torch

    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("predict", ROOT / "predict.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["predict"] = mod  # the module name the traced sources are recorded under
    spec.loader.exec_module(mod)
    runner = mod.Runner()
    return runner, runner.load(str(ROOT / "weights" / "all-MiniLM-L6-v2"))


def build(out: Path) -> None:
    import torch

    from compile_cache.precompile import aot_compile_enabled

    runner, model = _runner_and_model()
    for i, ex in enumerate(runner.warmup_examples()):
        with torch.no_grad(), aot_compile_enabled():
            options = {"guard_filter_fn": torch.compiler.keep_portable_guards_unsafe}
            fn = torch.compile(model.forward, fullgraph=True, options=options).aot_compile((ex.args, {}))
        fn.save_compiled_function(str(out / f"{i}.bin"), external_data={"model": model})


def load(out: Path) -> None:
    import torch

    runner, model = _runner_and_model()
    print(f"{'shape':<22} {'load s':>7} {'call 1 ms':>10} {'call 2 ms':>10} {'call 3 ms':>10} {'eager ms':>9}")
    for i, ex in enumerate(runner.warmup_examples()):
        t = time.perf_counter()
        with open(out / f"{i}.bin", "rb") as f:
            fn = torch.compiler.load_compiled_function(f, external_data={"model": model})
        loaded = time.perf_counter() - t
        calls = []
        with torch.no_grad():
            for _ in range(3):
                t = time.perf_counter()
                fn(model, *ex.args)
                calls.append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            model(*ex.args)
            eager = (time.perf_counter() - t) * 1e3
        print(f"{ex.describe():<22} {loaded:>7.2f} {calls[0]:>10.1f} {calls[1]:>10.1f} {calls[2]:>10.1f} {eager:>9.1f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step", choices=("build", "load"), help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step == "build":
        build(args.dir)
        return 0
    if args.step == "load":
        load(args.dir)
        return 0
    with tempfile.TemporaryDirectory() as d:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(Path(d) / "inductor"), "PYTHONPATH": str(ROOT)}
        for step in ("build", "load"):  # a fresh process each: the load pays what a new container pays
            subprocess.run([sys.executable, __file__, "--step", step, "--dir", d], env=env, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
