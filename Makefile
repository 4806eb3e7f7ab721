# Every target builds .venv on first use, so a fresh machine needs only Python 3.11+ and make.
PYTHON ?= python3
CHAOS_ARGS ?= --seconds 180
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test chaos demo lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench,lint,embedded]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# The fault-injection run (tests/faults/chaos.py): e.g. make chaos CHAOS_ARGS="--seconds 600
# --seed 7 --faults drop_pubsub,stall". Exit status 1 when an invariant was violated.
chaos: $(STAMP)
	$(PY) -m tests.faults.chaos $(CHAOS_ARGS)

demo: $(STAMP)
	$(PY) examples/demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff check celery_rediskit tests examples bench
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
