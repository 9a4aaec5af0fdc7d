# The two commands: `make run` and `make test`. Both install what is missing first.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
SANDBOX ?= .sandbox

.PHONY: bootstrap run test lint typecheck bench clean-sandbox

bootstrap:
	@scripts/bootstrap.sh

run: bootstrap
	@if [ ! -f $(SANDBOX)/manifest.json ]; then $(BIN)/hpki-gateway sandbox init $(SANDBOX); fi
	$(BIN)/hpki-gateway serve -c $(SANDBOX)/gateway.toml

lint: bootstrap
	$(BIN)/ruff check gateway tests
	$(BIN)/ruff format --check gateway tests

typecheck: bootstrap
	$(BIN)/mypy gateway

test: bootstrap lint typecheck
	$(BIN)/python -m pytest --durations=15 tests

# Raw SoftHSM rate vs signHash (batch, single at 16 clients, 2 workers), RSS: bench/results.json
bench: bootstrap
	$(BIN)/python bench/run.py

clean-sandbox:
	rm -rf $(SANDBOX)
