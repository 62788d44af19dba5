# Two commands from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# One stamp per set of extras: `make install` (everything, tests included) writes .installed;
# `make demo`/`sandbox`/`stack` need only the operator tools (.installed-ops).
STAMP := $(VENV)/.installed
OPS_STAMP := $(VENV)/.installed-ops
NODE_STAMP := node_modules/.installed
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: install node lint typecheck test test-fast demo sandbox stack bench clean

install: $(STAMP)

$(BIN)/pip:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Every extra (worker, api, ops, embedded, sync) and the test tools.
$(STAMP): pyproject.toml | $(BIN)/pip
	$(BIN)/pip install --quiet -e '.[all,dev]'
	touch $(STAMP) $(OPS_STAMP)

# The local stack: workers, Flower, the sandbox and an embedded redis-server.
$(OPS_STAMP): pyproject.toml | $(BIN)/pip
	$(BIN)/pip install --quiet -e '.[ops,embedded]'
	touch $(OPS_STAMP)

# Azurite (the Azure Storage emulator) for the blob tests; skipped only where npm is missing.
node: $(NODE_STAMP)

$(NODE_STAMP): package.json
	@if command -v npm >/dev/null 2>&1; then \
		npm install --no-audit --no-fund --loglevel=error && touch $(NODE_STAMP); \
	else \
		echo "npm not found: Azurite tests will be skipped"; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check producers workers ops tests
	$(BIN)/mypy producers workers

# Two phases (tests/run_suite.sh): three test files at a time, then the timing tests one at a time.
test: $(STAMP) node lint
	PYTEST=$(BIN)/pytest tests/run_suite.sh $(PYTEST_ARGS)

# Everything but the tests marked slow (worker fleets, soaks, broker outages, Azurite).
test-fast: $(STAMP)
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

demo: $(OPS_STAMP)
	$(BIN)/awork-uploads demo $(DEMO_ARGS)

sandbox: $(OPS_STAMP)
	$(BIN)/awork-uploads sandbox --seed-demo

stack: $(OPS_STAMP)
	$(BIN)/awork-uploads stack

clean:
	rm -rf $(VENV) node_modules var .mypy_cache .ruff_cache .pytest_cache
