"""The in-memory provider and the memoisation front, without Redis."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from celery_rediskit.cache import (
    MISSING,
    CacheContextError,
    MemoryCacheProvider,
    cache_life,
    cache_tag,
    cached,
    revalidate_tag,
)


def test_lru_eviction_and_ttl() -> None:
    cache = MemoryCacheProvider(max_entries=3)
    for key in "abc":
        cache.set(key, key.upper())
    assert cache.get("a") == "A"  # a is now the most recently used
    cache.set("d", "D")
    assert not cache.exists("b") and cache.exists("a") and len(cache) == 3
    cache.set("t", 1, ttl=0.2)
    assert cache.get("t") == 1
    time.sleep(0.25)  # the TTL must pass
    assert cache.get("t", MISSING) is MISSING and not cache.exists("t")
    assert cache.expire("a", "1h") and not cache.expire("t", 5)
    assert cache.clear() == 2 and len(cache) == 0  # "t" had evicted "c", then expired


def test_none_is_a_hit_and_tags() -> None:
    cache = MemoryCacheProvider()
    cache.set("n", None)
    assert cache.get("n", MISSING) is None
    cache.set("u1", 1, tags=["users"])
    cache.set("u2", 2, tags=["users", "admins"])
    assert cache.revalidate_tag("users") == 2
    assert not cache.exists("u1") and cache.exists("n")
    assert cache.delete("n") and not cache.delete("n")


def test_cached_with_memory_provider() -> None:
    cache = MemoryCacheProvider()
    calls: list[int] = []

    @cached(ttl="5m", tags=["nums"], provider=cache)
    def square(x: int) -> int | None:
        calls.append(x)
        cache_tag(f"n:{x}")
        cache_life("1h")
        return None if x == 0 else x * x

    assert square(3) == 9 and square(3) == 9 and square(x=3) == 9
    assert square(0) is None and square(0) is None
    assert calls == [3, 0]
    assert revalidate_tag("n:3", provider=cache) == 1
    assert square(3) == 9 and calls == [3, 0, 3]
    assert square.invalidate(0) and square(0) is None and calls == [3, 0, 3, 0]
    assert revalidate_tag("nums", provider=cache) == 2


def test_cache_tag_and_life_outside_a_cached_call() -> None:
    with pytest.raises(CacheContextError, match="inside a function decorated with @cached"):
        cache_tag("x")
    with pytest.raises(CacheContextError):
        cache_life("5m")


def test_exceptions_are_not_cached() -> None:
    cache = MemoryCacheProvider()
    calls = []

    @cached(provider=cache)
    def boom(x: int) -> int:
        calls.append(x)
        raise ValueError(x)

    for _ in range(2):
        with pytest.raises(ValueError):
            boom(1)
    assert calls == [1, 1]


def test_single_flight_in_process_threads() -> None:
    cache = MemoryCacheProvider()
    calls = []
    barrier = threading.Barrier(6)

    @cached(provider=cache)
    def work(x: int) -> int:
        calls.append(x)
        time.sleep(0.1)  # the work itself
        return x

    results: list[int] = []
    threads = [threading.Thread(target=lambda: (barrier.wait(), results.append(work(7))))
               for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [7] * 6 and calls == [7]


def test_async_function() -> None:
    cache = MemoryCacheProvider()
    calls = []

    @cached(ttl=60, provider=cache)
    async def fetch(x: int) -> dict[str, int]:
        calls.append(x)
        cache_tag("fetch")
        await asyncio.sleep(0)
        return {"x": x}

    async def main() -> None:
        assert await fetch(1) == {"x": 1}
        assert await fetch(1) == {"x": 1}

    asyncio.run(main())
    assert calls == [1]
    assert cache.revalidate_tag("fetch") == 1
