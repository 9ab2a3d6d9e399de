# Sluice developer commands. Everything runs from the project's own virtualenv.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test check lint typecheck bench clean schemas

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m sluice.demo

test: $(STAMP)
	$(BIN)/pytest -q --durations=10

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

schemas: $(STAMP)
	$(BIN)/python -m schemas.generate

bench: $(STAMP)
	$(BIN)/python bench/import_csv.py

clean:
	rm -rf $(VENV) .sluice .pytest_cache .mypy_cache .ruff_cache
