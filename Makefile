# recsvc -- everything runs from a local virtualenv that `make install` builds from pinned versions.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RECSVC := $(BIN)/recsvc
SAMPLE := var/sample
PORT   ?= 8000

.PHONY: install install-service install-train install-spark locks run test test-spark test-cluster test-browser lint bench faults loadtest clean

# Dependencies by role, each pinned with hashes in its own lock (requirements/*.lock, generated from
# pyproject.toml by `make locks`): the service installs no training or test tools.
#   service: recsvc serve, publish, events, redis    train: + implicit (train, evaluate, retrain, export)
#   spark: train + pyspark, pandas (train --engine spark; needs Java 17)
#   dev: + spark, tests, lint, benchmarks, fault/fuzz/load tools (what `make install`, `make test` and CI use)
PIP_LOCK := $(BIN)/python -m pip install -q --require-hashes --no-deps -r

install: $(STAMP)

$(STAMP): requirements/dev.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q pip==26.3
	$(PIP_LOCK) requirements/dev.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

# A production host: only the service (or the service and the offline jobs), into VENV.
install-service install-train install-spark:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q pip==26.3
	$(PIP_LOCK) requirements/$(subst install-,,$@).lock
	$(BIN)/python -m pip install -q --no-deps .

# Regenerate the four locks after a change of pyproject.toml (pip-tools, hashes of every file).
LOCK_FLAGS := -q --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links
locks: install
	$(BIN)/pip-compile $(LOCK_FLAGS) -o requirements/service.lock pyproject.toml
	$(BIN)/pip-compile $(LOCK_FLAGS) --extra train -o requirements/train.lock pyproject.toml
	$(BIN)/pip-compile $(LOCK_FLAGS) --extra train --extra spark -o requirements/spark.lock pyproject.toml
	$(BIN)/pip-compile $(LOCK_FLAGS) --extra train --extra spark --extra dev -o requirements/dev.lock pyproject.toml

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

# The console in headless Chromium (Debian's chromium + chromium-driver; screenshots under var/).
# Part of `make test`.
test-browser: install
	$(BIN)/python -m pytest -q -m browser

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
