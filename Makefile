# Quick start: `make serve` and `make test`. Each creates or refreshes .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv serve test lint bench clean

venv: $(STAMP)

# Re-install only when the project's dependency list changes (idempotent).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

serve: venv
	$(BIN)/orthovision serve

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not slow" -q

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: venv
	$(BIN)/python -m bench.preprocess

clean:
	rm -rf $(VENV) .pytest_cache
