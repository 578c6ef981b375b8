# midfill developer entry points. `make test` and `make demo` create/refresh .venv themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The dev/test environment is pinned (torch 2.13.0 is the CPU build on local disk; a looser pin
# would pull a multi-GB CUDA build). Refresh the lock with `make lock`.
LOCK := requirements-lock.txt
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv test test-fast demo crds lock clean help

help:
	@echo "make test   - create/refresh .venv and run the test suite (what CI runs)"
	@echo "make crds   - regenerate manifests/crds/ from midfill.api"
	@echo "make lock   - re-pin requirements-lock.txt from the current .venv"

venv: $(STAMP)

# Re-install only when the project metadata or the lock changed (idempotent and fast otherwise).
$(STAMP): pyproject.toml $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c $(LOCK) torch==2.13.0
	$(PIP) install -q -c $(LOCK) -e '.[dev]'
	@touch $(STAMP)

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

crds: venv
	$(VENV)/bin/midfill crds --out manifests/crds

lock: venv
	$(PIP) freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu/torch==\1/' > $(LOCK)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
