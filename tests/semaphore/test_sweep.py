"""When the semaphore's acquire script drops holders whose lease ended (sem_acquire.lua)."""

from __future__ import annotations

import time
from typing import Any

import redis

from celery_rediskit import RedisSemaphoreStorage


def test_an_acquire_under_the_total_sweeps_nothing(private_server: Any) -> None:
    """Counted by the server (INFO commandstats, on a server of the test's own): a permit
    taken while the count is under the total runs no ZREMRANGEBYSCORE (the hot path of a
    concurrency_limit task); giving it back still does (it must not report an ended lease as
    released)."""
    client = redis.Redis.from_url(private_server.url)
    storage = RedisSemaphoreStorage(client, "p")
    assert storage.try_acquire("s", "warm", 64, 10.0, declared=True) >= 1  # scripts loaded
    client.config_resetstat()
    for i in range(20):
        assert storage.try_acquire("s", f"o{i}", 64, 10.0, declared=True) >= 1
    stats = client.info("commandstats")
    assert "cmdstat_zremrangebyscore" not in stats, stats.get("cmdstat_zremrangebyscore")
    assert stats["cmdstat_zadd"]["calls"] == 20
    client.close()


def test_a_full_semaphore_sweeps_ended_leases_before_refusing(private_server: Any) -> None:
    """All permits taken, one of them past its lease: the next acquire gets that permit (the
    sweep runs once the count reaches the total), and the one after is refused."""
    client = redis.Redis.from_url(private_server.url)
    storage = RedisSemaphoreStorage(client, "q")
    assert storage.try_acquire("s", "short", 2, 0.05, declared=True) >= 1
    assert storage.try_acquire("s", "long", 2, 10.0, declared=True) >= 1
    time.sleep(0.1)  # the short lease ends on the server's clock (no event marks it)
    assert storage.try_acquire("s", "next", 2, 10.0, declared=True) >= 1
    assert storage.try_acquire("s", "refused", 2, 10.0, declared=True) <= -1
    holders = client.zrange(storage.keys.semaphore("s").holders, 0, -1)
    assert sorted(holders) == [b"long", b"next"]
    client.close()
