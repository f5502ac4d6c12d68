"""``make bench-versions``: successive versions of the example against one fresh store, each first boot a new
container (a new process, an empty Inductor cache dir), as a platform serves new versions of one model:

    eager  v1 uncompiled, store off: the baseline setup
    v1     cold: the first version, a fresh store
    v2     weights only: every float tensor perturbed deterministically (a fine-tune), in a temp weights copy
    v3     code only: a copy of the predictor file with other post-processing (v2's weights)
    v4     model change: a copy whose model computes something else, so its graphs change (v2's weights)

Each boot is :mod:`compile_cache.tools.benchboot` (``--check-eager``: the served model against its own eager model on
every warm-up example, so a version served with a stale entry's weights shows). Writes ``OUT/versions.json`` (keys
are an interface: never renamed) and ``OUT/versions.png``.

The predictor must read its weights dir from ``MODEL_WEIGHTS_DIR`` (the example does), and the copies are made by
replacing the example's own lines (``POSTPROCESS`` and ``MODEL_CHANGE`` below): another predictor needs its own.
Copies keep the predictor's file name in a directory of their own (the module's name is part of Inductor's graph
keys, so a renamed file would count as a model change).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ToolError
from ..metrics import write_json_atomic
from .benchboot import BootFailed, spawn

__all__ = ["main", "perturb_weights", "REQUIRED_KEYS", "VERSION_KEYS"]

REQUIRED_KEYS = ("strategy", "eager_setup_s", "cold_setup_s", "store_bytes", "versions")
VERSION_KEYS = ("name", "change", "cache", "seeded_from", "setup_s", "overhead_removed", "fxgraph_hits",
                "fxgraph_misses", "bytes_uploaded", "outputs_match_eager", "max_abs_diff")
MATCH_ATOL = 1e-4  # outputs_match_eager: max abs diff against the eager run of the same version's weights
BOOT_TIMEOUT_S = 3600
DEFAULT_WEIGHTS = "weights/all-MiniLM-L6-v2"
# (what the example says, what a code-only version says instead): post-processing outside the compiled model.
POSTPROCESS = (
    "out += self.model(*self._batch(chunk, *shape))[: len(chunk)].tolist()",
    "out += [[round(v, 6) for v in row] for row in self.model(*self._batch(chunk, *shape))[: len(chunk)].tolist()]",
)
# A model change: the compiled forward computes something else (its graphs change, the encoder's kernels do not).
MODEL_CHANGE = (
    "return torch.nn.functional.normalize(pooled, p=2, dim=1)",
    "return torch.nn.functional.normalize(torch.tanh(pooled), p=2, dim=1)",
)
_BESIDE = ("requirements.txt", "cog.yaml")  # copied beside each copy of the predictor (the key hashes them)
_CONTROLLED = ("COMPILE_CACHE_URL", "COMPILE_CACHE_DISABLE", "COMPILE_CACHE_COMPILE", "COMPILE_CACHE_METRICS_FILE",
               "COMPILE_CACHE_LOG_FILE", "COMPILE_CACHE_MODEL_VERSION", "COMPILE_CACHE_PROGRESS",
               "TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FORCE_DISABLE_CACHES", "MODEL_WEIGHTS_DIR")


class BenchError(ToolError):
    """A boot failed, or a version could not be made: the benchmark cannot be trusted."""


def _say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


@dataclass
class Version:
    name: str
    change: str  # "none" | "weights" | "code" | "model"
    predictor: str  # FILE.py:CLASS
    weights: Path
    result: dict[str, Any] = field(default_factory=dict)


# -- making the versions ---------------------------------------------------------------------------------------------
def perturb_weights(src: Path, dest: Path, *, scale: float = 0.02) -> int:
    """Copy the weights dir ``src`` to ``dest``, every floating tensor ``t`` of its safetensors files replaced by
    ``t * (1 + scale * w) + 0.01 * scale * w`` with ``w = 0.6 + 0.4 * sin(i + k)`` (i: the element's index, k: the
    tensor's rank in name order): deterministic, every value changed, names, shapes and dtypes kept. Returns how
    many tensors changed."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(src, dest, symlinks=False)
    files = sorted(dest.rglob("*.safetensors"))
    if not files:
        raise BenchError(f"no .safetensors file in {src}: the weights-only version perturbs safetensors tensors")
    changed = 0
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            meta = fh.metadata()
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
        for k, name in enumerate(sorted(tensors)):
            t = tensors[name]
            if t.is_floating_point():
                # in [0.2, 1]: never 0, so every value moves (zeros too, through the additive term)
                wave = 0.6 + 0.4 * torch.sin(torch.arange(t.numel(), dtype=torch.float64) + k).reshape(t.shape)
                tensors[name] = (t.double() * (1 + scale * wave) + 0.01 * scale * wave).to(t.dtype).contiguous()
                changed += 1
        f.unlink()
        save_file(tensors, str(f), metadata=meta)
    return changed


def _copy_with(predictor: str, dest_dir: Path, old: str, new: str, what: str) -> str:
    path, _, cls = predictor.partition(":")
    src = Path(path).read_text()
    if src.count(old) != 1:
        raise BenchError(f"cannot make the {what} version of {path}: it does not contain exactly one {old!r}")
    dest_dir.mkdir(parents=True)
    dest = dest_dir / Path(path).name
    dest.write_text(src.replace(old, new))
    for same in _BESIDE:  # the pinned requirements stay what they were: only the code changes
        if (Path(path).parent / same).is_file():
            shutil.copy2(Path(path).parent / same, dest_dir / same)
    return f"{dest}:{cls}"


def plan(predictor: str, weights: Path, work: Path) -> list[Version]:
    path, _, cls = predictor.partition(":")
    v1 = f"{Path(path).resolve()}:{cls}"
    w2 = work / "weights-v2" / weights.name
    n = perturb_weights(weights, w2)
    _say(f"       v2 weights: {n} float tensors perturbed in {w2}")
    return [
        Version("v1", "none", v1, weights),
        Version("v2", "weights", v1, w2),
        Version("v3", "code", _copy_with(v1, work / "code-v3", *POSTPROCESS, "code-only"), w2),
        Version("v4", "model", _copy_with(v1, work / "model-v4", *MODEL_CHANGE, "model-change"), w2),
    ]


# -- the boots -------------------------------------------------------------------------------------------------------
def _env(strategy: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _CONTROLLED}
    if strategy != "default":
        env["COMPILE_CACHE_STRATEGY"] = strategy
    env["COMPILE_CACHE_PROGRESS"] = "0"
    root = str(Path(__file__).resolve().parents[2])  # so `-m compile_cache.tools.benchboot` imports this package
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def _boot(name: str, predictor: str, env: dict[str, str], work: Path, logs: Path) -> dict[str, Any]:
    d = work / name
    d.mkdir(parents=True)
    env = {**env, "TORCHINDUCTOR_CACHE_DIR": str(d / "inductor"), "COMPILE_CACHE_METRICS_FILE": str(d / "metrics.json"),
           "COMPILE_CACHE_LOG_FILE": str(d / "log.txt")}
    try:
        r = spawn(["--predictor", predictor, "--check-eager"], env=env, log=logs / f"{name}.log",
                  timeout=BOOT_TIMEOUT_S)
    except BootFailed as e:
        raise BenchError(f"{name} boot {e}") from e
    write_json_atomic(logs / f"{name}.json", r)
    return r


def _store_bytes(store: Path) -> int:
    return sum(p.stat().st_size for p in store.rglob("*") if p.is_file()) if store.is_dir() else 0


def overhead_removed(eager_s: float, cold_s: float, setup_s: float) -> float | None:
    """1 − (setup − eager)/(cold − eager): the share of the cold boot's compile overhead this boot did not pay."""
    return None if cold_s <= eager_s else round(1.0 - (setup_s - eager_s) / (cold_s - eager_s), 4)


def summarize(strategy: str, eager: dict[str, Any], versions: list[Version], store_bytes: int) -> dict[str, Any]:
    eager_s = float(eager["metrics"]["total_s"])
    cold_s = float(versions[0].result["metrics"]["total_s"])
    rows = []
    for v in versions:
        m, diff = v.result["metrics"], float(v.result["max_abs_diff"])
        rows.append({
            "name": v.name,
            "change": v.change,
            "cache": m["cache"],
            "seeded_from": m.get("seeded_from", ""),
            "setup_s": m["total_s"],
            "overhead_removed": overhead_removed(eager_s, cold_s, float(m["total_s"])),
            "fxgraph_hits": m["fxgraph_hits"],
            "fxgraph_misses": m["fxgraph_misses"],
            "bytes_uploaded": m["bytes_uploaded"],
            "outputs_match_eager": diff <= MATCH_ATOL,
            "max_abs_diff": diff,
            # beside the interface keys: what else explains the row
            "strategy": m["strategy"],
            "key": m["key"],
            "cache_reason": m["cache_reason"],
            "restore_s": m["restore_s"],
            "compile_s": m["compile_s"],
            "bytes_downloaded": m["bytes_downloaded"],
            "key_s": m.get("key_s"),
            "eager_fallback": m["eager_fallback"],
            "upload_state": m["upload_state"],
            "predictor": v.predictor,
            "weights": str(v.weights),
        })
    return {
        "strategy": versions[0].result["metrics"]["strategy"],
        "strategy_requested": strategy,
        "eager_setup_s": eager_s,
        "cold_setup_s": cold_s,
        "store_bytes": store_bytes,
        "versions": rows,
        "match_atol": MATCH_ATOL,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_avg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def _chart(path: Path, r: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"miss": "#d62728", "seeded": "#ff7f0e", "hit": "#2ca02c"}
    fig, ax = plt.subplots(figsize=(9, 5), layout="constrained")
    names = ["eager"] + [f"{v['name']} ({v['change']})" for v in r["versions"]]
    values = [r["eager_setup_s"]] + [v["setup_s"] for v in r["versions"]]
    cols = ["#8c8c8c"] + [colors.get(v["cache"], "#1f77b4") for v in r["versions"]]
    ax.bar(range(len(values)), values, color=cols)
    for i, v in enumerate(r["versions"], 1):
        removed = "n/a" if v["overhead_removed"] is None else f"{v['overhead_removed'] * 100:.0f} %"
        match = "matches eager" if v["outputs_match_eager"] else "DIFFERS from eager"
        ax.text(i, v["setup_s"], f"{v['cache']}\n{removed} removed\n{match}", ha="center", va="bottom", fontsize=8)
    ax.axhline(r["cold_setup_s"], color="#d62728", ls=":", lw=1, label="cold setup (v1)")
    ax.axhline(r["eager_setup_s"], color="#8c8c8c", ls=":", lw=1, label="eager setup")
    ax.set_xticks(range(len(values)), names)
    ax.set_ylabel("setup seconds (first boot of the version, new container)")
    ax.set_ylim(0, max(values) * 1.35)
    ax.set_title(f"compile_cache: successive versions, strategy {r['strategy']}, store {r['store_bytes'] / 1e6:.1f} MB")
    ax.legend(loc="upper right", fontsize=8)
    tmp = path.with_name(f".{path.name}.incomplete")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m compile_cache.tools.bench_versions",
                                 description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    ap.add_argument("--out", default="bench-out", metavar="DIR", help="where versions.json and versions.png go")
    ap.add_argument("--predictor", default="predict.py:Runner", metavar="FILE.py:CLASS")
    ap.add_argument("--weights", default=DEFAULT_WEIGHTS, metavar="DIR", help=f"v1's weights dir ({DEFAULT_WEIGHTS})")
    ap.add_argument("--strategy", choices=("jit", "export", "default"), default="default",
                    help="COMPILE_CACHE_STRATEGY for every boot; default: what the predictor declares")
    ap.add_argument("--keep-work", action="store_true", help="keep OUT/versions-work (store, caches, copies)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    weights = Path(args.weights).resolve()
    if not Path(args.predictor.partition(":")[0]).is_file() or not weights.is_dir():
        sys.stderr.write(f"error: need the predictor file and the weights dir ({args.predictor}, {weights})\n")
        return 2
    out = Path(args.out)
    work, logs = out / "versions-work", out / "versions-boots"
    for d in (work, logs):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    env = _env(args.strategy)
    store = work / "store"
    try:
        versions = plan(args.predictor, weights, work)
        _say("[1/5] eager: v1 uncompiled, store off ...")
        eager = _boot("eager", versions[0].predictor, {**env, "COMPILE_CACHE_COMPILE": "0",
                                                       "COMPILE_CACHE_DISABLE": "1",
                                                       "MODEL_WEIGHTS_DIR": str(weights)}, work, logs)
        _say(f"       setup {eager['metrics']['total_s']:.2f}s")
        for i, v in enumerate(versions, 2):
            _say(f"[{i}/5] {v.name}: change {v.change}, new container, one store ...")
            v.result = _boot(v.name, v.predictor, {**env, "COMPILE_CACHE_URL": str(store),
                                                   "COMPILE_CACHE_MODEL_VERSION": f"bench-{v.name}",
                                                   "MODEL_WEIGHTS_DIR": str(v.weights)}, work, logs)
            m = v.result["metrics"]
            _say(f"       setup {m['total_s']:.2f}s, cache {m['cache']} {m['cache_reason']}, fx graph hits "
                 f"{m['fxgraph_hits']} misses {m['fxgraph_misses']}, uploaded {m['bytes_uploaded']} B, "
                 f"max abs diff vs eager {v.result['max_abs_diff']:.2e}")
        result = summarize(args.strategy, eager, versions, _store_bytes(store))
    except BenchError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    write_json_atomic(out / "versions.json", result)
    _chart(out / "versions.png", result)
    for v in result["versions"]:
        removed = "n/a" if v["overhead_removed"] is None else f"{v['overhead_removed']:.2f}"
        _say(f"{v['name']:<3} {v['change']:<7} cache {v['cache']:<6} setup {v['setup_s']:7.2f}s  overhead removed "
             f"{removed:>5}  fx graph hits {v['fxgraph_hits']} misses {v['fxgraph_misses']}  uploaded "
             f"{v['bytes_uploaded'] / 1e6:.2f} MB  matches eager {v['outputs_match_eager']} ({v['max_abs_diff']:.1e})")
    _say(f"eager setup {result['eager_setup_s']:.2f}s, cold setup {result['cold_setup_s']:.2f}s, store "
         f"{result['store_bytes'] / 1e6:.1f} MB; wrote {out / 'versions.json'} and {out / 'versions.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
