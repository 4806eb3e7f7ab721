"""What the server runs inside the script that hands a lock or a permit to the next waiter:
the hot path of every contended hand-over (``make bench``'s mutex and semaphore sections),
pinned command by command (MONITOR)."""

from __future__ import annotations

import redis

from celery_rediskit import RedisMutexStorage, RedisSemaphoreStorage
from celery_rediskit.testing import PrivateServer
from tests.monitor import client_commands, command_names


def test_a_lock_handed_to_a_waiter_reads_the_clock_once_and_pops_it_first(
    private_server: PrivateServer, prefix: str
) -> None:
    """The release that hands a lock over takes the next waiter out of the queue with its
    first call (LPOP, then its entry; before: LINDEX, its entry, then LPOP) and reads the
    server's clock once for the waiters' deadlines and the fencing token (before: twice)."""
    client = redis.Redis.from_url(private_server.url)
    storage = RedisMutexStorage(client, prefix=prefix)
    keys = storage.keys.lock_list("handed")
    assert storage.try_acquire("handed", "A:1", 30) >= 1
    joins = storage.acquire_argv("B:1", 30, "handed")
    joins[2] = "1"  # B joins the queue (its first check-in)
    assert int(storage._acquire.run(client, keys, joins)) <= -1
    script, rkeys, args = storage.release_call("handed", "A:1")
    script.load(client)
    with client_commands(private_server.url, scripts=True) as run:
        reply = script.run(client, rkeys, args)
    assert reply == 2  # handed to a waiter of another process (B:1's "B")
    assert command_names(run) == [
        "GET", "LLEN",  # the holder, the queue (not empty: no fast path)
        "SET",  # the release record
        "TIME", "LPOP", "HGET", "HDEL",  # the clock, the next waiter taken out, its entry
        "SET", "SET",  # the lock to the waiter, the fencing token (same clock reading)
        "PUBLISH"], run  # the grant
    assert client.get(keys[0]) == b"B:1"
    client.close()


def test_a_permit_handed_to_a_waiter_skips_the_queue_check_of_a_holder(
    private_server: PrivateServer, prefix: str
) -> None:
    """The release of a permit that serves a waiter removes the holder first and leaves the
    queue alone for it (a holder is never queued; before: an HDEL of its entry first), and
    takes the waiter out with its first call (LPOP)."""
    client = redis.Redis.from_url(private_server.url)
    storage = RedisSemaphoreStorage(client, prefix=prefix)
    keys = storage._key_list("pool")
    assert storage.try_acquire("pool", "A:1", 1, 30) >= 1
    joins = storage._acquire_argv("B:1", 1, 30, "pool")
    joins[2] = "1"  # B joins the queue
    assert int(storage._acquire.run(client, keys, joins)) <= -1
    script, rkeys, args = storage.release_call("pool", "A:1")
    script.load(client)
    with client_commands(private_server.url, scripts=True) as run:
        script.run(client, rkeys, args)
    names = command_names(run)
    assert names[:3] == ["TIME", "ZREMRANGEBYSCORE", "LLEN"], run
    assert names[3:5] == ["ZREM", "GET"], run  # the holder out, then the total to serve
    assert "HDEL" not in names[:names.index("LPOP")], run
    assert names.count("TIME") == 1 and "LINDEX" not in names, run
    assert client.zscore(keys[0], "B:1") is not None  # B holds the permit now
    client.close()
