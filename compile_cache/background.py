"""The ``serve`` policy's build: a child process that boots the same runner headless, cold, and uploads its entry.

    parent (serving eager)                       child: python -m compile_cache.background FILE.py:CLASS
    ChildBuild.start() ------------------------> setup() under on_miss=wait, lease off, its own Inductor cache dir
    ChildBuild.wait()   <----- exit code ----- finish_uploads(): the entry is published; exit

Why a process and not a thread: a crash, an OOM kill or Inductor's compile workers stay out of the serving process,
and non-strict torch.export (which swaps a module's parameters for fakes while it traces) never touches the module
that serves. The cost is a second copy of the weights while it runs (docs/fleet.md says where that does not fit).

The child dies with its parent: it asks the kernel for SIGKILL when the parent goes (PR_SET_PDEATHSIG, Linux), and
a watchdog thread checks the parent as well (other systems, and the window before the request). It runs in its own
process group, so :meth:`ChildBuild.kill` ends its compile workers with it. It holds no build lease: the parent
does, and the child's upload is what the lease's ``done`` waits for. Its output goes to a file beside the parent's
log (``background-build.log``): inside Cog, a child's stderr would land in whatever prediction is running.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import log as logmod

__all__ = ["ChildBuild", "BuildResult", "main"]

log = logmod.log

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # where compile_cache imports from: the child imports it too

# Exit codes of the child, beyond 0 (published) and a signal's negative code.
EXIT_NOTHING_COMPILED = 3
EXIT_UPLOAD_FAILED = 4
EXIT_SETUP_RAISED = 5
_REASONS = {
    EXIT_NOTHING_COMPILED: "no part compiled",
    EXIT_UPLOAD_FAILED: "the upload failed or did not finish",
    EXIT_SETUP_RAISED: "setup raised",
}


@dataclass
class BuildResult:
    """What the parent knows of the child: the ``background_build`` metric."""

    state: str = "running"  # "running" | "done" | "failed" | "killed"
    pid: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    exit_code: int | None = None
    reason: str = ""
    log: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@dataclass
class ChildBuild:
    """One background build of ``target`` (``FILE.py:CLASS``). ``env``: the parent's environment, to which the
    child's own settings are added; ``log_path``: where its output goes."""

    target: str
    env: Mapping[str, str]
    log_path: Path
    result: BuildResult = field(default_factory=BuildResult)
    _proc: subprocess.Popen[bytes] | None = None
    _work: Path | None = None
    _t0: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        self._work = Path(tempfile.mkdtemp(prefix="compile-cache-build-"))
        env = dict(self.env)
        env.update({
            "COMPILE_CACHE_ON_MISS": "wait",  # the child is the build: it compiles in its setup
            "COMPILE_CACHE_BUILD_LEASE": "0",  # the parent holds the lease (or follows it)
            "TORCHINDUCTOR_CACHE_DIR": str(self._work / "inductor"),  # never the dir the parent serves from
            "COMPILE_CACHE_METRICS_FILE": str(self._work / "metrics.json"),
            "COMPILE_CACHE_LOG_FILE": str(self._work / "log.txt"),  # its stderr (the same lines) goes to log_path
            "PYTHONPATH": os.pathsep.join(x for x in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if x),
        })
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "compile_cache.background", self.target, "--parent-pid", str(os.getpid())],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self._t0 = time.monotonic()
        self.result.pid, self.result.log = self._proc.pid, str(self.log_path)
        log.info("background build started: pid %d (its log: %s)", self._proc.pid, self.log_path)

    def wait(self) -> BuildResult:
        """Block until the child exits; its exit code, seconds and peak memory in ``result``."""
        assert self._proc is not None
        try:
            _, status, usage = os.wait4(self._proc.pid, 0)
            code = os.waitstatus_to_exitcode(status)
            self._proc.returncode = code
            self.result.peak_rss_mb = usage.ru_maxrss / 1024  # KiB on Linux
        except ChildProcessError:  # reaped elsewhere
            code = self._proc.wait()
        with self._lock:
            r = self.result
            r.exit_code, r.seconds = code, time.monotonic() - self._t0
            if r.state == "running":
                r.state = "done" if code == 0 else "failed"
                r.reason = "" if code == 0 else _REASONS.get(code, f"exit code {code}")
            self._clean()
        return r

    def kill(self) -> None:
        """End the child and its compile workers now (SIGKILL to its process group). It never published half an
        entry: a manifest is written only after the segments it lists."""
        with self._lock:
            if self._proc is None or self._proc.returncode is not None or self.result.state != "running":
                return
            self.result.state, self.result.reason = "killed", "the serving process stopped"
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)

    def _clean(self) -> None:
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)  # the child's cache dir: its entry is in the store


# -- the child -----------------------------------------------------------------------------------------------------
def _die_with(parent: int) -> None:
    """SIGKILL this process when ``parent`` goes: the kernel's parent-death signal where there is one, and a
    watchdog thread (the parent may have gone before the request, or the system may have no such signal)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.killpg(os.getpgrp(), signal.SIGKILL)

    threading.Thread(target=watch, name="compile-cache-parent-watch", daemon=True).start()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m compile_cache.background",
                                 description="Build a runner's cache entry (the serve policy's child process).")
    ap.add_argument("target", help="FILE.py:CLASS, the runner the parent serves")
    ap.add_argument("--parent-pid", type=int, required=True)
    args = ap.parse_args(argv)
    _die_with(args.parent_pid)
    from .predictors import load_predictor

    try:
        p = load_predictor(args.target)
        p.setup(os.environ.get("COG_WEIGHTS") or None)  # what the runtime hands the parent's setup, if anything
    except Exception:
        log.exception("background build: setup raised")
        return EXIT_SETUP_RAISED
    m = p.metrics
    if all(part["eager_fallback"] for part in m.parts.values()):
        return EXIT_NOTHING_COMPILED
    p.finish_uploads()
    return 0 if m.upload_state == "done" else EXIT_UPLOAD_FAILED


if __name__ == "__main__":
    sys.exit(main())
