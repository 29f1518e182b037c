# Newcomer-guessable targets. `make test` is exactly what CI runs (.ci/run).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

LS_VENV := .venv-ls
LS_VERSION := 1.23.2
LS_STAMP := $(LS_VENV)/.installed-$(LS_VERSION)

.PHONY: install install-ls test test-fast test-e2e lint typecheck fmt bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull several GB of CUDA wheels.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Label Studio gets its own venv: it pins Django, rq and redis-py versions that must stay out of the
# backend's. Only the end-to-end tests (tests/test_label_studio.py, marker e2e) use it; the stamp
# names the version, so bumping LS_VERSION reinstalls and a second run is instant.
# --no-cache-dir: nothing is cached outside the clone.
$(LS_STAMP):
	rm -rf $(LS_VENV)
	$(PY) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install -q --no-cache-dir label-studio==$(LS_VERSION)
	touch $(LS_STAMP)

install-ls: $(LS_STAMP)

lint: $(STAMP)
	$(BIN)/ruff check backend tests
	$(BIN)/ruff format --check backend tests

typecheck: $(STAMP)
	$(BIN)/mypy

## The whole suite: lint, types, and every test (slow and e2e ones included).
test: lint typecheck $(LS_STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

## Everything but the tests marked slow or e2e (those start a real Label Studio).
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow and not e2e"

## Only the end-to-end tests against a real Label Studio server.
test-e2e: $(STAMP) $(LS_STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m e2e

## The figures in BENCHMARKS.md (about 25 minutes on 2 cores; needs ../shared/datasets).
DATA := ../shared/datasets
bench: $(STAMP)
	$(BIN)/autoannotator sweep --seed-file $(DATA)/twitter-financial-news/train.jsonl \
		--stream-file $(DATA)/twitter-financial-news/val.jsonl --n-seed 500 --challenger mean \
		--budgets 0.1,0.2,0.3 --out runs/sweep-fin
	$(BIN)/autoannotator sweep --seed-file $(DATA)/tweeteval-sentiment/train.jsonl \
		--stream-file $(DATA)/tweeteval-sentiment/val.jsonl --n-seed 500 --challenger mean \
		--budgets 0.1,0.2,0.3 --out runs/sweep-sent
	$(BIN)/autoannotator benchmark --version-dir runs/sweep-fin/eps-1/models/versions/v0001 \
		--data $(DATA)/twitter-financial-news/val.jsonl --n 1000 --train-n 300 --epochs 3 --out runs/bench-fin.json

fmt: $(STAMP)
	$(BIN)/ruff format backend tests
	$(BIN)/ruff check --fix backend tests

clean:
	rm -rf $(VENV) $(LS_VENV) .pytest_cache .mypy_cache .ruff_cache runs
