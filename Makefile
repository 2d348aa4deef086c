# cnnpipe — every target sets up .venv when it is missing, then runs inside it (DVC's `python` too:
# the venv's bin/ is put first on PATH so stage commands never pick up another interpreter).
SHELL := /bin/bash
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION ?= false
UI_HOST ?= 127.0.0.1
UI_PORT ?= 5000
PYTEST_ARGS ?=

.PHONY: setup run sweep test lint ui params bench

setup: $(STAMP)

# torch goes in first, pinned, so no other requirement can pull a newer (CUDA, several GB) build.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"
	grep -v '^torch==' requirements.lock > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	test -d .git || git init -q
	$(BIN)/dvc repro
	@echo; $(BIN)/dvc metrics show; echo
	@echo "Compare runs in the MLflow UI: make ui"

# A larger study (conf/sweep/large.yaml: 40 trials, 2 workers) as a DVC experiment: the pipeline re-runs from
# the sweep on, and `dvc exp show` / the MLflow UI show the result. Extra settings: make sweep SET="-S sweep.n_trials=80"
sweep: $(STAMP)
	test -d .git || git init -q
	$(BIN)/dvc exp run -S sweep=large $(SET)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Benchmarks (not tests): side-by-side ratios, results in bench/results/*.json and docs/benchmarks.md.
bench: $(STAMP)
	$(BIN)/python -m bench.run_all $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src pipelines tests bench
	$(BIN)/ruff format --check src pipelines tests bench

# Regenerate params.yaml from conf/ (what `dvc exp run -S` does with Hydra composition enabled).
params: $(STAMP)
	$(BIN)/python -m cnnpipe.config compose --out params.yaml

ui: $(STAMP)
	@echo "MLflow UI: http://$(UI_HOST):$(UI_PORT)"
	$(BIN)/mlflow server --backend-store-uri "sqlite:///$(CURDIR)/mlflow.db" \
	    --default-artifact-root "$(CURDIR)/mlartifacts" \
	    --host $(UI_HOST) --port $(UI_PORT) --workers 1
