"""A grant whose reply reaches the caller late (a stalled connection, or the caller's process
paused right after Redis granted) is renewed before acquire returns it: the lease the caller
gets has its full length from the moment acquire returns, or acquire waits on if the grant
ended meanwhile."""

from __future__ import annotations

import threading
import time
from typing import Any, ClassVar

import pytest
import redis

from celery_rediskit import (
    RedisMutexStorage,
    RedisSemaphoreStorage,
    create_mutex,
    create_semaphore,
)

LEASE = 1.0
LATE = 0.6  # seconds the first acquire reply is held back: most of the lease


class _LateConnection(redis.Connection):
    """A real connection whose next EVALSHA reply is handed to the caller ``late`` seconds
    after it arrived, as if the caller's process had been paused right then."""

    late: ClassVar[float] = 0.0
    lock: ClassVar[threading.Lock] = threading.Lock()

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        reply = super().read_response(*args, **kwargs)
        with self.lock:
            pause, type(self).late = type(self).late, 0.0
        if pause and isinstance(reply, int):
            time.sleep(pause)
        return reply


@pytest.fixture
def late_client(redis_server: Any, redis_url: str) -> redis.Redis:
    pool = redis.ConnectionPool.from_url(redis_url, connection_class=_LateConnection)
    return redis.Redis(connection_pool=pool)


def _granter(kind: str, client: redis.Redis, prefix: str) -> Any:
    if kind == "mutex":
        return create_mutex(lease=LEASE, timeout=5, storage=RedisMutexStorage(client, prefix))
    return create_semaphore(permits=1, lease=LEASE, timeout=5,
                            storage=RedisSemaphoreStorage(client, prefix))


@pytest.mark.parametrize("kind", ["mutex", "semaphore"])
def test_a_grant_that_reaches_the_caller_late_is_renewed_before_acquire_returns(
    kind: str, late_client: redis.Redis, prefix: str
) -> None:
    granter = _granter(kind, late_client, prefix)
    granter.acquire("warm", auto_renew=False).release()  # scripts loaded, connection made
    _LateConnection.late = LATE
    held = granter.acquire("res", auto_renew=False)
    try:
        left = held.ttl()
        assert left > LEASE - 0.25, (
            f"acquire returned a grant with {left:.2f} s of its {LEASE} s lease left")
    finally:
        held.release()
