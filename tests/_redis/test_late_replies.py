"""A grant whose reply reaches the caller late (a stalled connection, or the caller's process
paused right after Redis granted) is renewed before acquire returns it: the lease the caller
gets has its full length from the moment acquire returns, or acquire waits on if the grant
ended meanwhile."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
import redis

from celery_rediskit import (
    RedisMutexStorage,
    RedisSemaphoreStorage,
    create_mutex,
    create_semaphore,
)
from tests.late_replies import LateReplies, late_replies_client

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


@pytest.fixture
def always_late_client(redis_server: Any, redis_url: str) -> Iterator[redis.Redis]:
    yield late_replies_client(redis_url)
    LateReplies.late = 0.0


def _warmed(kind: str, client: redis.Redis, prefix: str) -> Any:
    """A granter whose scripts are loaded and connection made (by one prompt acquire)."""
    granter = _granter(kind, client, prefix)
    granter.acquire("warm", auto_renew=False).release()
    return granter


def _client_left(held: Any) -> float:
    """Seconds of lease the holder counts on: its deadline less now."""
    from celery_rediskit.renewal import lease_deadline

    return lease_deadline(held.last_renewed, held.lease_seconds) - time.monotonic()


@pytest.mark.parametrize("kind", ["mutex", "semaphore"])
def test_a_holder_never_counts_on_more_lease_than_the_server_gives_when_replies_stay_late(
    kind: str, always_late_client: redis.Redis, client: redis.Redis, prefix: str
) -> None:
    granter = _warmed(kind, always_late_client, prefix)
    LateReplies.late = 0.2  # every reply: well past "fresh", within half the lease
    held = granter.acquire("res", auto_renew=False)
    LateReplies.late = 0.0
    try:
        server_left = _granter(kind, client, prefix).storage.holder_ttl("res", held.owner)
        assert _client_left(held) <= server_left + 0.01, (
            f"the holder counts on {_client_left(held):.3f} s, the server keeps the lease "
            f"{server_left:.3f} s")
    finally:
        held.release()


@pytest.mark.parametrize("kind", ["mutex", "semaphore"])
def test_a_grant_whose_replies_come_later_than_half_its_lease_is_not_returned(
    kind: str, always_late_client: redis.Redis, client: redis.Redis, prefix: str
) -> None:
    from celery_rediskit import LockTimeout

    granter = _warmed(kind, always_late_client, prefix)
    LateReplies.late = LEASE * 0.6
    with pytest.raises(LockTimeout):
        granter.acquire("res", timeout=2, auto_renew=False)
    LateReplies.late = 0.0
    # Nothing stays held for a caller that gave up.
    other = _granter(kind, client, prefix).acquire("res", timeout=0.5, auto_renew=False)
    other.release()


def test_a_try_acquire_grant_counts_from_its_request(
    always_late_client: redis.Redis, client: redis.Redis, prefix: str
) -> None:
    from celery_rediskit.lease import Grant

    storage = RedisMutexStorage(always_late_client, prefix)
    storage.try_acquire("warm", "o:0", LEASE)
    LateReplies.late = 0.3
    sent = time.monotonic()
    token = storage.try_acquire("res", "o:1", LEASE)
    LateReplies.late = 0.0
    assert isinstance(token, Grant) and token >= 1
    assert sent <= token.since <= sent + 0.05, "since is when the request was sent"
    storage.release("res", "o:1")
