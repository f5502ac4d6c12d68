"""scripts/table1.py --quick: the Table 1 replay end to end on the LLM example's runner with tiny weights (eager and
compile-decode, batch 1; the quick run has no cold cell: it would cost one more compile).

Checks structure and cache behaviour by counts, never by timings: every cell boots the example's runner through
setup(); the warm cell (a fresh process whose setup() restored its empty cache dir from the store a seed boot filled)
compiles nothing new, and compiling decode only leaves prefill eager.
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
    assert r["config"]["predictor"] == "examples/llm/table1_runner.py:Table1Runner" and not r["config"]["cold"]

    kinds = {(c["mode"], c["kind"]): c for c in r["cells"]}
    assert set(kinds) == {("eager", "eager"), ("compile-decode", "seed"), ("compile-decode", "warm")}
    for c in r["cells"]:
        for k in ("total_s", "setup_s", "compile_s", "decode_ms_per_token", "fxgraph_hits", "fxgraph_misses",
                  "unique_graphs", "request_path_compiles", "request_path_eager_calls", "parts"):
            assert k in c, (k, c)
        assert c["total_s"] >= c["setup_s"] > 0
        # every call was one the parts declared: nothing compiled or served eager on the request path
        assert c["request_path_compiles"] == 0 and c["request_path_eager_calls"] == 0
        assert set(c["parts"]) == {"prefill", "decode"}

    eager = kinds[("eager", "eager")]
    seed, warm = (kinds[("compile-decode", k)] for k in ("seed", "warm"))
    assert eager["unique_graphs"] == 0 and eager["compile_s"] == 0
    assert eager["requests"] == 2 and eager["same_tokens_every_request"]
    # compile-decode: decode compiled, prefill eager by its per-part override (no compile, no precompiled functions)
    for c in (seed, warm):
        assert c["parts"]["prefill"]["fxgraph_misses"] == 0 and c["parts"]["prefill"]["fxgraph_hits"] == 0
        assert "precompiled" not in c["parts"]["prefill"]
    # seed: decode's one shape precompiled (the jit default: no FX-graph lookups) and uploaded
    assert seed["restore"] == "miss" and seed["unique_graphs"] == 1 and seed["uploaded_files"] > 0
    assert seed["parts"]["decode"]["precompiled"] == {"loaded": 0, "adopted": 0, "built": 1, "fallback": ""}
    assert seed["upload_state"] == "done"
    # warm: restored by setup() from the store, the function loaded: no Dynamo at all
    assert warm["restore"] == "hit" and warm["restored_files"] > 0 and warm["restore_s"] <= warm["setup_s"]
    assert warm["parts"]["decode"]["precompiled"] == {"loaded": 1, "adopted": 0, "built": 0, "fallback": ""}
    assert warm["unique_graphs"] == 0 and warm["fxgraph_misses"] == 0
    # greedy decoding gives the same tokens eager and compiled warm (the seed generates fewer tokens)
    assert eager["tokens_sha"] == warm["tokens_sha"] and warm["same_tokens_every_request"]

    (row,) = [s for s in r["summary"] if s["mode"] == "compile-decode"]
    assert row["warm_fxgraph_misses"] == 0 and row["same_tokens_as_eager"]
    assert row["cold_total_s"] is None and row["request_path_compiles"] == 0
    md = (tmp_path / "table1.md").read_text()
    assert "| 1 | compile-decode |" in md and "| 1 | eager |" in md
    assert (tmp_path / "logs" / "b1-compile-decode-warm.log").is_file()
