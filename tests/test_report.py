"""``celery_rediskit.report``: who holds what, read with SCAN (no Celery involved)."""

from __future__ import annotations

import os
import socket
import time

import redis

from celery_rediskit import LeaseKind, RedisMutexStorage, RedisSemaphoreStorage
from celery_rediskit.lease import new_owner_id
from celery_rediskit.report import glob_escape, parse_owner, read_resources


def test_parse_owner() -> None:
    assert parse_owner("web-1/4242/ab12cd:7") == ("web-1", 4242)
    assert parse_owner("a/b/4242/ab12cd:7") == ("a/b", 4242)
    assert parse_owner("q:1234-5678") == (None, None)
    assert parse_owner("") == (None, None)
    host, pid = parse_owner(new_owner_id())
    assert pid == os.getpid() and host and socket.gethostname().startswith(host[:8])


def test_glob_escape() -> None:
    assert glob_escape("a*b?[c]\\") == "a\\*b\\?\\[c\\]\\\\"


def test_locks_and_semaphores_with_holders(client: redis.Redis, prefix: str) -> None:
    mutexes = RedisMutexStorage(client, prefix=prefix)
    sems = RedisSemaphoreStorage(client, prefix=prefix)
    lock_owner = new_owner_id()
    token = mutexes.acquire("export", lock_owner, 30.0, 0)
    mutexes.acquire("other", new_owner_id(), 10.0, 0)
    sems.initialize("db", 3)
    a, b = new_owner_id(), new_owner_id()
    sems.acquire("db", a, 3, 20.0, 0)
    sems.acquire("db", b, 3, 20.0, 0)
    sems.initialize("idle", 2)

    found = read_resources(client, prefix)
    assert [(r.kind, r.key) for r in found] == [
        (LeaseKind.MUTEX, "export"), (LeaseKind.MUTEX, "other"), (LeaseKind.SEMAPHORE, "db"),
    ]
    assert [r.to_dict()["kind"] for r in found] == ["lock", "lock", "semaphore"]
    export = found[0]
    assert export.fencing_token == token
    assert export.redis_key == f"{prefix}:lock:{{export}}"
    (holder,) = export.holders
    assert holder.owner == lock_owner and holder.pid == os.getpid()
    assert holder.remaining is not None and 29.0 < holder.remaining <= 30.0
    db = found[2]
    assert (db.total, db.acquired, db.available) == (3, 2, 1)
    assert {h.owner for h in db.holders} == {a, b}
    assert db.to_dict()["holders"][0]["remaining"] <= 20.0

    with_idle = read_resources(client, prefix, include_idle=True)
    idle = [r for r in with_idle if r.key == "idle"]
    assert idle and (idle[0].total, idle[0].acquired, idle[0].available) == (2, 0, 2)

    # the pattern is a glob over names, applied by the server
    assert [r.key for r in read_resources(client, prefix, "ex*")] == ["export"]
    assert [r.key for r in read_resources(client, prefix, "d?")] == ["db"]
    assert read_resources(client, prefix, "nothing*") == []
    # released locks and fence counters are not reported
    mutexes.release("other", mutexes.get_lock_info("other").holder or "")
    assert [r.key for r in read_resources(client, prefix, kinds=("lock",))] == ["export"]


def test_prefix_isolation_and_lookalike_keys(client: redis.Redis, prefix: str) -> None:
    RedisMutexStorage(client, prefix=prefix).acquire("mine", new_owner_id(), 30.0, 0)
    RedisMutexStorage(client, prefix=prefix + "x").acquire("theirs", new_owner_id(), 30.0, 0)
    client.set(f"{prefix}:lock:{{mine}}:fence:junk", "1")  # not a lock owner key
    client.set(f"{prefix}:lock:nobraces", "1")
    assert [r.key for r in read_resources(client, prefix)] == ["mine"]


def test_scan_over_many_keys_is_fast(client: redis.Redis, prefix: str) -> None:
    """100,000 unrelated keys under the prefix: the locks are found, quickly, by SCAN."""
    names = [f"{prefix}:cache:e:{{cache/k{i}}}" for i in range(100_000)]
    pipe = client.pipeline(transaction=False)
    for i, name in enumerate(names):
        pipe.set(name, "x", ex=120)
        if i % 10_000 == 9_999:
            pipe.execute()
    pipe.execute()
    try:
        mutexes = RedisMutexStorage(client, prefix=prefix)
        for name in ("a", "b", "c"):
            mutexes.acquire(name, new_owner_id(), 30.0, 0)
        started = time.monotonic()
        found = read_resources(client, prefix)
        elapsed = time.monotonic() - started
        assert [r.key for r in found] == ["a", "b", "c"]
        assert elapsed < 5.0, f"reading the report took {elapsed:.2f} s"
    finally:
        for start in range(0, len(names), 10_000):
            client.unlink(*names[start:start + 10_000])
