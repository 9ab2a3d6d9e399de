# Sluice developer commands. Everything runs from the project's own virtualenv.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CHAOS_ROUNDS ?= 5

.PHONY: setup demo test check lint typecheck bench bench-formats bench-firehose chaos reliability clean schemas browser compose compose-check

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,parquet,embedded]'
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

# Debian's docker-compose (1.29) checks docker-compose.yml without a Docker engine (`make lint`).
# Installed when missing and we are root with apt-get; otherwise lint uses Compose v2
# (`docker compose`) when there is one, or says that it skips the check.
compose:
	@command -v docker-compose >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing docker-compose (apt-get)"; \
			{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null; } \
				|| echo "could not install docker-compose: make lint skips the docker-compose check unless docker compose is there"; \
		else \
			echo "docker-compose not installed and cannot install it here (needs root and apt-get): make lint checks docker-compose.yml with docker compose if there is one, else skips that step"; \
		fi; \
	}

setup: $(STAMP) browser compose

demo: $(STAMP)
	$(BIN)/python -m sluice.demo

test: $(STAMP) browser compose
	$(BIN)/pytest -q --durations=10

lint: $(STAMP) compose-check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# docker-compose.yml parses and interpolates, with every tool at hand (Compose v1 and v2). The
# file requires SLUICE_API_TOKEN; a placeholder stands in for it when it is unset.
COMPOSE_ENV := SLUICE_API_TOKEN=$${SLUICE_API_TOKEN:-lint-placeholder}
compose-check: compose
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
