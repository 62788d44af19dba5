# Two commands from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NODE_STAMP := node_modules/.installed
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: install node lint typecheck test demo sandbox stack bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,embedded,sync,api]'
	touch $(STAMP)

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

test: $(STAMP) node lint
	$(BIN)/pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/awork-uploads demo $(DEMO_ARGS)

sandbox: $(STAMP)
	$(BIN)/awork-uploads sandbox --seed-demo

stack: $(STAMP)
	$(BIN)/awork-uploads stack

clean:
	rm -rf $(VENV) node_modules var .mypy_cache .ruff_cache .pytest_cache
