# recsvc -- everything runs from a local virtualenv that `make install` builds from pinned versions.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RECSVC := $(BIN)/recsvc
SAMPLE := var/sample
PORT   ?= 8000

.PHONY: install run test test-spark test-cluster lint bench faults loadtest clean

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

# The main job: sample shop -> train -> publish -> serve on http://127.0.0.1:$(PORT).
# Uses REDIS_URL when set, else an embedded real Redis under var/redis.
run: install
	$(RECSVC) sample-data --out $(SAMPLE)
	$(RECSVC) train --events $(SAMPLE)/events.csv --catalog $(SAMPLE)/catalog.csv
	$(RECSVC) publish latest
	$(RECSVC) serve --port $(PORT) --examples

test: install
	$(BIN)/python -m pytest -q

# The Spark engine's tests alone (Spark local[1]; needs Java 17) and the Redis Cluster variants
# alone (a 3-master cluster started by the tests). Both are part of `make test`.
test-spark: install
	$(BIN)/python -m pytest -q -m spark

test-cluster: install
	$(BIN)/python -m pytest -q -m cluster

# Style, the one-way import rule (import-linter contracts in pyproject.toml) and types (mypy).
lint: install
	$(BIN)/ruff check recsvc training tests bench
	$(BIN)/ruff format --check recsvc training tests bench
	$(BIN)/lint-imports
	$(BIN)/mypy

bench: install
	$(BIN)/python bench/run_all.py

# External fault suite, long run (the short run is tests/system, part of `make test`).
# Prints one table and writes bench/results/faults.{md,json}. STRICT=1: exit 1 when a target is missed.
faults: install
	$(BIN)/python bench/faults.py $(if $(STRICT),--strict) --out bench/results

# Pre-promotion stress test: step the rate up until p99 > 50 ms or an error; capacity, table, plot in
# bench/results/loadtest/. Against a running service: LOADTEST_ARGS='--host URL --data shop.json --api-key KEY'.
loadtest: install
	$(BIN)/python bench/loadtest/run.py $(LOADTEST_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache
