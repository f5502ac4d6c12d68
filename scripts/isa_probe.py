"""What Inductor's one-off start costs a fresh process, with and without the CPU ISA probe's programs in the cache
dir: the figures behind compile_cache.compiler.Prewarm (the probe waits for the restore, which brings them).

    .venv/bin/python scripts/isa_probe.py           # three fresh processes on one new TORCHINDUCTOR_CACHE_DIR

The first process finds the dir empty and builds the probe's programs; the next two find them. Each prints the
seconds of ``import torch._inductor.codecache`` and of ``pick_vec_isa()`` (torch builds, when missing, and dlopens
in a subprocess a test program per ISA).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

CHILD = """
import time
import torch
t0 = time.perf_counter()
import torch._inductor.codecache
t1 = time.perf_counter()
from torch._inductor.cpu_vec_isa import pick_vec_isa
isa = pick_vec_isa()
t2 = time.perf_counter()
print(f"{t1 - t0:.2f} {t2 - t1:.2f} {isa}")
"""


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="isa-probe-") as d:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": d}
        print(f"{'process':<28} {'import s':>8} {'probe s':>8}  isa")
        for label in ("1: empty cache dir", "2: the probe's files there", "3: the probe's files there"):
            out = subprocess.run([sys.executable, "-c", CHILD], env=env, check=True, capture_output=True, text=True)
            imp, probe, isa = out.stdout.split(maxsplit=2)
            print(f"{label:<28} {imp:>8} {probe:>8}  {isa.strip()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
