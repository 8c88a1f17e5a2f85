# make demo / make test work on a fresh clone: they create .venv, install the pinned CPU torch FIRST
# (an unpinned torch would pull several GB of CUDA packages), then the project with the exact versions
# of constraints.txt (the lock); re-runs reuse the venv. `make lock` refreshes the lock.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
UV      ?= uv==0.13.9
LOCK    := constraints.txt
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast venv lock clean

# uv installs the locked set about 3x faster than pip (measured 35 s vs 110 s with no cache, 2 cores); the
# pip-installed CPU torch satisfies the project's torch range, so uv keeps it and downloads no CUDA build.
# pip is the fallback where uv cannot run.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q "$(UV)"
	$(BIN)/uv pip install -q --python $(BIN)/python -c $(LOCK) -e ".[dev]" \
	  || $(BIN)/python -m pip install -q -c $(LOCK) -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/actsparse sweep +sweep=demo

test: $(STAMP)
	-scripts/ensure_chromium.sh >/dev/null 2>&1
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "not gpu" -n 2 --dist loadgroup $(PYTEST_ARGS)

test-fast: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "not gpu and not slow" -x $(PYTEST_ARGS)

# Resolve the newest versions the registries serve today in a scratch venv and write them to the lock.
# Then run `make test` (it reinstalls from the new lock) and commit constraints.txt with the change.
lock:
	rm -rf .lock-venv && $(PY) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q --upgrade pip
	.lock-venv/bin/python -m pip install -q "$(TORCH)"
	.lock-venv/bin/python -m pip install -q -e ".[dev]"
	{ sed -n '1,3p' $(LOCK); .lock-venv/bin/python -m pip freeze --exclude-editable | grep -v -i '^torch=='; } > $(LOCK).new
	mv $(LOCK).new $(LOCK) && rm -rf .lock-venv
	@echo "constraints.txt refreshed: run 'make test', then commit it"

clean:
	rm -rf $(VENV) mlflow.db mlruns mlartifacts multirun outputs .actsparse_cache sweep_results
