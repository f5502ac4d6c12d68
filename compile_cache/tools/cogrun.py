"""Run a predictor in the real Cog runtime (coglet) without Docker or the cog CLI — our Docker-less ``cog predict``.

``python -m cog.server.http`` reads the predictor from ``COG_PREDICT_TYPE_STUB`` (cog.yaml is not read at run time)
and spawns the worker as ``python -c ...`` found on PATH, so the interpreter's bin dir goes first on PATH
(docs/cog-runtime.md). Used by ``scripts/predict``, the CLI and the integration tests. No torch, no boto3 here.

:meth:`CogServer.in_project` runs a runner as its container would: in its project dir (the runner file's directory,
``/src`` in the image), where the runtime reads ``.cog/openapi_schema.json`` and relative paths resolve.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ..errors import ToolError

__all__ = ["CogServer", "free_port", "project_of", "RuntimeFailure", "PACKAGE_ROOT"]

# The directory compile_cache imports from (this checkout): on PYTHONPATH for a runtime started in another directory.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


class RuntimeFailure(ToolError):
    """The runtime did not reach the expected state; the message carries the tail of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def project_of(ref: str) -> tuple[Path, str]:
    """``path/to/predict.py:Runner`` (relative to the cwd, or absolute) -> (its project dir, the stub there).

    A Cog image holds one model's project at ``/src`` (cog.yaml's directory: the runner, ``.cog/openapi_schema.json``,
    weights) and runs the runtime there with ``COG_PREDICT_TYPE_STUB=predict.py:Runner``. The runner file's directory
    is that project dir: the runtime validates inputs with the schema found there, and the framework resolves
    relative paths (``weights/``, the default store ``.cache/compile-store``, a relative ``COMPILE_CACHE_URL``)
    against it."""
    path_s, sep, name = ref.partition(":")
    if not sep or not path_s.endswith(".py") or not name.isidentifier():
        raise ValueError(f"predictor {ref!r}: expected FILE.py:CLASS, e.g. predict.py:Runner")
    path = Path(path_s).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"predictor {ref!r}: no file {path}")
    return path.parent, f"{path.name}:{name}"


class CogServer:
    """One Cog HTTP server + worker, on 127.0.0.1. Output goes to ``log_path``."""

    def __init__(
        self,
        predictor: str = "predict.py:Runner",
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        await_explicit_shutdown: bool = False,
        log_path: Path | None = None,
        python: str = sys.executable,
    ) -> None:
        self.cwd = Path(cwd or Path.cwd())
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or self.cwd / ".cache" / f"cog-server-{self.port}.log"
        bindir = str(Path(python).parent)
        self.env = {
            **os.environ,
            **(env or {}),
            "COG_PREDICT_TYPE_STUB": predictor,
            "PORT": str(self.port),
            "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
            "PYTHONUNBUFFERED": "1",
        }
        self.args = [python, "-m", "cog.server.http", "--host", "127.0.0.1"]
        if await_explicit_shutdown:
            self.args += ["--await-explicit-shutdown", "true"]
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def in_project(cls, ref: str, *, env: dict[str, str] | None = None, **kwargs: Any) -> CogServer:
        """The runner ``ref`` run as its container runs it: cwd its project dir, the stub relative to it
        (:func:`project_of`), and this checkout's compile_cache importable (PYTHONPATH first, as pip would)."""
        cwd, stub = project_of(ref)
        env = dict(env or {})
        inherited = env.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), inherited) if p)
        return cls(stub, cwd=cwd, env=env, **kwargs)

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def start(self) -> CogServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        # A new session: the server and its worker form one process group we can signal as `tini -g` would.
        self.proc = subprocess.Popen(
            self.args, cwd=self.cwd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        return self

    def __enter__(self) -> CogServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # -- HTTP ------------------------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: Any = None, timeout: float = 600) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                return r.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, raw.decode(errors="replace")

    def health(self) -> dict[str, Any]:
        try:
            return self._request("GET", "/health-check", timeout=5)[1] or {}
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return {}

    def openapi(self) -> dict[str, Any]:
        """The OpenAPI schema the runtime serves (read from .cog/openapi_schema.json in its cwd); {} if none."""
        try:
            code, body = self._request("GET", "/openapi.json", timeout=10)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return {}
        return body if code == 200 and isinstance(body, dict) else {}

    def wait_ready(self, timeout: float = 600, on_status: Any = None) -> dict[str, Any]:
        """Poll until READY; raise RuntimeFailure on SETUP_FAILED, a dead server or the timeout."""
        end = time.monotonic() + timeout
        last = None
        while time.monotonic() < end:
            h = self.health()
            status = h.get("status")
            if status != last and on_status:
                on_status(status)
            last = status
            if status == "READY":
                return h
            if status in ("SETUP_FAILED", "UNHEALTHY") or (self.proc and self.proc.poll() is not None):
                raise RuntimeFailure(f"runtime status {status}, exit {self.proc and self.proc.poll()}:\n"
                                     f"{self.log_tail()}")
            time.sleep(0.25)
        raise RuntimeFailure(f"not READY after {timeout:.0f}s (last status {last}):\n{self.log_tail()}")

    def predict(self, inputs: dict[str, Any], timeout: float = 600) -> tuple[int, Any]:
        """POST a prediction. The runtime has one slot and answers 409 while it is still releasing it after the
        previous (synchronous) prediction's response: wait for it, as a client of a busy server would."""
        end = time.monotonic() + timeout
        while True:
            code, body = self._request("POST", "/predictions", {"input": inputs}, timeout=timeout)
            if code != 409 or time.monotonic() > end:
                return code, body
            time.sleep(0.1)

    # -- stopping --------------------------------------------------------------------------------------------------
    def worker_pids(self) -> list[int]:
        """PIDs of the server's children (the Python worker)."""
        if not self.proc:
            return []
        try:
            out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        except FileNotFoundError:  # no pgrep: read /proc
            out = "\n".join(
                p.name for p in Path("/proc").iterdir()
                if p.name.isdigit() and _ppid(p) == self.proc.pid
            )
        return [int(x) for x in out.split()]

    def shutdown(self, how: str = "post", timeout: float = 30) -> int | None:
        """Stop the server: ``post`` (POST /shutdown), ``sigterm`` (to the server), ``pgroup`` (SIGTERM to the whole
        process group, as ``tini -g`` does) or ``sigint``. Returns the exit code, None if still running."""
        assert self.proc is not None
        if how == "post":
            try:
                self._request("POST", "/shutdown", timeout=10)
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
        elif how == "sigterm":
            self.proc.send_signal(signal.SIGTERM)
        elif how == "sigint":
            self.proc.send_signal(signal.SIGINT)
        elif how == "pgroup":
            os.killpg(self.proc.pid, signal.SIGTERM)
        else:
            raise ValueError(f"unknown shutdown method {how!r}")
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()


def _ppid(p: Path) -> int:
    try:
        return int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1
