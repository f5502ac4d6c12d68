"""What the code relies on in the Cog runtime (docs/cog-runtime.md), re-measured by scripts/cog_runtime_probe.py:
a torch-free probe runner, the real runtime, two ways to stop it (about 25 s, mostly the runtime's 10 s waits)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_the_runtime_behaves_as_the_docs_say() -> None:
    cp = subprocess.run(
        [sys.executable, "scripts/cog_runtime_probe.py", "--only", "explicit", "--only", "pgroup-no-handler", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert cp.returncode == 0, cp.stderr[-3000:]
    explicit, pgroup = json.loads(cp.stdout)
    for r in (explicit, pgroup):
        assert r["ready_despite_a_bogus_cog_yaml"]  # the predictor comes from COG_PREDICT_TYPE_STUB
        assert r["worker_argv"][0] == "-c" and "coglet" in r["worker_argv"][1]  # `python` found on PATH
        assert not r["exit_print_in_server_log"]  # output during shutdown is lost: log to a file
    # --await-explicit-shutdown: SIGTERM ignored (and inherited so), POST /shutdown then stops the worker through
    # a message: no signal, atexit runs, and the runtime kills the worker before its 30 s atexit hook ends (the
    # probe prints when: about 10 s after the stop).
    assert explicit["worker_inherits_sigterm"] == "ignored" and explicit["ready_after_sigterm"]
    assert not explicit["handler_installed"] and not explicit["handler_ran"] and explicit["server_exit"] == 0
    assert explicit["atexit_ran"] and not explicit["atexit_finished"]
    # A process-group SIGTERM to a worker with the default disposition kills it at once: no atexit.
    assert pgroup["worker_inherits_sigterm"] == "default" and not pgroup["atexit_ran"]
