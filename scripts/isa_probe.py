"""What Inductor's CPU ISA decision costs a fresh process: probed into an empty cache dir, probed with the probe's
programs there (what a warm boot paid before the decision travelled with the entry), and replayed from the record
compile_cache/isa.py keeps in the cache dir.

    .venv/bin/python scripts/isa_probe.py           # three fresh processes on one new TORCHINDUCTOR_CACHE_DIR

Each prints the seconds of the import step (Dynamo, Inductor), of the decision (``pick_vec_isa()`` and whether it
works, as Inductor asks before it builds a kernel), how many test programs torch built or loaded (probes), and the
decision. The second process removes the record the first wrote, so it probes with the programs in place.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import sys, time
from pathlib import Path
from compile_cache import isa
from compile_cache.compiler import inductor_cache_dir
if sys.argv[1] == "drop":
    (inductor_cache_dir() / isa.RECORD).unlink()
step = isa.begin(inductor_cache_dir())
t = time.monotonic()
from torch._inductor.cpu_vec_isa import pick_vec_isa
picked = pick_vec_isa()
bool(picked)
step.end()
m = step.metrics()
print(f"{m['import_s']:.2f} {m['isa_s'] + time.monotonic() - t - step.probe_s(t, time.monotonic()):.2f} "
      f"{m['probes']} {m['source']}: {picked} ({picked.build_arch_flags()})")
"""


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="isa-probe-") as d:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": d, "PYTHONPATH": str(ROOT)}
        print(f"{'process':<40} {'import s':>8} {'ISA s':>6} {'probes':>6}  decision")
        for label, arg in (("1: empty cache dir", "keep"), ("2: the probe's programs there, no record", "drop"),
                           ("3: the record there", "keep")):
            out = subprocess.run([sys.executable, "-c", CHILD, arg], env=env, check=True, capture_output=True,
                                 text=True)
            imp, isa_s, probes, what = out.stdout.strip().splitlines()[-1].split(maxsplit=3)
            print(f"{label:<40} {imp:>8} {isa_s:>6} {probes:>6}  {what}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
