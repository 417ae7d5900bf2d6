# kvprime: `make help` lists the targets. Everything runs inside $(VENV), made by `make setup`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel that lies on this machine kind's disk; on a GPU box: make setup TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
export KVPRIME_HOME ?= $(HOME)/.cache/kvprime
STAMP := $(VENV)/.kvprime-installed

ARGS ?=
PYTEST_ARGS ?=
MODEL ?= smollm2_135m_instruct
DATASET ?= squad_v11
N ?= 50

.PHONY: help setup run lint test test-fast bench bench-gpu reproduce-exp21 reproduce-exp01 reproduce-walkthrough \
	sweep-offsets sweep-prefixes sweep-models reproduce-multidoc sweep-multidoc reproduce-blend

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'
	@echo "  variables: ARGS='<hydra overrides>' MODEL= DATASET= N= TORCH_SPEC= VENV= KVPRIME_HOME=$(KVPRIME_HOME)"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev,mlflow]"
	touch $@

setup: $(STAMP) ## make .venv, install kvprime (+ CPU torch), fetch the sha256-pinned model and data
	$(BIN)/kvprime setup

run: setup ## exp21 on SmolLM2-135M-Instruct + 50 SQuAD v1.1 dev samples (ARGS= for overrides)
	$(BIN)/kvprime run $(ARGS)

# pytest-xdist workers; the tiers (fast, integration, slow) are the markers in pyproject.toml and tests/conftest.py.
lint: setup ## ruff (pyflakes, isort, bugbear, pyupgrade, line length) over kvprime/ and tests/, mypy over kvprime/
	$(BIN)/ruff check kvprime tests
	$(BIN)/mypy

TEST_WORKERS ?= 2
test: setup lint ## every test, all three tiers (fast, integration, slow: the real-model runs), on TEST_WORKERS workers
	$(BIN)/python -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

test-fast: setup ## the fast tier: no real model or data, no process started (-m fast)
	$(BIN)/python -m pytest -m fast -n $(TEST_WORKERS) $(PYTEST_ARGS)

bench: setup ## kvprime vs the notebooks' naive path on exp01, 20 samples, side by side (ARGS= for overrides)
	$(BIN)/kvprime bench $(ARGS)

bench-gpu: setup ## on a CUDA machine: Mistral-7B's shape (random bf16 weights) then SmolLM2, each side by side
	$(BIN)/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench-gpu needs a CUDA device (make setup TORCH_SPEC=torch)')"
	$(BIN)/kvprime bench --no-one-by-one model=mistral_7b_shape_random generation.model=null $(ARGS)
	$(BIN)/kvprime bench $(ARGS)

reproduce-exp21: setup ## the exp21 notebook: its France/Paris sanity example, then MODEL/DATASET/N
	$(BIN)/kvprime run experiment=exp21 model=$(MODEL) dataset=exp21_sanity stats.n_boot=1000 $(ARGS)
	$(BIN)/kvprime run experiment=exp21 model=$(MODEL) dataset=$(DATASET) dataset.n_samples=$(N) $(ARGS)

reproduce-exp01: setup ## the exp01 notebook: 15 conditions (+ exact-shift twins), analyses, 4-panel figure
	$(BIN)/kvprime run experiment=exp01 model=$(MODEL) dataset=$(DATASET) dataset.n_samples=$(N) $(ARGS)

WALK_N ?= 20
reproduce-walkthrough: setup ## the walkthrough notebook: routing over 5 static + 5 generated caches (WALK_N samples)
	$(BIN)/kvprime run experiment=routing model=$(MODEL) dataset=$(DATASET) dataset.n_samples=$(WALK_N) $(ARGS)
	$(BIN)/kvprime walkthrough model=$(MODEL) dataset=$(DATASET) dataset.n_samples=$(WALK_N) $(ARGS)

reproduce-multidoc: setup ## multi-document contexts: joint vs independent vs primed caches, k=3 (N samples)
	$(BIN)/kvprime run experiment=multidoc model=$(MODEL) dataset=$(DATASET) dataset.n_samples=$(N) $(ARGS)

reproduce-blend: setup ## selective recompute (CacheBlend, EPIC) of independent and primed caches vs joint, k=3 (N samples)
	$(BIN)/kvprime run experiment=blend model=$(MODEL) dataset=$(DATASET) dataset.n_samples=$(N) $(ARGS)

LAUNCHER ?= basic
# A new directory per sweep (mktemp: exclusive, so sweeps started together never share one).
SWEEP_DIR = $$(p=$${KVPRIME_OUTPUT_ROOT:-$(CURDIR)/outputs}/multirun/$(1); mkdir -p $$p && \
	mktemp -d $$p/$$(date +%Y-%m-%d_%H-%M-%S)-XXXXXX)
# The sweep report is written even when a job failed; the sweep's exit status is kept.
define run_sweep
	@d=$(call SWEEP_DIR,$(1)) || exit 2; \
	$(BIN)/kvprime run -m experiment=$(1) $(2) dataset=$(DATASET) hydra/launcher=$(LAUNCHER) \
	    hydra.sweep.dir=$$d $(ARGS); rc=$$?; \
	$(BIN)/kvprime report $$d; exit $$rc
endef

sweep-offsets: setup ## offset sweep: baseline_offset at position offsets 0..100 (6 jobs, 20 samples) + sweep report
	$(call run_sweep,offset_sweep,model=$(MODEL))

sweep-prefixes: setup ## prefix-template sweep: truncated priming under 4 templates (4 jobs, 20 samples) + report
	$(call run_sweep,prefix_sweep,model=$(MODEL))

SWEEP_MODELS ?= smollm2_135m_instruct,qwen25_coder_05b_instruct,gemma3_270m
sweep-models: setup ## exp21 on SmolLM2, Qwen2.5-0.5B and Gemma3-270m side by side (N samples) + sweep report
	$(call run_sweep,exp21,model=$(SWEEP_MODELS) dataset.n_samples=$(N))

MULTIDOC_N ?= 20
MULTIDOC_KS ?= 1,3,5
MULTIDOC_SLOTS ?= first,middle,last
sweep-multidoc: setup ## multidoc over k=1,3,5 (gold slot random), then gold slot first/middle/last (k=3); MULTIDOC_N samples
	$(call run_sweep,multidoc,model=$(MODEL) dataset.n_samples=$(MULTIDOC_N) multidoc.k=$(MULTIDOC_KS))
	$(call run_sweep,multidoc,model=$(MODEL) dataset.n_samples=$(MULTIDOC_N) multidoc.gold_slot=$(MULTIDOC_SLOTS))

.PHONY: docs
docs: $(STAMP) ## the documentation site from docs/ (MkDocs, --strict: a broken link or a page not in nav fails) into site/
	$(BIN)/mkdocs build --strict -d site/
