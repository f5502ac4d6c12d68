"""The compile cache survives every way a Cog container stops — against the real runtime (coglet).

Each test is two "containers" sharing one local store. Container A starts with compiled artifacts the store lacks
(a copy of ONE cold-compiled Inductor dir shared by the module) and is stopped one way or another; container B, with
an empty TORCHINDUCTOR_CACHE_DIR, then boots from the store. The tests assert on the store (the manifest parses,
every object it lists exists and verifies, which files it lists) and on A's and B's metrics files — never on timings.
tests/slow_upload.py throttles A's store so the test, not the scheduler, decides where the upload is when A stops.

Every container runs the same predictor ref: Inductor's FX-graph key includes the name of the first module in
sys.modules that holds a global ``torch`` (pickle's ``whichmodule`` for ``torch.contiguous_format``), so an Inductor
dir compiled through another entry point (e.g. tests/boot.py) gives FX-graph misses here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from compile_cache.manifest import FileEntry, Manifest
from compile_cache.snapshot import scan, sha256_file
from compile_cache.tools.cogrun import CogServer
from tests.conftest import precompiled
from tests.tiny_predictor import BATCHES, TinyMLP, inputs

ROOT = Path(__file__).resolve().parent.parent
# Alone under xdist: the runtime kills the worker 10 s into its shutdown, and a neighbour's compile would slow the
# flush that races it.
pytestmark = pytest.mark.serial
# By absolute path, and each container runs in its own directory: the repo's .cog/openapi_schema.json is the
# example's (input "text") and the runtime would strip the tiny predictor's "batch" input.
PREDICTOR = f"{ROOT / 'tests' / 'slow_upload.py'}:SlowUploadPredictor"
READY_TIMEOUT = 300.0
UNDECLARED = 2  # a batch size outside the warm-up plan: predicting it compiles on the request path


@dataclass
class Container:
    root: Path
    store: Path

    @property
    def inductor(self) -> Path:
        return self.root / "inductor"

    @property
    def metrics_file(self) -> Path:
        return self.root / "metrics.json"

    def server(self, plan: dict[str, Any] | None = None, *, explicit: bool = False, **env: str) -> CogServer:
        full_env = {
            "TORCHINDUCTOR_CACHE_DIR": str(self.inductor),
            "COMPILE_CACHE_URL": f"file://{self.store}",
            "COMPILE_CACHE_METRICS_FILE": str(self.metrics_file),
            "TINY_SLOW_STORE": json.dumps(plan or {}),
            "COMPILE_CACHE_ON_NEW_SHAPE": "compile",  # the undeclared batch compiles on the request path
            "PYTHONPATH": str(ROOT),
            **env,
        }
        self.root.mkdir(parents=True, exist_ok=True)
        return CogServer(
            PREDICTOR, cwd=self.root, env=full_env, await_explicit_shutdown=explicit, log_path=self.root / "server.log"
        )

    def metrics(self) -> dict[str, Any]:
        return json.loads(self.metrics_file.read_text())

    def files(self) -> dict[str, Path]:
        """What a snapshot of this container would ship, as the store names it."""
        return scan({"inductor": self.inductor})


def seeded(root: Path, store: Path, compiled: Path) -> Container:
    c = Container(root, store)
    shutil.copytree(compiled, c.inductor)
    return c


def read_entry(store: Path) -> dict[str, FileEntry]:
    """The store's one entry, checked as a reader sees it: the manifest parses and every object it lists exists with
    its recorded size and sha256. Returns the files it lists."""
    manifests = list(store.glob("entries/*/manifest.json"))
    assert len(manifests) == 1, manifests
    m = Manifest.from_bytes(manifests[0].read_bytes())
    for seg in m.segments:
        obj = store / seg.object
        assert obj.is_file(), f"listed object {seg.object} is missing"
        assert obj.stat().st_size == seg.size and sha256_file(obj) == seg.sha256, f"{seg.object} does not verify"
    return m.files()


def same_content(entry: dict[str, FileEntry], local: dict[str, Path]) -> bool:
    return all(entry[n].sha256 == sha256_file(local[n]) for n in entry)


def sigterm_disposition(pid: int) -> str:
    masks = dict(ln.split(":\t") for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in ln)
    bit = 1 << (signal.SIGTERM - 1)
    if int(masks["SigIgn"], 16) & bit:
        return "ignored"
    return "caught" if int(masks["SigCgt"], 16) & bit else "default"


def eager(batch: int) -> torch.Tensor:
    with torch.no_grad():
        return TinyMLP()(inputs(batch))


def boot_next(store: Path, root: Path, batches: tuple[int, ...] = BATCHES) -> Container:
    """Container B: an empty Inductor dir, the same store. Predicts ``batches`` (checked against eager) and stops
    with POST /shutdown; its metrics file is then the one written after its own exit flush."""
    b = Container(root, store)
    with b.server() as s:
        s.wait_ready(READY_TIMEOUT)
        for n in batches:
            code, resp = s.predict({"batch": n})
            assert code == 200 and resp["status"] == "succeeded", resp
            assert torch.allclose(torch.tensor(resp["output"]), eager(n), atol=1e-5)
        assert s.shutdown("post") is not None
    return b


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ONE cold compile for the module: an Inductor dir holding the tiny model's warm-up shapes."""
    c = Container(tmp_path_factory.mktemp("cold"), Path("/nonexistent"))
    with c.server(COMPILE_CACHE_DISABLE="1") as s:
        s.wait_ready(READY_TIMEOUT)
        assert s.shutdown("post") is not None
    assert precompiled(c.metrics())["built"] == len(BATCHES)
    seed = c.root / "seed"
    shutil.copytree(c.inductor, seed, ignore=shutil.ignore_patterns("compile_cache"))  # not our log dir
    return seed


@pytest.mark.parametrize(
    ("how", "explicit", "request_compile"),
    [("sigterm", False, True), ("post", False, False), ("pgroup", False, False), ("post", True, False)],
    ids=["sigterm-after-a-request-compile", "post", "pgroup", "explicit-shutdown-right-after-ready"],
)
def test_exit_flush_finishes_the_upload(
    how: str, explicit: bool, request_compile: bool, compiled: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    a = seeded(tmp_path / "a", store, compiled)
    log_file = tmp_path / "shutdown.log"
    env = {"COMPILE_CACHE_LOG_FILE": str(log_file)} if explicit else {}
    # Writes are held until the exit flush begins: the background upload cannot finish before the stop.
    with a.server({"hold_until_exit": True, "segment_bytes": 256_000}, explicit=explicit, **env) as s:
        s.wait_ready(READY_TIMEOUT)
        (worker,) = s.worker_pids()
        # --await-explicit-shutdown: the worker inherits "ignored" and we leave it so; else our handler catches it.
        assert sigterm_disposition(worker) == ("ignored" if explicit else "caught")
        assert not list(store.glob("entries/*/manifest.json"))
        if request_compile:
            # A compile on the request path: files only the exit flush can upload.
            code, resp = s.predict({"batch": UNDECLARED})
            assert code == 200 and resp["status"] == "succeeded", resp
        assert s.shutdown(how) is not None, s.log_tail()

    entry = read_entry(store)
    local = a.files()
    assert set(entry) == set(local) and same_content(entry, local)
    m = a.metrics()  # rewritten after the flush
    assert m["flushed_at_exit"] and m["upload_state"] == "done" and m["files_uploaded"] == len(entry)
    log = (log_file if explicit else a.inductor / "compile_cache" / "log.txt").read_text()
    # A process-group SIGTERM reaches the worker itself: our handler flushes (and returns); the rest flush atexit.
    assert f"exit flush ({'SIGTERM' if how == 'pgroup' else 'exit'}): budget 8.0s" in log
    assert "exit flush done: state=done" in log

    b = boot_next(store, tmp_path / "b", (*BATCHES, UNDECLARED) if request_compile else BATCHES).metrics()
    assert b["cache"] == "hit" and b["compiles"] == 0 and b["files_restored"] == len(entry)
    assert b["files_uploaded"] == 0  # nothing new: even A's request-path compile came from the store


def test_sigkill_mid_upload_then_next_boot_restores(compiled: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    marker = tmp_path / "publishing-the-precompiled-functions"
    a = seeded(tmp_path / "a", store, compiled)
    # Small segments, packed in name order, the graph entries last (precompile/ sorts among the kernel dirs): the
    # upload is frozen after writing the object of the first segment that holds a precompiled function, before
    # publishing it. What is published by then are kernels that sort before it: no precompiled function to load.
    plan = {"segment_bytes": 64_000, "stall_publishing": "/precompile/", "marker": str(marker)}
    with a.server(plan) as s:
        s.wait_ready(READY_TIMEOUT)
        end = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < end:
            time.sleep(0.1)
        assert marker.exists(), s.log_tail()
        published = read_entry(store)
        (manifest,) = store.glob("entries/*/manifest.json")
        segments = len(Manifest.from_bytes(manifest.read_bytes()).segments)
        assert len(list(store.glob("objects/*/*.tar.zst"))) == segments + 1  # the frozen segment's object
        assert published and not any("/precompile/" in n for n in published)
        assert set(published) < set(a.files())
        for pid in s.worker_pids():
            os.kill(pid, signal.SIGKILL)
    assert read_entry(store) == published  # the unpublished object is an orphan nobody reads

    b = boot_next(store, tmp_path / "b")
    m = b.metrics()
    assert m["cache"] == "hit" and m["files_restored"] == len(published)
    # B found no precompiled function: it built one per warm-up shape (and whatever else it lacked) ...
    pc = precompiled(m)
    assert pc["loaded"] == 0 and pc["built"] == len(BATCHES)
    # ... and published all of it beside the part it restored.
    entry = read_entry(store)
    assert m["upload_state"] == "done" and m["files_uploaded"] == len(entry) - len(published) > 0
    assert set(published) < set(entry) == set(b.files()) and any("/precompile/" in n for n in entry)


def test_flush_over_budget_leaves_a_consistent_partial_entry(compiled: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    a = seeded(tmp_path / "a", store, compiled)
    # Writes held until the flush, which has 3 s, and each segment's put takes >= 0.5 s: at most 6 publish by the
    # deadline, plus one in flight if the process outlives it. A segment holds at most segment_bytes of files (or one
    # larger file), so the dir needs at least size / segment_bytes of them: twice what the budget allows, or more.
    plan = {"hold_until_exit": True, "put_delay_s": 0.5, "segment_bytes": 30_000}
    size = sum(p.stat().st_size for p in a.files().values())
    assert size / plan["segment_bytes"] * plan["put_delay_s"] >= 2 * 3, "the plan no longer outlasts the budget"
    with a.server(plan, COMPILE_CACHE_FLUSH_BUDGET_S="3") as s:
        s.wait_ready(READY_TIMEOUT)
        assert s.shutdown("post") is not None, s.log_tail()

    entry = read_entry(store)
    local = a.files()
    assert 0 < len(entry) < len(local) and set(entry) <= set(local) and same_content(entry, local)
    m = a.metrics()
    assert m["flushed_at_exit"] and m["upload_state"] == "partial"
    assert 0 < m["files_uploaded"] <= len(entry)
    log = (a.inductor / "compile_cache" / "log.txt").read_text()
    assert "exit flush (exit): budget 3.0s" in log and "the flush budget is spent" in log
    assert "exit flush done: state=partial" in log

    b = boot_next(store, tmp_path / "b")
    m = b.metrics()
    assert m["cache"] == "hit" and m["files_restored"] == len(entry)
    assert m["files_uploaded"] > 0 and set(b.files()) <= set(read_entry(store))
