"""Fencing tokens keep rising when the fencing counter is lost: a restart without persistence,
FLUSHDB, eviction, and a failover to a replica that missed the last grants.

A token is ``max(previous + 1, the server's TIME in microseconds)``, so once the counter is
gone the next token still exceeds every earlier one, as long as the granting server's clock
is past the earlier grants' (see "What holds under which server settings" in the README).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import redis

from celery_rediskit import RedisMutexStorage, create_mutex
from celery_rediskit._redis.keys import KeySpace
from celery_rediskit.lease import Lease
from tests.faults.proxy import FaultProxy
from tests.faults.servers import FaultServer


def grant_tokens(client: redis.Redis, prefix: str, key: str, count: int) -> list[int]:
    """``count`` grants of ``key`` (each released at once); their fencing tokens."""
    mutex = create_mutex(timeout=5, lease=5, storage=RedisMutexStorage(client, prefix))
    tokens = []
    for _ in range(count):
        lease = mutex.acquire(key, auto_renew=False)
        tokens.append(lease.fencing_token)
        lease.release()
    assert tokens == sorted(set(tokens)), tokens
    return tokens


def server_us(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1_000_000 + int(micros)


@pytest.fixture
def volatile_server() -> Iterator[FaultServer]:
    """A private server without persistence: a restart brings it back empty."""
    with FaultServer(persistent=False) as server:
        yield server


def test_tokens_keep_rising_after_a_restart_without_persistence(
    volatile_server: FaultServer, prefix: str
) -> None:
    client = volatile_server.client()
    before = grant_tokens(client, prefix, "res", 3)
    volatile_server.restart(keep_data=False)
    assert client.dbsize() == 0  # the counter is gone with everything else
    after = grant_tokens(client, prefix, "res", 2)
    assert after[0] > before[-1], (before, after)
    client.close()


def test_tokens_keep_rising_after_flushdb(fault_server: FaultServer, prefix: str) -> None:
    client = fault_server.client()
    before = grant_tokens(client, prefix, "res", 3)
    client.flushdb()  # our own server
    after = grant_tokens(client, prefix, "res", 2)
    assert after[0] > before[-1], (before, after)
    client.close()


def test_tokens_keep_rising_after_the_counter_is_evicted(
    fault_server: FaultServer, prefix: str
) -> None:
    client = fault_server.client()
    fence = KeySpace(prefix).lock("res").fence
    before = grant_tokens(client, prefix, "res", 3)
    # Memory full under allkeys-lru: filler evicts the least recently used keys, the counter
    # first among them (EXISTS does not count as a use).
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory-policy", "allkeys-lru")
    client.config_set("maxmemory", used + 2_000_000)
    filler = 0
    while client.exists(fence):
        assert filler < 200_000, "the counter was never evicted"
        with client.pipeline(transaction=False) as pipe:
            for i in range(filler, filler + 1000):
                pipe.set(f"{prefix}:filler:{i}", b"x" * 1000)
            pipe.execute()
        filler += 1000
    assert int(client.info("stats")["evicted_keys"]) > 0
    client.config_set("maxmemory", 0)
    after = grant_tokens(client, prefix, "res", 2)
    assert after[0] > before[-1], (before, after)
    client.close()


def test_a_handoff_after_the_counter_was_lost_gives_a_higher_token(
    fault_server: FaultServer, prefix: str
) -> None:
    client = fault_server.client()
    storage = RedisMutexStorage(client, prefix)
    keys = storage.keys.lock("res")
    mutex = create_mutex(timeout=10, lease=10, storage=storage)
    holder = mutex.acquire("res", auto_renew=False)
    got: list[Lease] = []
    waiter = threading.Thread(
        target=lambda: got.append(mutex.acquire("res", auto_renew=False)))
    waiter.start()
    deadline = time.monotonic() + 10
    while not client.llen(keys.queue):
        assert time.monotonic() < deadline, "the waiter never queued"
        time.sleep(0.005)  # the waiter is another thread's blocking call: poll the queue
    client.delete(keys.fence)  # as eviction would
    holder.release()  # hands the lock to the waiter, with the next token
    waiter.join(10)
    assert got, "the waiter was not granted the lock"
    got[0].release()
    assert got[0].fencing_token > holder.fencing_token, (holder, got)
    client.close()


def test_tokens_keep_rising_while_the_server_clock_is_behind_the_counter(
    fault_server: FaultServer, prefix: str
) -> None:
    # As after the clock stepped back by an hour: the counter is ahead of TIME.
    client = fault_server.client()
    ahead = server_us(client) + 3_600_000_000
    client.set(KeySpace(prefix).lock("res").fence, ahead)
    assert grant_tokens(client, prefix, "res", 3) == [ahead + 1, ahead + 2, ahead + 3]
    client.close()


def test_a_token_is_the_server_clock_in_microseconds_on_a_fresh_counter(
    fault_server: FaultServer, prefix: str
) -> None:
    client = fault_server.client()
    low = server_us(client)
    (token,) = grant_tokens(client, prefix, "res", 1)
    high = server_us(client)
    assert low <= token <= high
    assert token < 2**53  # exact in a Lua number (a double)
    client.close()


def wait_until(condition: object, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)  # another process's state: nothing to wait on but polling


def test_tokens_keep_rising_after_a_failover_to_a_lagging_replica(
    fault_server: FaultServer, fault_proxy: FaultProxy, prefix: str
) -> None:
    master = fault_server.client()
    master.config_set("repl-diskless-sync-delay", 0)
    with FaultServer(persistent=False) as replica_server:
        replica = replica_server.client()
        # The replica follows the master through the proxy, so replication can be cut.
        replica.replicaof("127.0.0.1", fault_proxy.port)
        wait_until(lambda: replica.info("replication").get("master_link_status") == "up",
                   "the replica is linked")
        copied = grant_tokens(master, prefix, "res", 3)
        assert master.wait(1, 10_000) == 1  # the replica has these grants
        fault_proxy.blackhole()  # replication stalls: the replica lags from here on
        missed = grant_tokens(master, prefix, "res", 3)
        fence = KeySpace(prefix).lock("res").fence
        assert int(replica.get(fence) or 0) < missed[0]  # it never got the last grants
        # Failover: the lagging replica is promoted and the old master is gone.
        replica.replicaof("NO", "ONE")
        fault_server.stop()
        after = grant_tokens(replica, prefix, "res", 2)
        assert after[0] > max(copied + missed), (copied, missed, after)
        replica.close()
    master.close()
