# make demo / make test work on a fresh clone: they create .venv, install the pinned CPU torch FIRST
# (an unpinned torch would pull several GB of CUDA packages), then the project; re-runs reuse the venv.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast venv clean bench-kernels

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/actsparse sweep +sweep=demo

test: $(STAMP)
	-scripts/ensure_chromium.sh >/dev/null 2>&1
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "not gpu" $(PYTEST_ARGS)

test-fast: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "not gpu and not slow" -x $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) mlflow.db mlruns mlartifacts multirun outputs .actsparse_cache sweep_results
