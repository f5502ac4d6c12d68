#!/usr/bin/env python3
"""Minimal reproduction: the Cog runtime (coglet 0.23.1) can leave the last lines setup() writes out of setup.logs.

    scripts/repro_setup_logs.py [--boots N] [--grace S] [--lines N]

No torch and no compile_cache in the worker: a plain ``cog.BaseRunner`` whose ``setup()`` logs ``--lines`` lines to
stderr, then a last line, then (with ``--grace S``) sleeps S seconds, and returns. Each boot is a fresh runtime; the
script reads ``setup.logs`` from GET /health-check at READY and one second later and counts boots whose last line is
missing. The lines that go missing are in the server's own log, stamped ``coglet::user`` after "Setup complete, now
accepting requests": they reached the runtime after it had closed the setup logs.

Measured here (2 shared cores): without a grace period 7 boots of 10 lost the last line, with 0.1 s none of 20.
The lifecycle keeps that 0.1 s (``SETUP_LOG_GRACE_S`` in compile_cache/lifecycle.py) for this reason alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compile_cache.tools.cogrun import CogServer  # noqa: E402

RUNNER = '''
import logging, os, sys, time
from cog import BaseRunner


class Runner(BaseRunner):
    def setup(self) -> None:
        log = logging.getLogger("repro")
        log.setLevel(logging.INFO)
        log.addHandler(logging.StreamHandler(sys.stderr))
        for i in range(int(os.environ["REPRO_LINES"])):
            log.info("line %d %s", i, "x" * 100)
        log.info("LAST-LINE")
        time.sleep(float(os.environ["REPRO_GRACE_S"]))

    def run(self, x: int = 1) -> int:
        return x
'''


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--boots", type=int, default=10)
    ap.add_argument("--grace", type=float, default=0.0, help="seconds setup() sleeps after its last line")
    ap.add_argument("--lines", type=int, default=50)
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="repro-setup-logs-"))
    (d / "runner.py").write_text(RUNNER)
    env = {"REPRO_LINES": str(args.lines), "REPRO_GRACE_S": str(args.grace)}
    at_ready = later = 0
    for _ in range(args.boots):
        with CogServer("runner.py:Runner", cwd=d, env=env, log_path=d / "server.log") as srv:
            health = srv.wait_ready(60)
            at_ready += "LAST-LINE" not in (health.get("setup") or {}).get("logs", "")
            time.sleep(1.0)
            later += "LAST-LINE" not in (srv.health().get("setup") or {}).get("logs", "")
            srv.shutdown("post", timeout=10)
    print(json.dumps({"boots": args.boots, "grace_s": args.grace, "lines": args.lines,
                      "last_line_missing_at_ready": at_ready, "last_line_missing_1s_later": later,
                      "server_log": str(d / "server.log")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
