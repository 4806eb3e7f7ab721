"""Cancelled ``async`` ``@cached`` calls give the fill lock back (issue 10, item 10).

An async call that finds another caller computing its entry waits for the fill lock in a
worker thread. Cancelling the call (``task.cancel()``, ``asyncio.wait_for``'s timeout) must end
that wait and give back any lock the thread obtains; otherwise the lock stays with an orphaned
lease, renewed for ever, and every later caller waits its full ``wait`` for nothing.
Each test checks, against the real Redis: the next caller computes at once, no lease of the
cancelled call is left with the renewer, and the fill-lock key is gone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import pytest
import redis

from celery_rediskit.cache import (
    AsyncCachedFunction,
    Claim,
    MemoryCacheProvider,
    RedisCacheProvider,
    cached,
)
from celery_rediskit.renewal import renewer

pytestmark = pytest.mark.usefixtures("no_stray_leases")

WAIT = 8.0  # the fill-lock wait of the function under test: a leaked lock costs this much
LEASE = 3.0
QUICK = WAIT / 3  # "at once": far below WAIT, generous for a loaded machine
BOUND = 10.0  # seconds any polled condition may take before the test gives up


def _function(provider: RedisCacheProvider, computed: list[int]) -> AsyncCachedFunction:
    # Named after the test's prefix: leases of other tests' calls never match its key.
    @cached(ttl=60, wait=WAIT, lease=LEASE, provider=provider,
            name=f"cancel-me-{provider.keys.prefix}")
    async def fetch(x: int) -> int:
        computed.append(x)
        return x

    return fetch


def _lock_key(provider: RedisCacheProvider, key: str) -> str:
    return provider.keys.lock(provider.keys.cache_lock_name(key)).lock


def _queue_key(provider: RedisCacheProvider, key: str) -> str:
    return provider.keys.lock(provider.keys.cache_lock_name(key)).queue


def _fill_leases(provider: RedisCacheProvider, key: str) -> list[object]:
    name = provider.keys.cache_lock_name(key)
    return [lease for lease in renewer().held() if lease.key == name]


async def _until(what: Callable[[], bool], why: str) -> None:
    """Poll ``what()`` (state owned by Redis or another thread) until true, yielding the loop."""
    deadline = time.monotonic() + BOUND
    while not what():
        assert time.monotonic() < deadline, f"timed out waiting until {why}"
        await asyncio.sleep(0.01)


def _hold(provider: RedisCacheProvider, key: str) -> Claim:
    """Another caller computing ``key``: it holds the fill lock."""
    claim = provider.claim(key, lease=LEASE, wait=0)
    assert claim.state == "owner"
    return claim


def _assert_nothing_left(provider: RedisCacheProvider, client: redis.Redis, key: str,
                         fetch: AsyncCachedFunction, computed: list[int]) -> None:
    leases = _fill_leases(provider, key)
    locked = client.exists(_lock_key(provider, key)) == 1
    started = time.monotonic()
    assert asyncio.run(fetch(1)) == 1
    took = time.monotonic() - started
    # All three facts in one message, so a failure tells the whole story.
    assert (leases, locked, took < QUICK) == ([], False, True), (
        f"left renewed: {leases}; fill lock still held: {locked}; "
        f"the next caller took {took:.1f} s (at once means < {QUICK:.1f} s)"
    )
    assert computed == [1]  # ... and computed it itself


async def _cancel_by_task_cancel(call: Awaitable[int], queued: Callable[[], bool]) -> None:
    task = asyncio.ensure_future(call)
    await _until(queued, "the call queues for the fill lock")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def _cancel_by_wait_for(call: Awaitable[int], queued: Callable[[], bool]) -> None:
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(call, timeout=0.5)


@pytest.mark.parametrize("cancel", [_cancel_by_task_cancel, _cancel_by_wait_for],
                         ids=["task.cancel", "wait_for"])
def test_cancelled_wait_abandons_the_claim(
    provider: RedisCacheProvider, client: redis.Redis,
    cancel: Callable[[Awaitable[int], Callable[[], bool]], Awaitable[None]],
) -> None:
    computed: list[int] = []
    fetch = _function(provider, computed)
    key = fetch.key_for(1)
    queue = _queue_key(provider, key)

    async def scenario() -> None:
        other = _hold(provider, key)
        await cancel(fetch(1), lambda: client.llen(queue) >= 1)
        # The computer fails: the lock goes to the next live waiter. The cancelled call must
        # not be one (its wait ended), nor keep a lock handed to its thread.
        provider.abandon(other)
        await _until(lambda: client.llen(queue) == 0, "the queue is empty")

    asyncio.run(scenario())  # returns once the loop's worker threads are done
    _assert_nothing_left(provider, client, key, fetch, computed)


class _WatchedExecutor(ThreadPoolExecutor):
    """The loop's default executor, keeping the futures of the work it was given, so a test
    can wait for the worker thread to finish while the loop is held."""

    def __init__(self) -> None:
        super().__init__(max_workers=2)
        self.futures: list[Future[Any]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future = super().submit(fn, *args, **kwargs)
        self.futures.append(future)
        return future


@pytest.mark.parametrize("moment", ["thread-holds-the-lock", "thread-returned-it"])
def test_lock_obtained_as_the_call_is_cancelled_is_given_back(
    provider: RedisCacheProvider, client: redis.Redis, moment: str
) -> None:
    """The worker thread got the lock, but the coroutine has not resumed when it is
    cancelled: the thread holds the lock (its lease is registered with the renewer), or has
    even returned it as the call's claim. Either way the claim must not be lost."""
    computed: list[int] = []
    fetch = _function(provider, computed)
    key = fetch.key_for(1)
    queue = _queue_key(provider, key)
    executor = _WatchedExecutor()

    async def scenario() -> None:
        asyncio.get_running_loop().set_default_executor(executor)
        other = _hold(provider, key)
        task = asyncio.ensure_future(fetch(1))
        await _until(lambda: client.llen(queue) >= 1, "the call queues for the fill lock")
        # From here on the loop does not run until the task is cancelled: the thread's
        # result can only reach the coroutine after the cancellation.
        provider.abandon(other)  # the lock is handed to the waiting thread
        if moment == "thread-returned-it":
            done, _ = wait(executor.futures, timeout=BOUND)
            assert len(done) == 1, "the waiting thread did not return"
            assert _fill_leases(provider, key), "the thread returned without the lock"
        else:
            deadline = time.monotonic() + BOUND
            while not _fill_leases(provider, key):  # the thread now holds (and renews) it
                assert time.monotonic() < deadline, "the waiting thread never got the lock"
                time.sleep(0.005)  # the loop is held on purpose: no await
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    _assert_nothing_left(provider, client, key, fetch, computed)


def test_cancelled_computation_releases_the_fill_lock(
    provider: RedisCacheProvider, client: redis.Redis
) -> None:
    computed: list[int] = []
    started: list[asyncio.Event] = []

    @cached(ttl=60, wait=WAIT, lease=LEASE, provider=provider,
            name=f"cancel-while-computing-{provider.keys.prefix}")
    async def slow(x: int) -> int:
        computed.append(x)
        if len(computed) == 1:
            started[0].set()
            await asyncio.Event().wait()  # never set: runs until cancelled
        return x

    key = slow.key_for(1)

    async def scenario() -> None:
        started.append(asyncio.Event())
        task = asyncio.ensure_future(slow(1))
        await started[0].wait()
        assert client.exists(_lock_key(provider, key)) == 1  # it computes under the fill lock
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert _fill_leases(provider, key) == []
    assert client.exists(_lock_key(provider, key)) == 0
    begun = time.monotonic()
    assert asyncio.run(slow(1)) == 1
    assert time.monotonic() - begun < QUICK
    assert computed == [1, 1]


def test_cancelled_wait_in_memory_gives_the_flight_back() -> None:
    """The same with the per-process provider: its fill lock is a ``threading.Lock``."""
    provider = MemoryCacheProvider()
    computed: list[int] = []

    @cached(ttl=60, wait=WAIT, lease=LEASE, provider=provider, name="cancel-me-memory")
    async def fetch(x: int) -> int:
        computed.append(x)
        return x

    key = fetch.key_for(1)

    async def scenario() -> None:
        other = provider.claim(key, wait=0)
        assert other.state == "owner"
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(fetch(1), timeout=0.3)
        provider.abandon(other)

    asyncio.run(scenario())
    started = time.monotonic()
    assert asyncio.run(fetch(1)) == 1
    took = time.monotonic() - started
    assert took < QUICK, f"the next caller took {took:.1f} s (at once means < {QUICK:.1f} s)"
    assert computed == [1]
