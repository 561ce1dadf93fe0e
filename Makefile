# make run / make test: each creates .venv if missing, installs the project into it, and does its job.
VENV      ?= .venv
PYTHON    ?= python3
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install run test test-fast bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test,postgres]'
	touch $@

install: $(STAMP)

## the main job: every model, on the embedded default
run: $(STAMP)
	$(VENV)/bin/mnistjobs submit --models all --wait

## the whole suite, slow (Ray, MLflow, real data, headless Chromium, PostgreSQL) tests included
test: $(STAMP)
	@bash scripts/ensure-chromium.sh
	@bash scripts/ensure-postgresql.sh
	$(PY) -m pytest $(PYTEST_ARGS)

## only the fast tests
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/speed.py

clean:
	rm -rf $(VENV) .pytest_cache
