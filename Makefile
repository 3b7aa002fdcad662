# panal — two commands for a newcomer: `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# CPU machines take the local torch 2.13.0 CPU wheel; a GPU host sets CONSTRAINTS= to keep its own.
CONSTRAINTS ?= constraints/cpu.txt
# On a GPU host: `make setup TORCH= CONSTRAINTS=` keeps the host's CUDA torch.
TORCH ?= torch==2.13.0
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
export DS_BUILD_OPS := 0
# DeepSpeed compiles a shared-memory comm op the first time a CPU process group forms (~1-2 min).
# Build it once at set-up into the venv, so tests never wait on it (or on another run's lock).
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions

.PHONY: setup demo test lint proto bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) tests/storage/oracles/package-lock.json \
		tests/storage/ipfsd/package-lock.json
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(if $(TORCH),$(BIN)/python -m pip install --quiet $(PIP_C) "$(TORCH)")
	$(BIN)/python -m pip install --quiet $(PIP_C) -e ".[dev]"
	npm ci --prefix tests/storage/oracles --no-audit --no-fund --loglevel=error
	npm ci --prefix tests/storage/ipfsd --no-audit --no-fund --loglevel=error
	$(if $(TORCH),DS_ACCELERATOR=cpu $(BIN)/python -c "from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder as B; B().load()")
	@touch $@

# The main job on embedded defaults: demo corpus, a coordinator and 2 pools x 2 stages of node
# daemons as separate processes on loopback, a few rounds, then the summary.
demo: setup
	PATH=$(CURDIR)/$(BIN):$$PATH DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 $(BIN)/panal simulate --summary-json runs/demo-summary.json

# pytest exits 5 when it collected nothing: a test run that tests nothing fails.
test: setup
	@PATH=$(CURDIR)/$(BIN):$$PATH DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS); \
	rc=$$?; if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy protocol storage

proto: setup
	$(BIN)/python -m protocol.codegen

bench: setup
	$(BIN)/python bench/protocol.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
