# The two commands of the quick start: `make demo` and `make test`.
# Each does all set-up on a fresh machine: a virtual environment in .venv,
# torch 2.13.0 (CPU build) when no torch is installed, and the project
# (editable) with its test extras. A second run only checks and goes on.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tessera-installed
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip setuptools wheel
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	@$(PY) -m pip install -q -e ".[test,offload,plot]"
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/tessera demo

test: setup
	$(PY) -m pytest -q -rs $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/tessera bench all

clean:
	rm -rf $(VENV) build *.egg-info
