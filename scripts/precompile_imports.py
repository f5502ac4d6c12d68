"""What a warm jit boot imports and pays, step by step, to load a precompiled function and call it.

    .venv/bin/python scripts/precompile_imports.py          # one process builds, a fresh one loads (1 torch thread)

A first process precompiles a small MLP for one shape into a new Inductor cache dir (compile_cache.precompile, as
the jit strategy does) and records the CPU ISA decision there (compile_cache.isa). A second, fresh process then
does what a warm boot's compile step does, one step at a time, and prints for each its seconds and the modules it
imported (how many, and the packages with the most):

    import torch._dynamo, import torch._inductor.codecache, the CPU ISA decision (replayed from the record),
    loading the precompiled function (Precompiled: torch.compiler.load_compiled_function), its first call

What is left for the load step after the imports before it is what serving a precompiled function needs of
Inductor and Dynamo at run time.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _model():  # type: ignore[no-untyped-def]
    import torch

    class MLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(64, 128), torch.nn.Linear(128, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.nn.functional.gelu(self.a(x)))

    torch.manual_seed(0)
    return MLP().eval()


def _precompiled(cache_dir: Path):  # type: ignore[no-untyped-def]
    import torch

    from compile_cache.config import CompileConfig
    from compile_cache.precompile import Precompiled

    model = _model()
    fallback = torch.compile(model, dynamic=False)
    return model, Precompiled(model, fallback, CompileConfig(dynamic=False), cache_dir / "precompile" / "imports")


def build(cache_dir: Path) -> None:
    import torch

    from compile_cache import isa

    step = isa.begin(cache_dir)
    _, fn = _precompiled(cache_dir)
    with torch.no_grad():
        fn(torch.ones(4, 64))
    step.end()
    assert fn.built == 1 and (cache_dir / isa.RECORD).is_file(), (fn.precompiled_counts(), step)


def measure(cache_dir: Path) -> None:
    import torch

    torch.set_num_threads(1)
    from compile_cache import isa

    rows: list[tuple[str, float, list[str]]] = []

    def step(label: str, fn) -> object:  # type: ignore[no-untyped-def]
        before = set(sys.modules)
        t = time.perf_counter()
        out = fn()
        rows.append((label, time.perf_counter() - t, sorted(set(sys.modules) - before)))
        return out

    step("import torch._dynamo", lambda: __import__("torch._dynamo"))
    step("import torch._inductor.codecache", lambda: __import__("torch._inductor.codecache"))
    decision = step("CPU ISA decision (replayed)", lambda: isa.begin(cache_dir))
    model, fn = step("load the precompiled function", lambda: _precompiled(cache_dir))
    x = torch.ones(4, 64)
    with torch.no_grad():
        step("first call", lambda: fn(x))
    assert fn.loaded == 1 and fn.built == 0, fn.precompiled_counts()
    print(f"ISA: {decision.source}, {decision.probes} probe(s), {decision.decision}")  # type: ignore[attr-defined]
    print(f"{'step':<34} {'s':>6} {'modules':>8}  most from")
    for label, s, mods in rows:
        top = collections.Counter(".".join(m.split(".")[:2]) for m in mods).most_common(4)
        print(f"{label:<34} {s:6.2f} {len(mods):8d}  {', '.join(f'{k} {n}' for k, n in top)}")


def main() -> int:
    if len(sys.argv) == 3:  # a child: build|measure CACHE_DIR
        {"build": build, "measure": measure}[sys.argv[1]](Path(sys.argv[2]))
        return 0
    with tempfile.TemporaryDirectory(prefix="precompile-imports-") as d:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": d, "OMP_NUM_THREADS": "1"}
        for what in ("build", "measure"):
            subprocess.run([sys.executable, __file__, what, d], env=env, check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
