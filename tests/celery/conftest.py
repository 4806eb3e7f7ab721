"""Fixtures for the Celery layer: apps on the private Redis and in-process workers.

Every app gets its own queue and key prefix, so tests never consume each other's messages.
Tasks are defined with ``shared=False``: Celery's default registers them process-wide by
name, and two tests defining ``job`` would run each other's bodies.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import TestWorkController, start_worker
from kombu.asynchronous import set_event_loop

from celery_rediskit._redis.keys import KeySpace
from celery_rediskit.integration import RedisKit


def make_app(redis_url: str, prefix: str, **settings: Any) -> Celery:
    app = Celery(f"app-{prefix}", broker=redis_url, backend=redis_url, set_as_current=False)
    app.conf.update(
        task_default_queue=f"q-{prefix}",
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        result_expires=600,
        task_acks_late=False,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": 600},
    )
    settings.setdefault("retry_delay", 0.1)
    RedisKit(app, prefix=prefix, **settings)
    return app


def waiting(client: Any, prefix: str, name: str, *, lock: bool) -> int:
    """How many callers queue in Redis for lock (``lock=True``) or semaphore ``name``: a
    blocked ``acquire`` is visible there, so tests wait for it instead of sleeping."""
    keys = KeySpace(prefix)
    queue = keys.lock(name).queue if lock else keys.semaphore(name).queue
    return int(client.llen(queue))


@pytest.fixture
def app(redis_url: str, prefix: str) -> Iterator[Celery]:
    a = make_app(redis_url, prefix)
    yield a
    a.close()


WorkerFactory = Callable[..., AbstractContextManager[Any]]


def in_process_worker(a: Celery, pool: str = "threads",
                      concurrency: int = 4) -> AbstractContextManager[Any]:
    """``with in_process_worker(app):`` a worker in this process (define the tasks first).
    Modules that share one worker between their tests call it from a module fixture."""
    a.finalize()
    # Celery before 5.7 hands a second in-process worker the first one's event loop (a
    # process-wide global) whose timer nobody feeds: its countdown and ETA tasks never
    # run. A real worker is alone in its process; give each test worker a fresh loop.
    set_event_loop(None)
    # shutdown_timeout only bounds the join: after a broker reconnect, the worker of a
    # Celery before 5.7 can sit up to 10 s (its timer's max interval) in its event loop's
    # poll before it sees the stop.
    return start_worker(
        a, pool=pool, concurrency=concurrency, perform_ping_check=False,
        loglevel=logging.WARNING, shutdown_timeout=30.0,
        WorkController=_named_worker(f"w-{uuid.uuid4().hex[:6]}@test"),
    )


@pytest.fixture
def worker() -> WorkerFactory:
    """``with worker(app, pool="threads", concurrency=4):`` an in-process worker."""
    return in_process_worker


def _named_worker(hostname: str) -> type[TestWorkController]:
    """The test worker class with its node name set: ``start_worker(hostname=...)`` exists only
    from Celery 5.5 (before, every in-process worker is ``gen<pid>@<host>``)."""

    class Named(TestWorkController):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["hostname"] = hostname
            super().__init__(*args, **kwargs)

    return Named
