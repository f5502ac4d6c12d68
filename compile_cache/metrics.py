"""Boot metrics: one JSON object (the metrics file) and one readable block (the setup log).

The key names are an interface: scripts and dashboards read them. Add keys; never rename one. With several compiled
parts, every top-level count is the sum over the parts, and ``parts`` holds each part's own (:data:`PART_KEYS`).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BootMetrics", "JIT_PART_KEYS", "PART_KEYS", "part_metrics", "write_json_atomic"]

# The keys of each entry of ``parts``: "strategy" is "jit" or "export"; "jit_restore" the jit strategy's restore
# mode, "precompile" or "dir" ("" under "export"). A part restored by precompile also has "precompiled". Under the
# serve policy (docs/fleet.md), "swapped_at_s" is when a part built in the background was swapped in (seconds from
# setup's start; None otherwise) and "eager_calls_before_swap" the calls it served eager before; "build_pending" marks
# a part that serves eager while its build runs. A part with ``batch`` configured also has "batch": {"batches",
# "sizes" (real rows per joined call -> count), "wait_ms_p50", "wait_ms_p99"} (compile_cache/batching.py).
PART_KEYS = ("strategy", "jit_restore", "compile_s", "fxgraph_hits", "fxgraph_misses", "request_path_compiles",
             "request_path_eager_calls", "eager_fallback", "swapped_at_s", "eager_calls_before_swap")
# A jit part's ``compile_s`` split (they add up to it): Inductor's import and the CPU ISA decision (carried by the first
# jit part, whose compile step paid them), loading (compile_model, precompiled functions) and the warm-up calls.
JIT_PART_KEYS = ("import_s", "isa_s", "load_s", "first_calls_s")


def part_metrics(strategy: str, jit_restore: str, *, compile_s: float = 0.0, fxgraph_hits: int = 0,
                 fxgraph_misses: int = 0, eager_fallback: str = "") -> dict[str, Any]:
    """One entry of ``parts``, with every :data:`PART_KEYS` key (request counters and swap figures at zero)."""
    return {"strategy": strategy, "jit_restore": jit_restore, "compile_s": round(compile_s, 4),
            "fxgraph_hits": fxgraph_hits, "fxgraph_misses": fxgraph_misses, "request_path_compiles": 0,
            "request_path_eager_calls": 0, "eager_fallback": eager_fallback, "swapped_at_s": None,
            "eager_calls_before_swap": 0}


@dataclass
class BootMetrics:
    key: str = ""
    store: str = ""
    strategy: str = "jit"  # the parts' strategy; "mixed" when they differ (each part's is in ``parts``)
    cache: str = "disabled"  # "hit" | "seeded" | "miss" | "disabled" | "error" | "rejected"
    cache_reason: str = ""
    seeded_from: str = ""  # cache "seeded": the key of the entry restored as a seed
    version: str = ""  # the version's label (docs/versions.md)
    lineage: str = ""
    key_s: float = 0.0  # computing the key: hashing source, requirements and weight files (headers of tensor files)
    restore_s: float = 0.0
    load_s: float = 0.0
    compile_s: float = 0.0  # compile + warm-up
    total_s: float = 0.0
    fxgraph_hits: int = 0
    fxgraph_misses: int = 0
    aotautograd_hits: int = 0
    aotautograd_misses: int = 0
    compiles: int = 0  # Dynamo graphs compiled in this process
    graph_breaks: int = 0
    request_path_compiles: int = 0
    request_path_eager_calls: int = 0  # calls with an undeclared shape served uncompiled (on_new_shape="eager")
    bytes_downloaded: int = 0
    restore_mb_s: float = 0.0
    files_restored: int = 0
    bytes_uploaded: int = 0
    files_uploaded: int = 0
    upload_s: float = 0.0
    upload_state: str = "none"  # "none" | "running" | "done" | "error" | "partial"
    upload_error: str = ""
    eager_fallback: str = ""  # why a part serves eager ("part: reason; ..."), empty when every part is compiled
    warmup: list[dict[str, Any]] = field(default_factory=list)  # per declared shape: {"part", "shape", "s"}
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {PART_KEYS} (jit: + JIT_PART_KEYS)
    # Inductor's CPU ISA decision, where a jit part needed one: {"source", "decision", "probes", "reason",
    # "import_s", "isa_s"} (compile_cache/isa.py); empty otherwise
    isa: dict[str, Any] = field(default_factory=dict)
    flushed_at_exit: bool = False
    # The build lease (docs/fleet.md): "held" (this boot built, or restored what appeared meanwhile) | "followed"
    # (it waited for another replica's build) | "none" (no lease: a hit, the lease off, or the store unusable)
    lease: str = "none"
    lease_holder: str = ""  # host:pid:random of the holder: this process, or the one it followed
    lease_wait_s: float = 0.0  # setup time spent following; restore_s does not include it
    lease_polls: int = 0  # reads of the lease while following
    # The serve policy (docs/fleet.md). ``ready_s``: setup's seconds, when it returned (as ``total_s``);
    # ``compiled_s``: seconds from setup's start until no part waits for a build any more (one that fell back to
    # eager counts as done), None until then; ``built_here``: this replica (its process, or its background child)
    # compiled the entry; ``background_build``: the child's {"state", "pid", "seconds", "peak_rss_mb",
    # "exit_code", "reason", "log"}, {} where none ran.
    ready_s: float = 0.0
    compiled_s: float | None = None
    built_here: bool = False
    background_build: dict[str, Any] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, float):
                d[k] = round(v, 4)
        return d

    def write(self, path: Path | None) -> None:
        if path is not None:
            write_json_atomic(path, self.to_dict())

    def timeline(self) -> str:
        """The readable block that lands in Cog's setup.logs."""
        per_part = []
        for name, p in self.parts.items():
            per_part.append(
                f"    part {name}: {p['strategy']}{_restore(p.get('jit_restore'))}  {p['compile_s']:.2f}s"
                f"  fx graph hits {p['fxgraph_hits']}"
                f"  misses {p['fxgraph_misses']}" + (f"  EAGER ({p['eager_fallback']})" if p["eager_fallback"] else "")
                + _precompiled(p.get("precompiled"))
                + ("  serving EAGER until its build is swapped in" if p.get("build_pending") else "")
            )
            if "first_calls_s" in p:
                per_part.append(f"      import {p['import_s']:.2f}s  ISA {p['isa_s']:.2f}s  load {p['load_s']:.2f}s"
                                f"  first calls {p['first_calls_s']:.2f}s")
            per_part += [f"      warm-up {x['shape']}: {x['s']:.2f}s" for x in self.warmup if x.get("part") == name]
        w = "\n".join(per_part)
        lines = [
            "compile_cache setup timeline",
            f"  key        {self.key}  ({self.key_s:.2f}s)",
            f"  version    {self.version}  lineage {self.lineage}",
            f"  store      {self.store}",
            f"  strategy   {self.strategy}",
            f"  cache      {self.cache}" + (f" ({self.cache_reason})" if self.cache_reason else ""),
            *([f"  seeded     from {self.seeded_from}"] if self.seeded_from else []),
            *([f"  lease      {self.lease} {self.lease_holder}  waited {self.lease_wait_s:.2f}s  {self.lease_polls} "
               "polls"] if self.lease != "none" else []),
            f"  restore    {self.restore_s:.2f}s  {self.bytes_downloaded / 1e6:.1f} MB  {self.files_restored} files"
            f"  {self.restore_mb_s:.0f} MB/s",
            f"  load       {self.load_s:.2f}s",
            f"  compile    {self.compile_s:.2f}s (compile + warm-up)" + (f"\n{w}" if w else ""),
            *([_isa(self.isa)] if self.isa else []),
            f"  fx graph   hits {self.fxgraph_hits}  misses {self.fxgraph_misses}",
            f"  aot autograd hits {self.aotautograd_hits}  misses {self.aotautograd_misses}",
            f"  dynamo     compiles {self.compiles}  graph breaks {self.graph_breaks}",
        ]
        if self.eager_fallback:
            lines.append(f"  EAGER      serving eager: {self.eager_fallback}")
        lines.append(f"  upload     {self.upload_state} (in the background)")
        lines.append(f"  total      {self.total_s:.2f}s")
        return "\n".join(lines)


def write_json_atomic(path: Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".incomplete", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _restore(mode: str | None) -> str:
    return f", jit_restore {mode}" if mode else ""


def _precompiled(pc: dict[str, Any] | None) -> str:
    if not pc:
        return ""
    line = f"  precompiled: loaded {pc['loaded']}, adopted {pc['adopted']}, built {pc['built']}"
    return line + (f" (jit for the rest: {pc['fallback']})" if pc["fallback"] else "")


def _isa(i: dict[str, Any]) -> str:
    line = f"  cpu isa    {i['decision'] or '(not decided)'}  {i['source']}, {i['probes']} probe(s)  {i['isa_s']:.2f}s"
    return line + (f" ({i['reason']})" if i["reason"] and i["source"] != "recorded" else "")
