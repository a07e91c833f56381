# Two commands matter: `make run` (the main job) and `make test` (the whole suite).
# Both create .venv on first use: the CPU build of torch first, so nothing pulls a CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/fedmerge: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

.PHONY: install run test lint bench
install: $(BIN)/fedmerge

run: install
	$(BIN)/fedmerge simulate --out runs/default

test: install
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
