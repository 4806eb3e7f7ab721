"""A release whose reply is lost is sent again: it still reports the truth and hands over.

The fault proxy lets the release reach Redis and run, then loses its reply and resets the
connection. The client sends the release again: through the lean path's fallback to
``execute_command`` on a plain client, or through redis-py's own retry on a
single-connection client. That second send must answer "released" (the first one released),
and when the first send handed the lock or permit to a waiting thread of this process, wake
that thread at once rather than leave it to find out at the end of its bounded wait.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from celery_rediskit import (
    RedisMutexStorage,
    RedisSemaphoreStorage,
    create_mutex,
    create_semaphore,
)
from celery_rediskit._redis import wakeup
from celery_rediskit._redis.scripts import load_script
from celery_rediskit.cache import RedisCacheProvider
from tests.faults.proxy import FaultProxy
from tests.faults.servers import FaultServer

LEASE = 60.0  # a waiter that is not handed over waits this long (its bound): far past the test
CACHE_LEASE = 10.0  # the same for the cache's fill lock, whose waiter cannot be aborted
HANDED_WITHIN = 5.0  # a waiter handed over locally runs at once; generous for a loaded machine

PATHS: dict[str, Callable[[FaultProxy], redis.Redis]] = {
    # call() sends on a pooled connection, then falls back to execute_command on a read error
    # (from_url: redis-py itself does not retry, so that fallback is the only re-send).
    "lean path": lambda proxy: redis.Redis.from_url(proxy.url),
    # call() goes straight to execute_command, whose retry policy (redis-py's default for
    # clients made with Redis(host, port): up to 10 retries) re-sends the same command.
    "redis-py retry": lambda proxy: redis.Redis(
        host="127.0.0.1", port=proxy.port, single_connection_client=True),
}


@pytest.fixture(params=sorted(PATHS))
def proxied(request: pytest.FixtureRequest, fault_proxy: FaultProxy) -> Iterator[redis.Redis]:
    """A client talking to Redis through the fault proxy, by one of the two re-send paths."""
    client = PATHS[request.param](fault_proxy)
    yield client
    client.close()


def sha_of(script: str) -> bytes:
    return load_script(script).sha.encode()


def loaded(client: redis.Redis, *scripts: str) -> None:
    """Load ``scripts`` first: the swallowed send must run the script, not meet NOSCRIPT."""
    for name in scripts:
        client.script_load(load_script(name).source)


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 10.0) -> None:
    """Poll Redis-side state the test cannot be notified of (a waiter joining a queue)."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.005)


class Waiter:
    """A thread of this process waiting in ``acquire(abort)``; ``done`` is set once it returns
    (its result or error in ``result``)."""

    def __init__(self, acquire: Callable[[threading.Event], Any]) -> None:
        self.result: list[Any] = []
        self.done = threading.Event()
        self.abort = threading.Event()

        def run() -> None:
            try:
                self.result.append(acquire(self.abort))
            except Exception as exc:  # reported by the test through result
                self.result.append(exc)
            finally:
                self.done.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()


@pytest.fixture
def start_waiter() -> Iterator[Callable[[Callable[[threading.Event], Any]], Waiter]]:
    """``start_waiter(acquire)`` runs ``acquire(abort)`` in a thread; each is aborted and
    joined at the end of the test, so none outlives it."""
    started: list[Waiter] = []

    def start(acquire: Callable[[threading.Event], Any]) -> Waiter:
        waiter = Waiter(acquire)
        started.append(waiter)
        return waiter

    yield start
    for waiter in started:
        waiter.abort.set()
    for waiter in started:
        waiter.thread.join(LEASE)


def record_grants(slot: wakeup.WaitSlot) -> list[str]:
    """The grants delivered to ``slot``'s waiter from now on, as they are delivered (the waiter
    may consume a grant at once, so its slot's token is no proof by the time release returns).
    Records what ``hand_over_local`` passes to ``wake_local`` for this slot's owner."""
    owner = next(o for o, s in wakeup._state.slots.items() if s is slot)
    seen: list[str] = []
    deliver = wakeup.wake_local

    def recording(message: str | bytes) -> None:
        text = message.decode() if isinstance(message, bytes) else message
        if text.split(" ")[0] == owner:
            seen.append(text)
        deliver(message)

    _patches.append((wakeup, "wake_local", deliver))
    wakeup.wake_local = recording  # type: ignore[assignment]
    return seen


_patches: list[tuple[object, str, object]] = []


@pytest.fixture(autouse=True)
def _undo_patches() -> Iterator[None]:
    yield
    while _patches:
        target, name, original = _patches.pop()
        setattr(target, name, original)


def waiting_slots() -> list[wakeup.WaitSlot]:
    """The wait slots of this process's waiters (each is told its grant through its slot)."""
    return list(wakeup._state.slots.values())


# -- mutex -----------------------------------------------------------------------------------

def test_mutex_release_with_a_lost_reply_reports_released(
    proxied: redis.Redis, fault_proxy: FaultProxy, prefix: str
) -> None:
    storage = RedisMutexStorage(proxied, prefix=prefix)
    loaded(proxied, "mutex_release")
    lease = create_mutex(storage=storage, lease=LEASE).acquire("res", auto_renew=False)
    fault_proxy.swallow_reply(sha_of("mutex_release"))
    assert lease.release() is True, "the re-sent release said 'not released'"
    assert fault_proxy.swallowed == 1, "the first reply was not lost: nothing was re-sent"
    assert not storage.is_locked("res")


def test_mutex_release_with_a_lost_reply_hands_over_to_a_local_waiter(
    proxied: redis.Redis, fault_proxy: FaultProxy, fault_server: FaultServer, prefix: str,
    start_waiter: Callable[..., Waiter],
) -> None:
    storage = RedisMutexStorage(proxied, prefix=prefix)
    loaded(proxied, "mutex_release")
    mutex = create_mutex(storage=storage, lease=LEASE, timeout=LEASE)
    holder = mutex.acquire("res", auto_renew=False)
    waiter = start_waiter(lambda abort: mutex.acquire("res", abort=abort, auto_renew=False))
    direct = fault_server.client()
    wait_until(lambda: direct.llen(storage.keys.lock("res").queue) == 1, "the waiter queues")
    [slot] = waiting_slots()
    grants = record_grants(slot)

    fault_proxy.swallow_reply(sha_of("mutex_release"))
    assert holder.release() is True, "the re-sent release said 'not released'"
    assert fault_proxy.swallowed == 1
    assert grants, "the release did not hand the lock to the local waiter"
    assert waiter.done.wait(HANDED_WITHIN), "the waiter was left to its bounded wait"
    [granted] = waiter.result
    assert not isinstance(granted, Exception), granted
    assert granted.fencing_token > holder.fencing_token
    assert storage.get_lock_info("res").holder == granted.owner
    assert granted.release() is True
    direct.close()


def test_a_second_release_call_still_reports_not_released(
    proxied: redis.Redis, prefix: str
) -> None:
    """Only a re-send of the same call finds the first send's outcome, not a new call."""
    storage = RedisMutexStorage(proxied, prefix=prefix)
    loaded(proxied, "mutex_release")
    lease = create_mutex(storage=storage).acquire("res", auto_renew=False)
    assert storage.release("res", lease.owner) is True
    assert storage.release("res", lease.owner) is False
    sems = RedisSemaphoreStorage(proxied, prefix=prefix)
    permit = create_semaphore(permits=1, storage=sems).acquire("db", auto_renew=False)
    assert sems.release("db", permit.owner) is True
    assert sems.release("db", permit.owner) is False


def test_force_release_with_a_lost_reply_does_not_release_the_next_holder(
    proxied: redis.Redis, fault_proxy: FaultProxy, fault_server: FaultServer, prefix: str,
    start_waiter: Callable[..., Waiter],
) -> None:
    storage = RedisMutexStorage(proxied, prefix=prefix)
    loaded(proxied, "mutex_release")
    mutex = create_mutex(storage=storage, lease=LEASE, timeout=LEASE)
    mutex.acquire("res", auto_renew=False)
    waiter = start_waiter(lambda abort: mutex.acquire("res", abort=abort, auto_renew=False))
    direct = fault_server.client()
    wait_until(lambda: direct.llen(storage.keys.lock("res").queue) == 1, "the waiter queues")

    fault_proxy.swallow_reply(sha_of("mutex_release"))
    assert storage.force_release("res") is True
    assert fault_proxy.swallowed == 1
    assert waiter.done.wait(HANDED_WITHIN), "the waiter was left to its bounded wait"
    [granted] = waiter.result
    assert not isinstance(granted, Exception), granted
    assert storage.get_lock_info("res").holder == granted.owner, (
        "the re-sent force release took the lock from the waiter it had just been handed to"
    )
    granted.release()
    direct.close()


# -- semaphore -------------------------------------------------------------------------------

def test_semaphore_release_with_a_lost_reply_reports_released(
    proxied: redis.Redis, fault_proxy: FaultProxy, prefix: str
) -> None:
    storage = RedisSemaphoreStorage(proxied, prefix=prefix)
    loaded(proxied, "sem_release")
    permit = create_semaphore(permits=2, storage=storage, lease=LEASE).acquire(
        "db", auto_renew=False)
    fault_proxy.swallow_reply(sha_of("sem_release"))
    assert permit.release() is True, "the re-sent release said 'not released'"
    assert fault_proxy.swallowed == 1
    assert storage.get_semaphore_info("db").acquired == 0


def test_semaphore_release_with_a_lost_reply_hands_over_to_a_local_waiter(
    proxied: redis.Redis, fault_proxy: FaultProxy, fault_server: FaultServer, prefix: str,
    start_waiter: Callable[..., Waiter],
) -> None:
    storage = RedisSemaphoreStorage(proxied, prefix=prefix)
    loaded(proxied, "sem_release")
    sem = create_semaphore(permits=1, storage=storage, lease=LEASE, timeout=LEASE)
    holder = sem.acquire("db", auto_renew=False)
    waiter = start_waiter(lambda abort: sem.acquire("db", abort=abort, auto_renew=False))
    direct = fault_server.client()
    wait_until(lambda: direct.llen(storage.keys.semaphore("db").queue) == 1, "the waiter queues")
    [slot] = waiting_slots()
    grants = record_grants(slot)

    fault_proxy.swallow_reply(sha_of("sem_release"))
    assert holder.release() is True, "the re-sent release said 'not released'"
    assert fault_proxy.swallowed == 1
    assert grants, "the release did not hand the permit to the local waiter"
    assert waiter.done.wait(HANDED_WITHIN), "the waiter was left to its bounded wait"
    [granted] = waiter.result
    assert not isinstance(granted, Exception), granted
    assert set(storage.get_semaphore_info("db").holders) == {granted.owner}
    assert granted.release() is True
    direct.close()


# -- the cache's fill lock -------------------------------------------------------------------

def test_cache_fill_with_a_lost_reply_hands_the_fill_lock_to_a_local_waiter(
    proxied: redis.Redis, fault_proxy: FaultProxy, fault_server: FaultServer, prefix: str,
    start_waiter: Callable[..., Waiter],
) -> None:
    provider = RedisCacheProvider(proxied, prefix=prefix)
    loaded(proxied, "cache_unlock")
    claim = provider.claim("k", lease=CACHE_LEASE)
    assert claim.state == "owner"
    # A claim cannot be aborted: its lease is short enough for the waiter to end soon after.
    waiter = start_waiter(lambda _abort: provider.claim("k", lease=CACHE_LEASE, wait=LEASE))
    direct = fault_server.client()
    lock_keys = provider.keys.lock(provider.keys.cache_lock_name("k"))
    wait_until(lambda: direct.llen(lock_keys.queue) == 1, "the waiter queues")

    fault_proxy.swallow_reply(sha_of("cache_unlock"))
    provider.fill(claim, {"answer": 42}, ttl=60)
    assert fault_proxy.swallowed == 1
    assert waiter.done.wait(HANDED_WITHIN), "the waiter was left to its bounded wait"
    [found] = waiter.result
    assert not isinstance(found, Exception), found
    assert (found.state, found.value) == ("hit", {"answer": 42})
    assert not direct.exists(lock_keys.lock), "the waiter passed the fill lock on"
    direct.close()
