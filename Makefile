# cnnpipe — every target sets up .venv when it is missing, then runs inside it (DVC's `python` too:
# the venv's bin/ is put first on PATH so stage commands never pick up another interpreter).
SHELL := /bin/bash
PYTHON ?= python3
TORCH_VERSION ?= 2.14.1
TORCHVISION_VERSION ?= 0.29.1
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION ?= false
UI_HOST ?= 127.0.0.1
UI_PORT ?= 5000
PYTEST_ARGS ?=
TEST_WORKERS ?= auto

.PHONY: setup run sweep test lint ui params bench plots compare

PLOTS_TEMPLATE := .dvc/plots-offline.html

setup: $(STAMP) $(PLOTS_TEMPLATE)

# torch and torchvision go in first, pinned as a pair (timm needs torchvision, and torchvision imports only
# beside the torch it was built for), so no other requirement can pull another build. Their own dependencies
# (the CUDA libraries, triton) follow the build chosen, so the lock's constraints leave them out.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)" "torchvision==$(TORCHVISION_VERSION)"
	grep -Ev '^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==' requirements.lock > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e ".[dev]"
	touch $(STAMP)

# DVC's plot page loads Vega from a CDN; this template inlines it (vl-convert-python), so the page renders offline.
# It is also set as this clone's plots.html_template (.dvc/config.local): plain `dvc plots show/diff` use it too.
$(PLOTS_TEMPLATE): $(STAMP)
	$(BIN)/python -m cnnpipe.offline_plots
	$(BIN)/dvc config --local plots.html_template plots-offline.html
	touch $@

# `dvc repro` ends with "Use `dvc push` ..." even where no DVC remote is configured: that line only with a remote.
run: $(STAMP) $(PLOTS_TEMPLATE)
	test -d .git || git init -q
	set -o pipefail; if [ -n "$$($(BIN)/dvc remote list)" ]; then $(BIN)/dvc repro; \
	    else $(BIN)/dvc repro | sed -u '/dvc push/d'; fi
	@echo; $(BIN)/dvc metrics show; echo
	@echo "Compare runs: make ui (MLflow), make compare (DVC experiments), make plots (curves, confusion)"

# A larger study (conf/sweep/large.yaml: 40 trials, 2 workers) as a DVC experiment: the pipeline re-runs from
# the sweep on, and `dvc exp show` / the MLflow UI show the result. Extra settings: make sweep SET="-S sweep.n_trials=80"
sweep: $(STAMP)
	test -d .git || git init -q
	$(BIN)/dvc exp run -S sweep=large $(SET)

# Lint first, then the suite on every core (pytest-xdist; each worker's torch and stage processes use one thread).
# One test file or a marker: make test PYTEST_ARGS="tests/test_config.py" (TEST_WORKERS=0 runs in this process).
test: lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

# Benchmarks (not tests): side-by-side ratios, results in bench/results/*.json and docs/benchmarks.md.
bench: $(STAMP)
	$(BIN)/python -m bench.run_all $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src pipelines tests bench
	$(BIN)/ruff format --check src pipelines tests bench
	$(BIN)/mypy src

# Regenerate params.yaml from conf/ (what `dvc exp run -S` does with Hydra composition enabled).
params: $(STAMP)
	$(BIN)/python -m cnnpipe.config compose --out params.yaml

# Prints the URL of the runs table (MLflow 3 opens on its GenAI pages otherwise), then serves the project's store.
ui: $(STAMP)
	$(BIN)/python pipelines/ui.py --host $(UI_HOST) --port $(UI_PORT) "tracking.uri=sqlite:///$(CURDIR)/mlflow.db"
	$(BIN)/mlflow server --backend-store-uri "sqlite:///$(CURDIR)/mlflow.db" \
	    --default-artifact-root "$(CURDIR)/mlartifacts" \
	    --host $(UI_HOST) --port $(UI_PORT) --workers 1

# Training curves and confusion matrix as one offline page: make plots [PLOTS_ARGS="diff HEAD~1"]
plots: $(STAMP) $(PLOTS_TEMPLATE)
	$(BIN)/python pipelines/plots.py $(PLOTS_ARGS)

# DVC experiments side by side, only the params and metrics that differ (no dependency-hash columns).
COMPARE_FLAGS ?= --only-changed --drop '.*/' --no-pager
compare: $(STAMP)
	$(BIN)/dvc exp show $(COMPARE_FLAGS) $(COMPARE_ARGS)
