"""Wake-ups: a release wakes a queued waiter at once, across processes, and a lost wake-up
message never loses the grant."""

from __future__ import annotations

import gc
import threading
import time

import pytest
import redis

from celery_rediskit import RedisMutexStorage, create_mutex
from celery_rediskit._redis import wakeup


@pytest.fixture
def redis_storage(client: redis.Redis, prefix: str) -> RedisMutexStorage:
    return RedisMutexStorage(client, prefix=prefix)


pytestmark = pytest.mark.usefixtures("no_stray_leases")


def test_release_wakes_a_waiter_at_once_not_at_lease_end(redis_storage: RedisMutexStorage,
                                                         spawn_holder: type, redis_url: str,
                                                         prefix: str) -> None:
    holder = spawn_holder("mutex", redis_url, prefix, "res", "30", "1")
    mutex = create_mutex(timeout=10, storage=redis_storage)
    got: dict[str, float] = {}

    def waiter() -> None:
        with mutex.lock("res"):
            got["at"] = time.monotonic()

    thread = threading.Thread(target=waiter)
    thread.start()
    while not redis_storage.client.llen(redis_storage.keys.lock("res").queue):
        time.sleep(0.005)  # wait until the waiter is queued in Redis
    released_at = time.monotonic()
    assert holder.command("release").startswith("RELEASED True")
    thread.join(5)
    assert got["at"] - released_at < 0.5, "the waiter was not woken by the release"


def test_lost_wakeup_costs_at_most_one_bounded_wait(
    redis_storage: RedisMutexStorage, spawn_holder: type, redis_url: str, prefix: str
) -> None:
    """Drop every pub/sub connection while a waiter waits: it still gets the lock."""
    holder = spawn_holder("mutex", redis_url, prefix, "res", "2.0", "1")
    mutex = create_mutex(timeout=15, storage=redis_storage)
    got = threading.Event()

    def waiter() -> None:
        with mutex.lock("res"):
            got.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    while not redis_storage.client.llen(redis_storage.keys.lock("res").queue):
        time.sleep(0.005)
    redis_storage.client.client_kill_filter(_type="pubsub")
    holder.command("release")
    assert got.wait(2.0 + 2.5)
    thread.join()


def test_a_discarded_client_leaves_no_wakeup_connection_or_pipe(redis_url: str,
                                                                 prefix: str) -> None:
    hubs: list[wakeup.WakeupHub] = []

    def contend_once() -> None:
        c = redis.Redis.from_url(redis_url)
        mutex = create_mutex(timeout=5, storage=RedisMutexStorage(c, prefix))
        held = mutex.acquire("res")
        waiter = threading.Thread(target=lambda: mutex.acquire("res").release())
        waiter.start()
        while not c.llen(f"{prefix}:lock:{{res}}:queue"):
            time.sleep(0.001)  # until the waiter is queued: it opens the pub/sub connection
        held.release()
        waiter.join(5)
        hubs.append(wakeup.hub_for(c))  # the hub holds the client only weakly

    for _ in range(5):
        contend_once()
    gc.collect()
    assert all(hub.closed for hub in hubs), "a hub outlived its client"
    assert not any(hub in (entry[1] for entry in wakeup._state.hubs.values()) for hub in hubs)

