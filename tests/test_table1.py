"""scripts/table1.py --quick: the Table 1 replay end to end on a tiny model (eager and compile-decode, batch 1).

Checks structure and cache behaviour by counts, never by timings: the warm cell (a fresh process whose empty cache
dir was restored from the store a seed run filled) compiles nothing new.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_table1_quick(tmp_path: Path) -> None:
    cp = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "table1.py"), "--quick", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert cp.returncode == 0, cp.stderr[-3000:]
    r = json.loads((tmp_path / "table1.json").read_text())
    assert {"command", "config", "machine", "cells", "summary", "recompiles"} <= set(r)
    assert r["config"]["batches"] == [1] and r["config"]["modes"] == ["eager", "compile-decode"]

    kinds = {(c["mode"], c["kind"]): c for c in r["cells"]}
    assert set(kinds) == {("eager", "eager"), ("compile-decode", "cold"), ("compile-decode", "seed"),
                          ("compile-decode", "warm")}
    for c in r["cells"]:
        for k in ("total_s", "compile_s", "decode_ms_per_token", "fxgraph_hits", "fxgraph_misses", "unique_graphs"):
            assert k in c, (k, c)
        assert c["total_s"] > 0

    eager = kinds[("eager", "eager")]
    cold, seed, warm = (kinds[("compile-decode", k)] for k in ("cold", "seed", "warm"))
    assert eager["unique_graphs"] == 0 and eager["compile_s"] == 0
    # cold: every cache off, so neither a hit nor a miss is even counted; one graph for decode_one_token
    assert cold["fxgraph_hits"] == 0 and cold["unique_graphs"] == 1
    assert seed["fxgraph_misses"] > 0 and seed["uploaded_files"] > 0
    # warm: restored from the store, then only hits
    assert warm["restore"] == "hit" and warm["restored_files"] > 0 and warm["restore_s"] <= warm["total_s"]
    assert warm["fxgraph_hits"] > 0 and warm["fxgraph_misses"] == 0
    assert warm["aotautograd_hits"] > 0 and warm["aotautograd_misses"] == 0
    # greedy decoding gives the same tokens eager, compiled cold and compiled warm
    assert eager["tokens_sha"] == cold["tokens_sha"] == warm["tokens_sha"]

    (row,) = [s for s in r["summary"] if s["mode"] == "compile-decode"]
    assert row["warm_fxgraph_hits"] > 0 and row["warm_fxgraph_misses"] == 0 and row["same_tokens_as_eager"]
    md = (tmp_path / "table1.md").read_text()
    assert "| 1 | compile-decode |" in md and "| 1 | eager |" in md
