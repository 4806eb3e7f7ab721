"""Every storage and provider works on a ``decode_responses=True`` client.

Such a client turns every string reply into ``str``. Cache entries are bytes (they need not be
text at all), so the cache reads them undecoded; everything else the library reads is text
(owner ids, grant messages, pub/sub messages) and is accepted in either form.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import redis

from celery_rediskit import (
    LeaseKind,
    RedisMutexStorage,
    RedisSemaphoreStorage,
    create_mutex,
    create_semaphore,
)
from celery_rediskit.cache import MISSING, RedisCacheProvider, cached
from celery_rediskit.renewal import renewer
from celery_rediskit.report import read_resources


@pytest.fixture
def text_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client that decodes every reply to ``str``."""
    c = redis.Redis.from_url(redis_url, decode_responses=True)
    yield c
    c.close()


def wait_until_queued(client: redis.Redis, queue: str) -> None:
    end = time.monotonic() + 10
    while not client.llen(queue):  # no event tells when a waiter joined the queue in Redis
        assert time.monotonic() < end, "the waiter never queued"
        time.sleep(0.005)


# -- cache -----------------------------------------------------------------------------------

def test_cache_hits_on_a_decoding_client(text_client: redis.Redis, prefix: str) -> None:
    provider = RedisCacheProvider(text_client, prefix=prefix)
    provider.set("k", {"a": [1, 2], "s": "é"}, ttl=60)
    assert provider.get("k") == {"a": [1, 2], "s": "é"}
    claim = provider.claim("k")
    assert (claim.state, claim.value) == ("hit", {"a": [1, 2], "s": "é"})
    assert provider.get("absent", MISSING) is MISSING


def test_cache_binary_entries_on_a_decoding_client(text_client: redis.Redis,
                                                   prefix: str) -> None:
    provider = RedisCacheProvider(text_client, prefix=prefix, serializer="pickle",
                                  allow_unsafe=True)
    value = {"blob": bytes(range(256))}  # a pickle of this is not valid UTF-8
    provider.set("bin", value, ttl=60)
    assert provider.get("bin") == value
    assert provider.claim("bin").value == value


def test_cache_single_flight_on_a_decoding_client(text_client: redis.Redis,
                                                  prefix: str) -> None:
    provider = RedisCacheProvider(text_client, prefix=prefix)
    claim = provider.claim("k")
    assert claim.state == "owner"
    found = []
    waiter = threading.Thread(target=lambda: found.append(provider.claim("k", wait=30)))
    waiter.start()
    wait_until_queued(text_client, provider.keys.lock(provider.keys.cache_lock_name("k")).queue)
    provider.fill(claim, [1, "two"], ttl=60)  # hands the fill lock to the waiter, in-process
    waiter.join(10)
    [seen] = found
    assert (seen.state, seen.value) == ("hit", [1, "two"])
    assert provider.clear() >= 1


def test_cached_functions_on_a_decoding_client(text_client: redis.Redis, prefix: str) -> None:
    provider = RedisCacheProvider(text_client, prefix=prefix)
    calls = []

    @cached(ttl=60, provider=provider)
    def double(x: int) -> int:
        calls.append(x)
        return 2 * x

    assert double(21) == 42
    assert double(21) == 42
    assert calls == [21]


# -- mutex and semaphore ---------------------------------------------------------------------

def test_mutex_on_a_decoding_client(text_client: redis.Redis, prefix: str) -> None:
    storage = RedisMutexStorage(text_client, prefix=prefix)
    mutex = create_mutex(storage=storage, lease=30, timeout=30)
    held = mutex.acquire("res")
    info = storage.get_lock_info("res")
    assert (info.holder, info.fencing_token) == (held.owner, held.fencing_token)
    assert held.extend(5) and 30 < held.ttl() <= 35
    renewer().renew_now([held])
    assert not held.lost
    got = []
    waiter = threading.Thread(target=lambda: got.append(mutex.acquire("res")))
    waiter.start()
    wait_until_queued(text_client, storage.keys.lock("res").queue)
    assert held.release() is True  # handed to the waiter of this process
    waiter.join(10)
    [second] = got
    assert second.fencing_token > held.fencing_token
    assert storage.force_release("res") is True
    second.release()


def test_semaphore_on_a_decoding_client(text_client: redis.Redis, prefix: str) -> None:
    storage = RedisSemaphoreStorage(text_client, prefix=prefix)
    sem = create_semaphore(permits=1, storage=storage, lease=30, timeout=30)
    held = sem.acquire("db")
    assert storage.get_semaphore_info("db").holders.keys() == {held.owner}
    renewer().renew_now([held])
    assert not held.lost
    got = []
    waiter = threading.Thread(target=lambda: got.append(sem.acquire("db")))
    waiter.start()
    wait_until_queued(text_client, storage.keys.semaphore("db").queue)
    assert held.release() is True  # handed to the waiter of this process
    waiter.join(10)
    [second] = got
    assert storage.get_semaphore_info("db").holders.keys() == {second.owner}
    second.release()


def test_a_grant_published_by_another_process_wakes_a_decoding_client(
    text_client: redis.Redis, spawn_holder: type, redis_url: str, prefix: str
) -> None:
    """The wake-up hub's pub/sub connection decodes too: its messages are str."""
    holder = spawn_holder("mutex", redis_url, prefix, "res", "30", "1")
    storage = RedisMutexStorage(text_client, prefix=prefix)
    mutex = create_mutex(timeout=20, storage=storage)
    woken: dict[str, float] = {}

    def waiter() -> None:
        with mutex.lock("res"):
            woken["at"] = time.monotonic()

    thread = threading.Thread(target=waiter)
    thread.start()
    wait_until_queued(text_client, storage.keys.lock("res").queue)
    released_at = time.monotonic()
    assert holder.command("release").startswith("RELEASED True")
    thread.join(20)
    assert woken["at"] - released_at < 5.0, "the published grant was not read (30 s lease)"


# -- report ----------------------------------------------------------------------------------

def test_report_on_a_decoding_client(text_client: redis.Redis, prefix: str) -> None:
    mutexes = RedisMutexStorage(text_client, prefix=prefix)
    sems = RedisSemaphoreStorage(text_client, prefix=prefix)
    lock = create_mutex(storage=mutexes).acquire("export", auto_renew=False)
    permit = create_semaphore(permits=2, storage=sems).acquire("db", auto_renew=False)
    found = {(r.kind, r.key): r for r in read_resources(text_client, prefix)}
    assert found[(LeaseKind.MUTEX, "export")].holders[0].owner == lock.owner
    assert found[(LeaseKind.MUTEX, "export")].fencing_token == lock.fencing_token
    assert found[(LeaseKind.SEMAPHORE, "db")].holders[0].owner == permit.owner
    assert found[(LeaseKind.SEMAPHORE, "db")].total == 2
    lock.release()
    permit.release()
