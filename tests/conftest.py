"""Shared fixtures (the real S3 server's, SeaweedFS, live in tests/s3server.py), and what lets make test run the test
files in parallel."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest_plugins = ["tests.s3server"]


import contextlib  # noqa: E402
import fcntl  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

PYTHON = str(Path(sys.executable))

# -- running in parallel ---------------------------------------------------------------------------------------------
# make test runs pytest-xdist with --dist loadfile: one worker runs a whole file, so its module fixtures (the cold
# compiles) run once.
_LOCKS = "PYTEST_SERIAL_LOCKS"  # the lock files' dir: made by the controller, inherited by the workers


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "serial: a test that bounds wall time (a deadline, Cog's 10 s shutdown window): it runs while no "
        "other worker runs a test, so a neighbour's compile cannot eat its budget")
    if not hasattr(config, "workerinput") and _LOCKS not in os.environ:  # the controller, before workers start
        os.environ[_LOCKS] = tempfile.mkdtemp(prefix="compile-cache-test-locks-")
        config.add_cleanup(lambda: shutil.rmtree(os.environ.pop(_LOCKS), ignore_errors=True))


@contextlib.contextmanager
def _flock(path: Path, mode: int) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, mode)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """A ``serial`` test holds a lock every other test (in every xdist worker) shares, around its whole protocol
    (the fixtures it sets up and tears down included). A turnstile first, so that the other workers' shared locks
    cannot starve a waiting serial test."""
    locks = Path(os.environ[_LOCKS])
    turnstile, lock = locks / "turnstile", locks / "lock"
    if item.get_closest_marker("serial"):
        with contextlib.ExitStack() as held:
            with _flock(turnstile, fcntl.LOCK_EX):
                held.enter_context(_flock(lock, fcntl.LOCK_EX))
            yield
    else:
        with _flock(turnstile, fcntl.LOCK_EX):
            pass
        with _flock(lock, fcntl.LOCK_SH):
            yield


@dataclass
class Boot:
    metrics: dict
    outputs: list
    request_path_compiles: int
    stderr: str
    export_attempts: int = -1  # exports (build_package calls) the boot started
    store_calls: dict | None = None  # with count_calls: the store's calls by kind
    compiled: bool | None = None  # with wait_compiled: whether no part waited for a build any more in time


def boot(target: str, env: dict[str, str], *predicts: dict, wait_upload: bool = True, check: bool = True,
         count_calls: bool = False, wait_compiled: float | None = None, after: Sequence[dict] = ()) -> Boot:
    """Boot ``target`` (module:Class, or FILE.py:Class) in a fresh process — a new "container" — and run
    predictions; with ``wait_compiled``, then wait that long for the background build (on_miss=serve) and run the
    predictions ``after``."""
    args = [PYTHON, str(ROOT / "tests" / "boot.py"), target]
    for p in predicts:
        args += ["--predict", json.dumps(p)]
    if wait_upload:
        args.append("--wait-upload")
    if count_calls:
        args.append("--count-store-calls")
    if wait_compiled is not None:
        args += ["--wait-compiled", str(wait_compiled)]
        for p in after:
            args += ["--predict-after", json.dumps(p)]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    cp = subprocess.run(args, cwd=ROOT, env=full_env, capture_output=True, text=True,
                        timeout=600 + (wait_compiled or 0))
    line = next((ln for ln in cp.stdout.splitlines() if ln.startswith("BOOT-RESULT ")), None)
    if check and (cp.returncode != 0 or line is None):
        raise AssertionError(f"boot failed (exit {cp.returncode}):\n{cp.stderr[-4000:]}")
    data = json.loads(line[len("BOOT-RESULT ") :]) if line else {"metrics": {}, "outputs": [], "request_path_compiles": -1}
    return Boot(data["metrics"], data["outputs"], data["request_path_compiles"], cp.stderr,
                data.get("export_attempts", -1), data.get("store_calls"), data.get("compiled"))


@pytest.fixture(scope="session")
def tiny_seeded_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local store holding the tiny predictor's entry, made by ONE cold boot for the whole session (the Inductor
    dir that boot left is beside it: ``.parent / "inductor"``).

    Tests copy it (shutil.copytree) before changing anything in it."""
    from tests.tiny_predictor import BATCHES

    d = tmp_path_factory.mktemp("tiny-seed")
    b = boot(
        "tests.tiny_predictor:Predictor",
        {"TORCHINDUCTOR_CACHE_DIR": str(d / "inductor"), "COMPILE_CACHE_URL": str(d / "store")},
        {"batch": 1},
    )
    # the jit default: each warm-up shape precompiled (aot_compile does not consult the FX-graph cache)
    assert b.metrics["cache"] == "miss" and precompiled(b.metrics)["built"] == len(BATCHES)
    return d / "store"


def precompiled(metrics: dict, part: str = "model") -> dict:
    """A jit part's precompiled functions under the default restore: loaded from the entry, adopted from a seed's,
    built by this boot, and why the part fell back to the jit function ("" if it did not)."""
    return metrics["parts"][part]["precompiled"]


def wait_for(what: str, cond: Any, timeout: float = 600.0) -> Any:
    """Poll ``cond()`` every 0.1 s until it returns something true, and return that; fail after ``timeout`` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if v := cond():
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def lease_file(store_dir: Path) -> dict[str, Any] | None:
    """The body of the one build lease in a local store, or None."""
    from compile_cache.lease import lease_name

    found = list(store_dir.glob(lease_name("*")))
    return json.loads(found[0].read_text()) if found else None
