# Sluice developer commands. Everything runs from the project's own virtualenv.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CHAOS_ROUNDS ?= 5

.PHONY: setup demo test check lint typecheck bench bench-formats bench-firehose chaos reliability clean schemas browser

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,parquet,s3]'
	touch $(STAMP)

# Debian's Chromium for the dashboard's browser tests (Playwright drives it; it downloads no
# browser of its own). Installed when missing and we are root with apt-get; otherwise those
# tests skip and say why.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing chromium (apt-get)"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
		else \
			echo "chromium not installed and cannot install it here (needs root and apt-get): the browser tests will skip"; \
		fi; \
	}

setup: $(STAMP) browser

demo: $(STAMP)
	$(BIN)/python -m sluice.demo

test: $(STAMP) browser
	$(BIN)/pytest -q --durations=10

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

schemas: $(STAMP)
	$(BIN)/python -m sluice.schemas.generate

bench: $(STAMP)
	$(BIN)/python bench/import_csv.py

bench-formats: $(STAMP)
	$(BIN)/python bench/import_formats.py

bench-firehose: $(STAMP)
	$(BIN)/python bench/firehose.py

# Fault injection (tests/chaos): CHAOS_ROUNDS rounds of every fault; CHAOS_SEED repeats a run.
chaos: $(STAMP)
	CHAOS_ROUNDS=$(CHAOS_ROUNDS) $(BIN)/pytest -q -m chaos tests/chaos

reliability: $(STAMP)
	$(BIN)/python bench/reliability.py

clean:
	rm -rf $(VENV) .sluice .pytest_cache .mypy_cache .ruff_cache
