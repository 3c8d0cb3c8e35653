# One entry point for people and CI: `make run`, `make test`, `make bench`; `make stop`
# stops the Mosquitto that `make run` started.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= config/iotflow.toml
VAR    ?= var

.PHONY: setup run stop broker-stop test lint typecheck pytest bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "iotflow needs Python 3.11 or newer"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The broker at [mqtt] url of $(CONFIG) (started when none listens), the API token of
# $(VAR)/api-token (made on the first run; $$IOTFLOW_API_TOKEN wins when set), the daemon.
run: setup
	CONFIG=$(CONFIG) VAR=$(VAR) deploy/dev-broker.sh
	CONFIG=$(CONFIG) VAR=$(VAR) deploy/dev-token.sh
	IOTFLOW_API_TOKEN="$${IOTFLOW_API_TOKEN:-$$(cat $(VAR)/api-token)}" $(BIN)/iotflow run -c $(CONFIG)

# The daemon stops with Ctrl-C; its broker, if `make run` started one, with this.
stop broker-stop:
	VAR=$(VAR) deploy/dev-broker.sh stop

lint: setup
	$(BIN)/ruff check daemon tests
	$(BIN)/ruff format --check daemon tests

typecheck: setup
	$(BIN)/mypy

pytest: setup
	$(BIN)/pytest -q

test: lint typecheck pytest

# Three flat-out runs of 30,000 uplinks (medians, each against the bare-client ceiling of
# its own run), then throughput and latency at five offered loads (fractions of the
# sustained rate), plotted to docs/images/bench-routing.png.
# `make bench BENCH_ARGS=--node-red` also measures Node-RED (installed from npm into a
# temporary directory).
BENCH_ARGS ?=
bench: setup
	$(BIN)/python tests/bench/bench_routing.py -n 30000 --devices 500 --runs 3 --sweep \
		--plot docs/images/bench-routing.png $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
