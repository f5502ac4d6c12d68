#!/usr/bin/env python3
"""Re-measure what compile_cache relies on in the Cog runtime (docs/cog-runtime.md), with a torch-free probe runner.

    .venv/bin/python scripts/cog_runtime_probe.py            # every check, about a minute; --json for one JSON object
    .venv/bin/python scripts/cog_runtime_probe.py --only post

It starts the real runtime (``python -m cog.server.http``, through compile_cache.tools.cogrun) in a temp dir that
holds a cog.yaml naming a predictor that does not exist, so a READY server shows that cog.yaml is not read. The
probe's setup() installs a SIGTERM handler (where the inherited disposition is the default) and an atexit hook that prints a line, then writes a heartbeat to a file
every 0.2 s for 30 s. For each way to stop (SIGTERM to the server, POST /shutdown, and --await-explicit-shutdown:
SIGTERM, then POST /shutdown; SIGTERM to the process group, with and without the handler) it reports: the worker's
command line, the SIGTERM disposition it inherits, whether the handler ran, whether atexit ran, the seconds from the stop to the worker's last heartbeat (the runtime's SIGKILL), and
whether the line printed at exit reached the server's log. One more way stops the server with SIGTERM 1 s into a
4 s prediction: the prediction's status, and the seconds from its end to the worker's last heartbeat.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from compile_cache.tools.cogrun import CogServer  # noqa: E402

PROBE = '''
import atexit, os, signal, sys, time
from cog import BasePredictor

OUT = os.environ["PROBE_OUT"]

def note(name, text=""):
    with open(os.path.join(OUT, name), "a") as f:
        f.write(text)

class Predictor(BasePredictor):
    def setup(self):
        inherited = signal.getsignal(signal.SIGTERM)
        note("inherited-sigterm", {signal.SIG_IGN: "ignored", signal.SIG_DFL: "default"}.get(inherited, "handler"))
        # Like compile_cache: a handler only where the inherited disposition would kill the worker.
        if inherited == signal.SIG_DFL and os.environ.get("PROBE_HANDLER") == "1":
            signal.signal(signal.SIGTERM, lambda *a: note("handler-ran", "1"))
            note("handler-installed", "1")
        atexit.register(self.at_exit)

    def at_exit(self):
        note("atexit-ran", "1")
        print("PROBE-PRINTED-AT-EXIT", flush=True)
        for _ in range(150):  # 30 s: longer than the runtime waits
            note("heartbeat", f"{time.monotonic()}\\n")
            time.sleep(0.2)
        note("atexit-finished", "1")

    def predict(self, x: int = 1) -> int:
        time.sleep(x)  # seconds
        note("predict-end", str(time.monotonic()))
        return x
'''

WAYS = {  # name: (--await-explicit-shutdown, how to stop (CogServer.shutdown), probe installs a SIGTERM handler)
    "sigterm": (False, "sigterm", True),
    "post": (False, "post", True),
    "explicit": (True, "post", True),  # SIGTERM first, then POST /shutdown
    "pgroup": (False, "pgroup", True),  # SIGTERM to the server's process group, as `tini -g` sends it
    "pgroup-no-handler": (False, "pgroup", False),
    "sigterm-mid-prediction": (False, "sigterm", True),  # a 4 s prediction, SIGTERM 1 s into it
}


def probe(way: str, work: Path) -> dict:
    explicit, how, handler = WAYS[way]
    work.mkdir(parents=True)
    (work / "probe.py").write_text(PROBE)
    (work / "cog.yaml").write_text('build:\n  python_version: "3.11"\npredict: "no_such_file.py:Nothing"\n')
    out = work / "out"
    out.mkdir()
    srv = CogServer("probe.py:Predictor", cwd=work, env={"PROBE_OUT": str(out), "PROBE_HANDLER": str(int(handler))}, await_explicit_shutdown=explicit,
                    log_path=work / "server.log")
    with srv:
        srv.wait_ready(120)
        (worker,) = srv.worker_pids()
        cmdline = Path(f"/proc/{worker}/cmdline").read_bytes().split(b"\0")
        r: dict = {"way": way, "ready_despite_a_bogus_cog_yaml": True,
                   "worker_argv": [a.decode() for a in cmdline if a][1:],
                   "worker_inherits_sigterm": (out / "inherited-sigterm").read_text()}
        if explicit:  # SIGTERM first: the server must keep serving
            srv.proc.send_signal(signal.SIGTERM)
            time.sleep(2)
            r["ready_after_sigterm"] = srv.health().get("status") == "READY"
        mid = way.endswith("mid-prediction")
        if mid:
            answer: list = []
            t = threading.Thread(target=lambda: answer.append(srv.predict({"x": 4}, timeout=60)))
            t.start()
            time.sleep(1)
        stopped_at = time.monotonic()
        code = srv.shutdown(how, timeout=40)
        if mid:
            t.join(60)
            code_, body = answer[0] if answer else (None, None)
            r["prediction_status"] = body.get("status") if isinstance(body, dict) else code_
            stopped_at = float((out / "predict-end").read_text())  # the 10 s start when it ends
    beats = [float(x) for x in (out / "heartbeat").read_text().split()] if (out / "heartbeat").exists() else []
    r.update(
        server_exit=code,
        handler_installed=(out / "handler-installed").exists(),
        handler_ran=(out / "handler-ran").exists(),
        atexit_ran=(out / "atexit-ran").exists(),
        atexit_finished=(out / "atexit-finished").exists(),  # False: the runtime killed the worker first
        worker_alive_after_stop_s=round(beats[-1] - stopped_at, 1) if beats else None,
        exit_print_in_server_log="PROBE-PRINTED-AT-EXIT" in (work / "server.log").read_text(errors="replace"),
    )
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=sorted(WAYS), action="append", help="run only this way (repeatable)")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cog-probe-") as tmp:
        results = [probe(w, Path(tmp) / w) for w in (args.only or list(WAYS))]
    if args.json:
        print(json.dumps(results))
    else:
        for r in results:
            print(f"{r.pop('way')}:")
            for k, v in r.items():
                print(f"  {k:28} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
