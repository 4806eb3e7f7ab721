"""The pytest plugin (``celery_rediskit.contrib.pytest``) as a user meets it: a small pytest
session in a subprocess, opted in with ``pytest_plugins``, with Celery's own plugin loaded
beside it. Its outcomes are read from its JUnit XML report.

The inner session runs on this session's Redis (``REDIS_URL``), as a user's CI would."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

import celery_rediskit.integration.pytest_plugin as kit  # what contrib.pytest re-exports

CONFTEST = '''
pytest_plugins = ["celery.contrib.pytest", "celery_rediskit.contrib.pytest"]

import pytest


@pytest.fixture
def celery_config(rediskit_celery_config):
    return rediskit_celery_config  # Celery's celery_app is built on the kit's settings
'''

TESTS = '''
import threading
import time

import pytest
import redis

from celery_rediskit import RedisMutexStorage, RedisSemaphoreStorage, create_mutex
from celery_rediskit import create_semaphore
from celery_rediskit.integration import RedisKit

seen = []


def storages(config):
    client = redis.Redis.from_url(config["rediskit_url"])
    prefix = config["rediskit_prefix"]
    return RedisMutexStorage(client, prefix), RedisSemaphoreStorage(client, prefix)


def test_leaves_a_lock_and_a_permit_held(rediskit_celery_config, rediskit_no_leaks):
    locks, sems = storages(rediskit_celery_config)
    create_mutex(timeout=1, storage=locks).acquire("report")
    create_semaphore(permits=2, timeout=1, storage=sems).acquire("db")


def test_releases_what_it_takes(rediskit_celery_config, rediskit_no_leaks):
    locks, sems = storages(rediskit_celery_config)
    with create_mutex(timeout=1, storage=locks).lock("report"):
        with create_semaphore(permits=2, timeout=1, storage=sems).permit("db"):
            pass


@pytest.mark.parametrize("i", range(3))
def test_config_of_one_test(i, rediskit_celery_config, celery_app):
    config = rediskit_celery_config
    assert celery_app.conf.task_default_queue == config["task_default_queue"]
    assert RedisKit.of(celery_app).settings.prefix == config["rediskit_prefix"]
    seen.append((config["rediskit_prefix"], config["task_default_queue"]))


def test_prefixes_and_queues_differ_between_tests():
    assert len(seen) == 3
    assert len({p for p, _ in seen}) == 3 and len({q for _, q in seen}) == 3


@pytest.fixture
def tasks(rediskit_app):
    gate, started = threading.Event(), threading.Event()

    @rediskit_app.task(shared=False, singleton=True, on_locked="skip")
    def export(account):
        started.set()
        assert gate.wait(20)
        return f"exported {account}"

    return export, gate, started


def test_worker_runs_a_singleton_task(tasks, rediskit_worker, rediskit_no_leaks):
    export, gate, started = tasks
    first = export.delay(7)
    assert started.wait(20)
    assert export.delay(7).get(timeout=20) is None  # skipped: the first one holds the lock
    gate.set()
    assert first.get(timeout=20) == "exported 7"
    assert export.delay(7).get(timeout=20) == "exported 7"  # the lock was freed


@pytest.fixture
def slow(rediskit_app):
    started = threading.Event()

    @rediskit_app.task(shared=False, singleton=True)
    def slow():
        started.set()
        time.sleep(0.3)  # the work still running when the test returns
        return "done"

    return slow, started


def test_leak_check_waits_for_the_worker_to_stop(slow, rediskit_worker, rediskit_no_leaks):
    task, started = slow
    task.delay()
    assert started.wait(20)  # returns while the task holds its lock


def test_celery_s_fixtures_stay_celery_s(celery_app, celery_config, rediskit_app,
                                         rediskit_celery_config):
    assert celery_config is rediskit_celery_config  # the conftest's override
    assert celery_app is not rediskit_app and type(celery_app).__module__ == "celery.app.base"
    assert celery_app.conf.broker_url == rediskit_app.conf.broker_url
'''


@dataclass
class Inner:
    """The inner session: each test's outcome (``passed``, ``failed``, ``error``, ...;
    ``error`` wins over ``passed`` when a fixture fails at teardown) and its output."""

    outcomes: dict[str, str]
    messages: dict[str, str]
    output: str


@pytest.fixture(scope="module")
def inner(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Inner:
    folder = tmp_path_factory.mktemp("plugin")
    (folder / "conftest.py").write_text(CONFTEST)
    (folder / "test_kit.py").write_text(TESTS)
    report = folder / "report.xml"
    env = dict(os.environ, REDIS_URL=redis_url)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:celery",
         "-q", "-ra", f"--junitxml={report}", "test_kit.py"],
        cwd=folder, env=env, capture_output=True, text=True, timeout=120,
    )
    return _read(report, run.stdout + run.stderr)


def _read(report: Path, output: str) -> Inner:
    assert report.exists(), output
    outcomes: dict[str, str] = {}
    messages: dict[str, str] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = case.get("name", "")
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = "failed" if child.tag == "failure" else child.tag
                messages[name] = (child.get("message") or "") + (child.text or "")
        outcomes[name] = outcome
    return Inner(outcomes, messages, output)


def test_no_leaks_fails_a_test_that_leaves_a_lock_and_a_permit_held(inner: Inner) -> None:
    name = "test_leaves_a_lock_and_a_permit_held"
    assert inner.outcomes[name] == "error", inner.output
    message = inner.messages[name]
    assert "rediskit_no_leaks: still held under prefix" in message, message
    assert "lock 'report'" in message and "semaphore 'db'" in message, message


def test_no_leaks_passes_a_test_that_releases_what_it_takes(inner: Inner) -> None:
    assert inner.outcomes["test_releases_what_it_takes"] == "passed", inner.output


def test_each_test_gets_its_own_prefix_and_queue(inner: Inner) -> None:
    for i in range(3):
        assert inner.outcomes[f"test_config_of_one_test[{i}]"] == "passed", inner.output
    assert inner.outcomes["test_prefixes_and_queues_differ_between_tests"] == "passed", \
        inner.output


def test_the_worker_runs_a_singleton_task(inner: Inner) -> None:
    assert inner.outcomes["test_worker_runs_a_singleton_task"] == "passed", inner.output


def test_the_leak_check_runs_after_the_worker_stopped(inner: Inner) -> None:
    """A task still running when the test returns ends while the worker stops; only then
    is the prefix checked, so its lock, released by then, is no leak."""
    name = "test_leak_check_waits_for_the_worker_to_stop"
    assert inner.outcomes[name] == "passed", inner.output


def test_the_fixtures_sit_beside_celery_s_own(inner: Inner) -> None:
    assert inner.outcomes["test_celery_s_fixtures_stay_celery_s"] == "passed", inner.output
    assert set(inner.outcomes) == {
        "test_leaves_a_lock_and_a_permit_held", "test_releases_what_it_takes",
        "test_config_of_one_test[0]", "test_config_of_one_test[1]",
        "test_config_of_one_test[2]", "test_prefixes_and_queues_differ_between_tests",
        "test_worker_runs_a_singleton_task", "test_celery_s_fixtures_stay_celery_s",
        "test_leak_check_waits_for_the_worker_to_stop",
    }, inner.output


def test_every_fixture_of_the_plugin_is_named_rediskit() -> None:
    """No name of Celery's plugin (celery_app, celery_worker, ...) or pytest-celery's
    (celery_setup, celery_worker, ...) can be shadowed: ours all start with ``rediskit_``."""
    source = Path(kit.__file__).read_text()
    fixtures = [
        node.name for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef) and any(
            "fixture" in ast.unparse(d) for d in node.decorator_list)
    ]
    assert fixtures and all(name.startswith("rediskit_") for name in fixtures), fixtures
    assert set(fixtures) == {
        "rediskit_server", "rediskit_url", "rediskit_celery_config", "rediskit_app",
        "rediskit_worker_parameters", "rediskit_worker", "rediskit_no_leaks",
    }
