# The two commands of the quick start: `make demo` and `make test`.
# Each does all set-up on a fresh machine: a virtual environment in .venv,
# torch 2.13.0 (CPU build) when no torch is installed, and the project
# (editable) with its test extras. A second run only checks and goes on.
# `make test` also readies DeepSpeed's async I/O reader once per environment
# (the `aio` target): libaio-dev from apt when missing and possible (root,
# apt-get), then the op pre-built into the venv (~5 min on 2 cores, once; the
# stamp records the outcome, so a second run pays nothing). Where that is not
# possible the aio tests skip with the reason and the preadv reader is tested.
# Delete $(VENV)/.tessera-aio to try again.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tessera-installed
AIO_STAMP := $(VENV)/.tessera-aio
PYTEST_ARGS ?=

.PHONY: setup aio demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip setuptools wheel
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	@$(PY) -m pip install -q -e ".[test,offload,plot]"
	@touch $(STAMP)

aio: $(AIO_STAMP)

# Never fails: each step reports what it could not do and the tests skip with that reason.
$(AIO_STAMP): $(STAMP)
	@if [ ! -e /usr/include/libaio.h ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing libaio-dev (DeepSpeed async I/O)"; \
		{ timeout 300 env DEBIAN_FRONTEND=noninteractive apt-get install -y -q libaio-dev >/dev/null 2>&1 || \
		  { timeout 300 apt-get update -q >/dev/null 2>&1 && timeout 300 env DEBIAN_FRONTEND=noninteractive apt-get install -y -q libaio-dev >/dev/null 2>&1; }; } || \
		echo "libaio-dev could not be installed; the aio tests will skip"; \
	fi
	@$(PY) -m tessera.offload.aio_build --stamp $@

demo: setup
	$(VENV)/bin/tessera demo

test: setup $(AIO_STAMP)
	$(PY) -m pytest -q -rs $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/tessera bench all

clean:
	rm -rf $(VENV) build *.egg-info
