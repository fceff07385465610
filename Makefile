# recsvc -- everything runs from a local virtualenv that `make install` builds from pinned versions.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RECSVC := $(BIN)/recsvc
SAMPLE := var/sample
PORT   ?= 8000

.PHONY: install run test lint bench clean

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

lint: install
	$(BIN)/ruff check recsvc training tests bench
	$(BIN)/ruff format --check recsvc training tests bench

bench: install
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) var .pytest_cache
