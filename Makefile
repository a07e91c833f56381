# fedmerge's everyday commands (docs/getting-started.md has the walk-through and timings).
#
#   make run          the default simulation (installs the runtime dependencies on first use)
#   make test         the whole test suite, as CI runs it (.ci/run); installs the dev tools too
#   make test-fast    the suite without the tests marked slow
#   make install      runtime dependencies only, with the CPU build of torch
#   make install GPU=1   the package index's default torch build instead (CUDA on Linux)
#   make dev          runtime + dev tools (pytest, ruff, import-linter, hypothesis, transformers)
#   make lint         ruff and the import-linter contracts (layers)
#   make bench        a quick pass of every benchmark (small sizes; minutes)
#   make shell        a shell with .venv activated (or run: . .venv/bin/activate)
#
# PY picks the interpreter for .venv (Python >= 3.11), e.g. `make run PY=python3.12`.
# TORCH_INDEX is the CPU wheel index tried first; unreachable, the package index is used
# and a CUDA build is refused unless GPU=1.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
GPU ?=
TORCH_DRY_RUN ?=

.PHONY: python-check torch install dev run test test-fast lint bench shell

# Runs before anything is installed: a too-old Python fails here, in a second, with one line.
python-check:
	@v=$$($(PY) -c 'import sys; print(*sys.version_info[:2])') || { \
	  echo "make: cannot run '$(PY)'; install Python >= 3.11 or pass PY=/path/to/python3.11" >&2; \
	  exit 1; }; \
	set -- $$v; \
	if [ "$$1" -lt 3 ] || { [ "$$1" -eq 3 ] && [ "$$2" -lt 11 ]; }; then \
	  echo "make: fedmerge needs Python >= 3.11, but '$(PY)' is Python $$1.$$2;" \
	       "run e.g. 'make PY=python3.11' (nothing was installed)" >&2; exit 1; fi

$(BIN)/python: | python-check
	$(PY) -m venv $(VENV)

# The CPU build of torch first, so that nothing later pulls a CUDA build (tools/install_torch.py).
torch: $(BIN)/python
	$(BIN)/python tools/install_torch.py --spec '$(TORCH)' --index '$(TORCH_INDEX)' \
	  $(if $(GPU),--gpu) $(if $(TORCH_DRY_RUN),--dry-run)

$(VENV)/.torch: | $(BIN)/python
	$(MAKE) --no-print-directory torch
	touch $@

$(VENV)/.runtime: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install --quiet -e .
	touch $@
	@echo "installed; activate with: . $(VENV)/bin/activate   (or: make shell)"

$(VENV)/.dev: pyproject.toml $(VENV)/.runtime
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.runtime
dev: $(VENV)/.dev

run: install
	$(BIN)/fedmerge simulate

test: dev
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

test-fast: dev
	$(BIN)/python -m pytest -q -m "not slow"

lint: dev
	$(BIN)/ruff check .
	$(BIN)/lint-imports

bench: install
	$(BIN)/python benchmarks/merge_speed.py --quick
	$(BIN)/python benchmarks/continual_memory.py --quick
	$(BIN)/python benchmarks/topology_scale.py --n 2000 --dense-n 500
	$(BIN)/python benchmarks/simulator_scale.py --agents 100 --rounds 20 --baseline-rounds 20

shell: install
	@echo "a shell with $(VENV) activated; 'exit' leaves it"
	@. $(BIN)/activate && exec "$${SHELL:-/bin/sh}" -i
