# Two commands for a fresh machine: `make demo` (the main job, no servers) and `make test`
# (the whole suite, starting the real Kafka, Redis and ClickHouse it needs).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test lint services-up services-down bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: install
	$(BIN)/fission demo --out out/demo

lint: install
	$(BIN)/ruff check .

# Starts the servers (Kafka, Redis, ClickHouse, Prometheus, Alertmanager) that are not running,
# runs ruff and pytest, then stops only the ones it started.
# pytest's exit code 5 (no tests collected) is a failure, not a pass.
test: install
	@stopped=$$(scripts/services status 2>/dev/null | awk '$$2 == "stopped" {print $$1}'); \
	exports=$$(scripts/services up) || exit 1; eval "$$exports"; \
	rc=0; $(BIN)/ruff check . && $(BIN)/python -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ -n "$$stopped" ]; then scripts/services down $$stopped; fi; \
	if [ $$rc = 5 ]; then echo "pytest collected no tests: failing"; rc=1; fi; \
	exit $$rc

services-up:
	@scripts/services up

services-down:
	@scripts/services down

bench: install
	$(BIN)/python -m bench.run

clean:
	rm -rf out .pytest_cache .ruff_cache .hypothesis
