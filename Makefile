# Newcomer-guessable targets. `make test` is exactly what CI runs (.ci/run).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint typecheck fmt bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull several GB of CUDA wheels.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check backend tests
	$(BIN)/ruff format --check backend tests

typecheck: $(STAMP)
	$(BIN)/mypy

## The whole suite: lint, types, and every test (slow ones included).
test: lint typecheck
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

## Everything but the tests marked slow.
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow"

fmt: $(STAMP)
	$(BIN)/ruff format backend tests
	$(BIN)/ruff check --fix backend tests

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache runs
