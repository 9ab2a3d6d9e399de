# Sluice developer commands. Everything runs from the project's own virtualenv.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CHAOS_ROUNDS ?= 5

.PHONY: setup demo test check lint typecheck bench bench-formats bench-firehose chaos reliability clean schemas browser readme-settings stunnel

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,parquet]'
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

# Debian's stunnel4 for the TLS tests (tests/support/secure_broker.py): the TLS endpoint in
# front of Tansu, which serves no TLS itself. Installed when missing and we are root with
# apt-get; otherwise the TLS tests skip and say why (the SASL_PLAINTEXT ones still run).
stunnel:
	@command -v stunnel4 >/dev/null 2>&1 || command -v stunnel >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing stunnel4 (apt-get)"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq stunnel4 >/dev/null; \
		else \
			echo "stunnel4 not installed and cannot install it here (needs root and apt-get): the TLS tests will skip"; \
		fi; \
	}

setup: $(STAMP) browser stunnel

demo: $(STAMP)
	$(BIN)/python -m sluice.demo

test: $(STAMP) browser stunnel
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
	$(BIN)/python bench/reliability.py --rounds $(CHAOS_ROUNDS) --no-hostile

reliability: $(STAMP)
	$(BIN)/python bench/reliability.py

clean:
	rm -rf $(VENV) .sluice .pytest_cache .mypy_cache .ruff_cache

# The README's table of settings, generated from the settings classes (tests/test_config.py
# fails when it is stale).
readme-settings: $(STAMP)
	$(BIN)/python -c "import re, pathlib; from sluice.config import settings_markdown as t; p = pathlib.Path('README.md'); s = p.read_text(); a = s.index('<!-- settings:start'); a = s.index(chr(10), a) + 1; b = s.index('<!-- settings:end -->'); p.write_text(s[:a] + t() + s[b:])"
