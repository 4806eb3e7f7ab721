"""Smoke test: the kit beside pytest-celery's Docker-based ``celery_setup``.

A pytest session in a subprocess (where pytest-celery loads as it does for users: its
entry point ``celery``, which this suite's ``-p no:celery`` blocks) starts a Redis broker and
backend and pytest-celery's worker in Docker; ``rediskit_url`` is overridden to that
broker's Redis, and an in-process ``rediskit_worker`` runs a singleton task whose lock is
read from the container's Redis. Runs where a Docker daemon answers; skipped elsewhere with
the reason (``-ra`` prints it).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = '''
pytest_plugins = ["celery_rediskit.contrib.pytest"]  # pytest-celery loads by its entry point

import pytest
from pytest_celery import CeleryBackendCluster, CeleryBrokerCluster


@pytest.fixture
def celery_broker_cluster(celery_redis_broker):  # Redis only (not RabbitMQ as well)
    cluster = CeleryBrokerCluster(celery_redis_broker)
    yield cluster
    cluster.teardown()


@pytest.fixture
def celery_backend_cluster(celery_redis_backend):
    cluster = CeleryBackendCluster(celery_redis_backend)
    yield cluster
    cluster.teardown()


@pytest.fixture
def rediskit_url(celery_setup):
    return celery_setup.broker.config()["host_url"]  # the broker container, seen from here
'''

TESTS = '''
import threading

import redis
import pytest

from celery_rediskit.report import read_resources


@pytest.fixture
def export(rediskit_app):
    started, gate = threading.Event(), threading.Event()

    @rediskit_app.task(shared=False, singleton=True, on_locked="skip")
    def export(n):
        started.set()
        assert gate.wait(60)
        return n

    return export, started, gate


def test_rediskit_on_the_redis_of_celery_setup(celery_setup, export, rediskit_url,
                                               rediskit_celery_config, rediskit_worker,
                                               rediskit_no_leaks):
    assert celery_setup.ready(ping=True)  # pytest-celery's Docker worker answers
    task, started, gate = export
    first = task.delay(1)
    assert started.wait(60)
    assert task.delay(1).get(timeout=60) is None  # skipped: the lock is held
    client = redis.Redis.from_url(rediskit_url)
    held = read_resources(client, rediskit_celery_config["rediskit_prefix"])
    assert [r.kind.resource for r in held] == ["lock"]  # in the container's Redis
    gate.set()
    assert first.get(timeout=60) == 1
    client.close()
'''


def why_not() -> str | None:
    """Why the smoke test cannot run here, or None when it can."""
    if importlib.util.find_spec("pytest_celery") is None:
        return "pytest-celery is not installed (it comes with the [test] extra)"
    import docker  # a dependency of pytest-celery

    try:
        client = docker.from_env(timeout=5)
        client.ping()
        client.close()
    except Exception as exc:  # docker.errors.DockerException and friends: no daemon here
        return f"no Docker daemon answers: {type(exc).__name__}: {str(exc)[:160]}"
    return None


@pytest.mark.timeout(900)  # seconds: the first run builds pytest-celery's worker image
def test_kit_with_pytest_celery_celery_setup(tmp_path: Path) -> None:
    reason = why_not()
    if reason:
        pytest.skip(f"pytest-celery smoke test: {reason}")
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_smoke.py").write_text(TESTS)
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-ra",
         "test_smoke.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed" in run.stdout, run.stdout
