"""Every key the library writes expires after a bounded idle time, and works when re-created.

Lock names such as per-user singletons and ``tenant:{id}`` templates are used once and never
again: a key that never expires would make Redis memory grow without bound.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from celery_rediskit import (
    RedisMutexStorage,
    RedisRateLimitStorage,
    RedisSemaphoreStorage,
    create_mutex,
    create_rate_limiter,
    create_semaphore,
)
from celery_rediskit.cache import RedisCacheProvider
from celery_rediskit.integration.claims import ClaimStore

pytestmark = pytest.mark.usefixtures("no_stray_leases")

WAITER = textwrap.dedent("""
    import sys, redis
    from celery_rediskit import (RedisMutexStorage, RedisSemaphoreStorage, create_mutex,
                                 create_semaphore)
    kind, url, prefix, key = sys.argv[1:5]
    client = redis.Redis.from_url(url)
    if kind == "mutex":
        granter = create_mutex(timeout=60, storage=RedisMutexStorage(client, prefix))
    else:
        granter = create_semaphore(permits=1, timeout=60,
                                   storage=RedisSemaphoreStorage(client, prefix))
    granter.acquire(key)  # blocks: the test kills this process while it waits
""")


def keys_without_ttl(client: redis.Redis, prefix: str) -> tuple[int, list[str]]:
    """(how many keys there are under ``prefix``, those of them without an expiry)."""
    names = [k.decode() for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
    with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.pttl(name)
        ttls = pipe.execute()
    return len(names), [n for n, ttl in zip(names, ttls, strict=True) if ttl == -1]


def kind_of(name: str) -> str:
    """A key's kind: its prefix-less shape with the resource name left out."""
    head, _, rest = name.partition(":")
    if "}" in rest:
        before, _, after = rest.partition("{")
        rest = before + "{}" + after.partition("}")[2]
    return rest.rsplit(":", 1)[0] if rest.startswith("claims:") else rest


@pytest.fixture
def dead_waiter(redis_url: str, prefix: str, client: redis.Redis) -> Iterator[Callable[..., None]]:
    """``dead_waiter(kind, key, queue_key)``: a process queues for ``key`` and is SIGKILLed
    while waiting, leaving its queue entry behind."""
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(kind: str, key: str, queue_key: str) -> None:
        proc = subprocess.Popen([sys.executable, "-c", WAITER, kind, redis_url, prefix, key])
        procs.append(proc)
        deadline = time.monotonic() + 30
        while not client.llen(queue_key):
            assert proc.poll() is None and time.monotonic() < deadline, "the waiter never queued"
            time.sleep(0.01)  # another process: nothing to wait on but the queue itself
        proc.kill()
        proc.wait()

    yield spawn
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_no_key_is_left_without_a_ttl(
    client: redis.Redis, prefix: str, dead_waiter: Callable[..., None]
) -> None:
    mutexes = RedisMutexStorage(client, prefix)
    sems = RedisSemaphoreStorage(client, prefix)
    mutex = create_mutex(timeout=5, lease=30, storage=mutexes)
    sem = create_semaphore(permits=2, timeout=5, lease=30, storage=sems)
    # Distinct names, each used once: per-user singletons, tenant templates.
    for i in range(10_000):
        mutex.acquire(f"user:{i}", auto_renew=False).release()
    for i in range(3_000):
        sem.acquire(f"tenant:{i}:2", auto_renew=False).release()
    # Admin changes of permits, holders still holding, waiters that died while queued.
    sems.initialize("admin-init", 5)
    sems.increase_permits("admin-inc", 2)
    sems.decrease_permits("admin-dec", 1)
    sems.reset("admin-init")
    held_lock = mutex.acquire("held", auto_renew=False)
    held_permit = create_semaphore(permits=1, timeout=5, lease=30, storage=sems).acquire(
        "held", auto_renew=False)
    dead_waiter("mutex", "held", mutexes.keys.lock("held").queue)
    dead_waiter("semaphore", "held", sems.keys.semaphore("held").queue)
    # The cache: entries with and without a lifetime, tags, a single-flight fill.
    cache = RedisCacheProvider(client, prefix=prefix)
    cache.set("forever", 1)
    cache.set("tagged", 2, tags=["t1", "t2"])
    cache.set("short", 3, ttl=60, tags=["t3"])
    cache.set("persisted", 4, ttl=60)
    cache.expire("persisted", None)
    claim = cache.claim("filled")
    cache.fill(claim, 5, None, tags=["t4"])
    # Rate limiters: used once (tenant templates), drained, with reserved slots.
    limiter = create_rate_limiter("10/m", burst=3, storage=RedisRateLimitStorage(client, prefix))
    for i in range(1_000):
        limiter.try_acquire(f"tenant:{i}")
    limiter.check("drained", cost=3)
    limiter.check("drained", max_wait=None)
    # The Celery layer's record of what a task holds.
    ClaimStore(client, prefix, 3600).record("task-1", [("m", "held", held_lock.owner)])

    total, missing = keys_without_ttl(client, prefix)
    kinds_missing = sorted({kind_of(n) for n in missing})
    assert not missing, f"{len(missing)} of {total} keys have no TTL; kinds: {kinds_missing}"
    kinds = {kind_of(k.decode()) for k in client.scan_iter(match=f"{prefix}:*", count=1000)}
    assert {  # every kind of key was written, so every kind was checked
        "lock:{}", "lock:{}:fence", "lock:{}:queue", "lock:{}:waitq",
        "sem:{}:holders", "sem:{}:total", "sem:{}:initial", "sem:{}:queue", "sem:{}:waitq",
        "cache:e:{}", "cache:t:{}", "claims", "rate:{}",
    } <= kinds, kinds
    held_lock.release()
    held_permit.release()


def wait_until_gone(client: redis.Redis, *names: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while client.exists(*names):
        assert time.monotonic() < deadline, f"{names} never expired"
        time.sleep(0.02)  # expiry takes time to pass: there is no event to wait on


def test_a_lock_whose_fence_expired_keeps_rising_tokens(client: redis.Redis,
                                                         prefix: str) -> None:
    storage = RedisMutexStorage(client, prefix, idle_ttl=0.2)
    mutex = create_mutex(timeout=5, lease=0.1, storage=storage)
    first = mutex.acquire("res", auto_renew=False)
    first.release()
    fence = storage.keys.lock("res").fence
    assert 0 < client.pttl(fence) <= 300  # idle_ttl after the grant's lease
    wait_until_gone(client, fence)
    again = mutex.acquire("res", auto_renew=False)
    again.release()
    assert again.fencing_token > first.fencing_token


def test_a_lock_in_use_keeps_its_fence(client: redis.Redis, prefix: str) -> None:
    storage = RedisMutexStorage(client, prefix, idle_ttl=0.6)
    mutex = create_mutex(timeout=5, lease=0.1, storage=storage)
    fence = storage.keys.lock("res").fence
    in_use_until = time.monotonic() + 1.5
    while time.monotonic() < in_use_until:
        mutex.acquire("res", auto_renew=False).release()
        # Renewed at least once per half of lease + idle_ttl, so at least that half is left
        # (less a slow round trip).
        assert (100 + 600) / 2 - 150 <= client.pttl(fence) <= 100 + 600
        time.sleep(0.05)  # grants spread over more than idle_ttl


def test_while_the_clock_is_behind_each_grant_keeps_the_last_token(client: redis.Redis,
                                                                   prefix: str) -> None:
    storage = RedisMutexStorage(client, prefix, idle_ttl=0.6)
    mutex = create_mutex(timeout=5, lease=0.1, storage=storage)
    seconds, micros = client.time()
    ahead = int(seconds) * 1_000_000 + int(micros) + 3_600_000_000  # as if the clock fell back
    client.set(storage.keys.lock("res").fence, ahead, px=700)
    tokens = []
    in_use_until = time.monotonic() + 1.5
    while time.monotonic() < in_use_until:
        lease = mutex.acquire("res", auto_renew=False)
        lease.release()
        tokens.append(lease.fencing_token)
        time.sleep(0.05)  # grants spread over more than idle_ttl
    assert tokens == list(range(ahead + 1, ahead + 1 + len(tokens)))


def test_a_semaphore_whose_total_expired_reinitialises_from_its_permits(
    client: redis.Redis, prefix: str
) -> None:
    storage = RedisSemaphoreStorage(client, prefix, idle_ttl=0.3)
    sem = create_semaphore(permits=3, timeout=5, lease=30, storage=storage)
    sem.acquire("db", auto_renew=False).release()  # initialised with the declared 3
    storage.increase_permits("db", 2)  # 5 until the semaphore goes idle
    keys = storage.keys.semaphore("db")
    # In use, the semaphore does not expire: each acquire keeps it alive.
    in_use_until = time.monotonic() + 1.0
    while time.monotonic() < in_use_until:
        sem.acquire("db", auto_renew=False).release()
        assert storage.get_semaphore_info("db").total == 5
        time.sleep(0.05)  # uses spread over more than idle_ttl
    holder = sem.acquire("db", auto_renew=False)  # still holding when the total expires
    wait_until_gone(client, keys.total, keys.initial)
    assert not storage.get_semaphore_info("db").initialized
    assert client.pttl(keys.holders) > 20_000  # the holder's lease keeps its entry
    more = [sem.acquire("db", auto_renew=False) for _ in range(2)]
    info = storage.get_semaphore_info("db")
    assert (info.total, info.acquired, info.available) == (3, 3, 0)  # the declared permits
    with pytest.raises(TimeoutError):
        sem.acquire("db", blocking=False, auto_renew=False)
    for lease in [holder, *more]:
        assert lease.release()


def test_cache_entries_stored_without_a_lifetime_live_the_idle_ttl(
    client: redis.Redis, prefix: str
) -> None:
    cache = RedisCacheProvider(client, prefix=prefix, idle_ttl="2h")
    cache.set("a", 1, tags=["t"])
    assert cache.ttl("a") == pytest.approx(7200, abs=60)
    assert client.pttl(f"{prefix}:cache:t:{{t}}") == pytest.approx(7_200_000, abs=60_000)
    claim = cache.claim("b")
    cache.fill(claim, 2, None)
    assert cache.ttl("b") == pytest.approx(7200, abs=60) and cache.get("b") == 2


def test_keys_of_an_older_version_get_an_expiry_when_next_used(client: redis.Redis,
                                                              prefix: str) -> None:
    mutexes, sems = RedisMutexStorage(client, prefix), RedisSemaphoreStorage(client, prefix)
    lock, sem = mutexes.keys.lock("old"), sems.keys.semaphore("old")
    client.set(lock.fence, 41)  # a counter of the INCR era, without expiry
    client.mset({sem.total: 3, sem.initial: 3})
    lease = create_mutex(timeout=5, storage=mutexes).acquire("old", auto_renew=False)
    lease.release()
    create_semaphore(permits=3, timeout=5, storage=sems).acquire("old", auto_renew=False).release()
    assert lease.fencing_token > 41
    for name in (lock.fence, sem.total, sem.initial):
        assert client.pttl(name) > 0, name


@pytest.mark.parametrize("bad", [0, -1, "forever", None])
def test_idle_ttl_must_be_a_duration(client: redis.Redis, bad: Any) -> None:
    with pytest.raises(ValueError, match="idle_ttl"):
        RedisMutexStorage(client, idle_ttl=bad)
    with pytest.raises(ValueError, match="idle_ttl"):
        RedisSemaphoreStorage(client, idle_ttl=bad)


def test_a_grant_sets_the_fence_expiry_in_the_tokens_own_set(private_server: Any) -> None:
    """Counted by the server (INFO commandstats, on a server of the test's own): granting a
    new lock, the hot path of a singleton task, runs no PEXPIRE of its own; its fence key
    still lives idle_ttl after the grant's lease."""
    client = redis.Redis.from_url(private_server.url)
    storage = RedisMutexStorage(client, "p", idle_ttl=60)
    mutex = create_mutex(timeout=5, lease=10, storage=storage)
    mutex.acquire("warm-up", auto_renew=False).release()  # the scripts loaded
    client.config_resetstat()
    for i in range(20):
        mutex.acquire(f"new-{i}", auto_renew=False).release()
    stats = client.info("commandstats")
    assert "cmdstat_pexpire" not in stats, stats.get("cmdstat_pexpire")
    assert stats["cmdstat_set"]["calls"] >= 40  # each grant's lock and fence
    assert 60_000 < client.pttl(storage.keys.lock("new-0").fence) <= 70_000
    client.close()
