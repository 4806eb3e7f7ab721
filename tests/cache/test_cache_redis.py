"""The Redis provider and @cached against a real Redis: sharing, tags, TTLs, single-flight."""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
from typing import Any

import cachefuncs
import pytest
import redis
from celery.exceptions import SoftTimeLimitExceeded

from celery_rediskit._redis.keys import IDLE_TTL, KeySpace
from celery_rediskit.cache import (
    MISSING,
    RedisCacheProvider,
    cache_life,
    cache_tag,
    cached,
    revalidate_tag,
)
from celery_rediskit.errors import ConfigurationError, SerializationError
from tests.interrupts import HOWS, Background, interrupt_wait, wait_until

SPAWN = multiprocessing.get_context("spawn")


def test_get_set_none_ttl_expire(provider: RedisCacheProvider, client: redis.Redis) -> None:
    provider.set("n", None, ttl=30)
    assert provider.get("n", MISSING) is None and provider.exists("n")
    assert provider.get("absent", MISSING) is MISSING
    provider.set("v", {"a": [1, 2]}, ttl="1h")
    assert provider.get("v") == {"a": [1, 2]}
    assert 3590 < (provider.ttl("v") or 0) <= 3600
    provider.set("short", 1, ttl=0.3)
    assert provider.expire("short", 60)  # expire() changes the real lifetime
    assert provider.expire("v", 0.3) and provider.expire("n", None)
    assert provider.ttl("n") == pytest.approx(IDLE_TTL, abs=60)  # None: the idle lifetime
    time.sleep(0.4)  # the 0.3 s lifetime must pass
    assert provider.get("v", MISSING) is MISSING and not provider.exists("v")
    assert provider.get("short") == 1 and provider.get("n", MISSING) is None
    assert not provider.expire("v", 5)


def test_clear_deletes_only_this_prefix(provider: RedisCacheProvider, client: redis.Redis,
                                        prefix: str) -> None:
    other = RedisCacheProvider(client, prefix=prefix + "-other")
    for i in range(1200):  # more than one SCAN batch
        provider.set(f"k{i}", i, ttl=60, tags=["all"] if i % 2 else ())
    other.set("keep", 1, ttl=60)
    client.set(f"{prefix}:unrelated", 1, ex=60)
    assert provider.clear() == 1201  # entries and the one tag set
    assert provider.get("k1", MISSING) is MISSING
    assert other.get("keep") == 1 and client.get(f"{prefix}:unrelated") == b"1"
    other.clear()


def test_a_glob_prefix_never_clears_the_entries_of_other_prefixes(
    client: redis.Redis, prefix: str
) -> None:
    """``prefix="svc[12]"`` as a glob matches ``svc1`` and ``svc2``: it is refused."""
    neighbours = [RedisCacheProvider(client, prefix=prefix + n) for n in "12"]
    for n, neighbour in enumerate(neighbours):
        neighbour.set("k", n, ttl=60)
    refused: ConfigurationError | None = None
    try:
        RedisCacheProvider(client, prefix=prefix + "[12]").clear()
    except ConfigurationError as exc:
        refused = exc
    assert [p.get("k", MISSING) for p in neighbours] == [0, 1], (
        f"clear() under prefix {prefix}[12] deleted the entries of {prefix}1 and {prefix}2"
    )
    assert refused is not None and "prefix" in str(refused) and "glob" in str(refused)
    for neighbour in neighbours:
        neighbour.clear()


def test_tag_index_lives_in_redis_and_cleans_itself(
    provider: RedisCacheProvider, client: redis.Redis, prefix: str
) -> None:
    tag_key = f"{prefix}:cache:t:{{users}}"
    provider.set("a", 1, ttl=0.3, tags=["users"])
    provider.set("b", 2, ttl=60, tags=["users", "admins"])
    assert 59_000 < client.pttl(tag_key) <= 60_000  # the set lives as long as its last member
    assert provider.delete("b")  # deleting drops it from its tag sets
    assert client.zrange(tag_key, 0, -1) == [provider.entry_key("a").encode()]
    assert client.exists(f"{prefix}:cache:t:{{admins}}") == 0
    time.sleep(0.4)  # a's lifetime passes
    provider.set("c", 3, ttl=60, tags=["users"])  # a write trims expired members
    assert client.zrange(tag_key, 0, -1) == [provider.entry_key("c").encode()]
    provider.set("c", 3, ttl=60, tags=["others"])  # re-tagging leaves the old set
    assert client.exists(tag_key) == 0
    provider.set("d", 4, ttl=60, tags=["x", "y"])
    assert provider.revalidate_tag("x") == 1
    assert client.exists(f"{prefix}:cache:t:{{y}}") == 0 and not provider.exists("d")


def test_pickle_refused_unless_opted_in(provider: RedisCacheProvider, client: redis.Redis,
                                        prefix: str) -> None:
    with pytest.raises(ConfigurationError, match="allow_unsafe"):
        RedisCacheProvider(client, prefix=prefix, serializer="pickle")
    with pytest.raises(ConfigurationError, match="allow_unsafe"):
        RedisCacheProvider(client, prefix=prefix, accept=["json", "pickle"])
    # An attacker writes a pickle entry: a JSON provider refuses to decode it.
    payload = b"application/x-python-serialize\n\n" + pickle.dumps({"evil": True})
    client.set(provider.entry_key("p"), payload, ex=60)
    with pytest.raises(SerializationError, match="refusing"):
        provider.get("p")
    trusting = RedisCacheProvider(client, prefix=prefix, serializer="pickle", allow_unsafe=True)
    assert trusting.get("p") == {"evil": True}
    trusting.set("obj", {1, 2}, ttl=60)
    assert trusting.get("obj") == {1, 2}


def test_unserializable_result_is_still_returned(
    global_provider: RedisCacheProvider, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(SerializationError, match="cannot serialize"):
        global_provider.set("x", object())
    calls = []

    @cached(ttl=60)
    def make(x: int) -> object:
        calls.append(x)
        return {x}  # a set: not JSON

    with caplog.at_level(logging.WARNING, logger="celery_rediskit.cache"):
        assert make(1) == {1} and make(1) == {1}
    assert calls == [1, 1]
    assert sum("result not cached" in r.getMessage() for r in caplog.records) == 1
    assert not global_provider.is_cluster  # the fill lock was released:
    assert not global_provider._locks.is_locked(global_provider.keys.cache_lock_name(
        make.key_for(1)))


def test_cached_tags_life_and_invalidate(global_provider: RedisCacheProvider) -> None:
    calls = []

    @cached(ttl="5m", tags=["reports"], version=3)
    def report(day: str, region: str = "eu") -> dict[str, Any]:
        calls.append(day)
        cache_tag(f"day:{day}")
        cache_life("1h")
        return {"day": day, "region": region}

    assert report("mon") == report(day="mon", region="eu") == {"day": "mon", "region": "eu"}
    assert calls == ["mon"]
    key = report.key_for("mon")
    assert "@3:" in key and 3590 < (global_provider.ttl(key) or 0) <= 3600
    assert revalidate_tag("day:mon") == 1
    report("mon")
    assert report.invalidate("mon") and not report.invalidate("mon")
    report("mon")
    report("tue")
    assert revalidate_tag("reports") == 2
    assert calls == ["mon", "mon", "mon", "tue"]


def test_two_processes_share_one_entry(redis_url: str, prefix: str) -> None:
    cachefuncs.setup(redis_url, prefix)
    with SPAWN.Pool(1) as pool:
        child_value, child_key = pool.apply(cachefuncs.child_profile, (redis_url, prefix, 42))
    assert child_key == cachefuncs.profile.key_for(42)
    assert cachefuncs.profile(42) == child_value  # computed by the child, read here
    assert child_value["pid"] != os.getpid() and cachefuncs.runs("profile") == 1
    # revalidate_tag in another process drops the entry written here
    cachefuncs.profile(7)
    with SPAWN.Pool(1) as pool:
        assert pool.apply(cachefuncs.child_revalidate, (redis_url, prefix, "user:7")) == 1
    assert cachefuncs.profile(7)["pid"] == os.getpid() and cachefuncs.runs("profile") == 3


def test_single_flight_threads(global_provider: RedisCacheProvider) -> None:
    calls = []
    barrier = threading.Barrier(8)

    @cached(ttl=60)
    def work(x: int) -> dict[str, int]:
        calls.append(x)
        time.sleep(0.2)  # the work itself
        return {"x": x}

    results: list[Any] = []

    def run() -> None:
        barrier.wait()
        results.append(work(5))

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [5] and results == [{"x": 5}] * 8


def test_single_flight_processes(redis_url: str, prefix: str) -> None:
    cachefuncs.setup(redis_url, prefix)
    barrier = SPAWN.Manager().Barrier(4)
    with SPAWN.Pool(4) as pool:
        results = pool.starmap(cachefuncs.child_slow, [(redis_url, prefix, barrier, 1)] * 4)
    assert cachefuncs.runs("slow") == 1
    assert all(r == results[0] for r in results)


def test_wait_is_bounded(global_provider: RedisCacheProvider) -> None:
    started, release = threading.Event(), threading.Event()
    calls = []

    @cached(ttl=60, wait=0.3)
    def stuck(x: int) -> int:
        calls.append(x)
        if len(calls) == 1:
            started.set()
            release.wait(10)
        return x

    holder = threading.Thread(target=stuck, args=(1,))
    holder.start()
    assert started.wait(5)
    t0 = time.monotonic()
    assert stuck(1) == 1  # gave up waiting after 0.3 s and computed itself
    assert 0.25 < time.monotonic() - t0 < 2.0 and calls == [1, 1]
    release.set()
    holder.join()


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("exc", [KeyboardInterrupt, SoftTimeLimitExceeded],
                         ids=lambda e: e.__name__)
def test_an_interrupted_single_flight_wait_leaves_the_queue(
    provider: RedisCacheProvider, prefix: str, exc: type[BaseException], how: str
) -> None:
    """A caller interrupted while it waits for another caller's fill leaves the fill lock's
    queue: the fill hands the lock to the live waiter behind it, which finds the entry at
    once instead of waiting for the departed waiter's lease (30 s)."""
    keys = KeySpace(prefix).lock(provider.keys.cache_lock_name("k"))
    queued = provider.client.hlen
    computer = provider.claim("k")
    assert computer.state == "owner"
    live = Background(lambda: provider.claim("k", lease=30, wait=5))

    def queue_a_live_waiter_behind() -> None:
        wait_until(lambda: queued(keys.waiters) == 1)
        live.start()
        wait_until(lambda: queued(keys.waiters) == 2)

    interrupt_wait(how, exc, lambda abort: provider.claim("k", lease=30, wait=30, abort=abort),
                   queue_a_live_waiter_behind)
    waiting = (queued(keys.waiters), provider.client.llen(keys.queue))
    filled_at = time.monotonic()
    provider.fill(computer, "value", 60)
    live.join(10)
    assert live.error is None and live.result.state == "hit", (
        f"the live waiter got {live.result or live.error!r}: the fill lock went to "
        f"{provider.client.get(keys.lock)!r}"
    )
    assert live.finished_at - filled_at < 1.0
    assert waiting == (1, 1), "the interrupted waiter stayed queued in Redis"


def test_takeover_after_computer_dies(redis_url: str, prefix: str, client: redis.Redis) -> None:
    cachefuncs.setup(redis_url, prefix)
    child = SPAWN.Process(target=cachefuncs.child_fragile, args=(redis_url, prefix, 9))
    child.start()
    try:
        assert client.blpop([f"{prefix}:started"], timeout=20) is not None
        os.kill(child.pid or 0, signal.SIGKILL)  # dies holding the fill lock (1 s lease)
        child.join(5)
        t0 = time.monotonic()
        assert cachefuncs.fragile(9)["pid"] == os.getpid()
        assert time.monotonic() - t0 < 3.0 and cachefuncs.runs("fragile") == 2
    finally:
        if child.is_alive():
            child.kill()


def test_async_cached_function(global_provider: RedisCacheProvider) -> None:
    import asyncio

    calls = []

    @cached(ttl=60)
    async def fetch(x: int) -> dict[str, int]:
        calls.append(x)
        cache_tag("fetch")
        await asyncio.sleep(0.1)
        return {"x": x}

    async def main() -> list[Any]:
        return list(await asyncio.gather(*(fetch(1) for _ in range(5))))

    assert asyncio.run(main()) == [{"x": 1}] * 5
    assert calls == [1] and revalidate_tag("fetch") == 1
