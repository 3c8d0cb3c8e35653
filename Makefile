# One entry point for people and CI: `make run`, `make test`, `make bench`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= config/iotflow.toml

.PHONY: setup run test lint typecheck pytest bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "iotflow needs Python 3.11 or newer"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: setup
	deploy/dev-broker.sh
	mkdir -p var
	$(BIN)/iotflow run -c $(CONFIG)

lint: setup
	$(BIN)/ruff check daemon tests
	$(BIN)/ruff format --check daemon tests

typecheck: setup
	$(BIN)/mypy

pytest: setup
	$(BIN)/pytest -q

test: lint typecheck pytest

bench: setup
	$(BIN)/python tests/bench/bench_routing.py

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
