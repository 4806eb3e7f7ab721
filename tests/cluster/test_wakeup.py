"""Wake-ups on a Redis Cluster use sharded pub/sub: a grant's message goes only to the shard of
its key (SPUBLISH on a channel of the key's slot), reaches its waiter on every master, and
follows the slot when it migrates."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from celery_rediskit import (
    RedisMutexStorage,
    RedisSemaphoreStorage,
    create_mutex,
    create_semaphore,
)
from celery_rediskit._redis import wakeup
from celery_rediskit._redis.keys import KeySpace
from celery_rediskit._redis.slots import key_slot
from celery_rediskit.lease import process_id
from tests.cluster.nodes import Cluster, Node
from tests.processes import Holder

pytestmark = pytest.mark.usefixtures("no_stray_leases")


def _until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting until {what}"
        time.sleep(0.005)  # watching Redis state: there is no event to wait on


def _shard_subscribers(node: Node, channel: str) -> int:
    with node.client() as c:
        reply = c.execute_command("PUBSUB", "SHARDNUMSUB", channel)
    return int(reply[1])


@pytest.fixture
def eavesdroppers(cluster: Cluster, cprefix: str) -> Iterator[list[Any]]:
    """A pattern subscriber to every wake-up channel under the prefix, on every master: it
    receives what PUBLISH broadcasts over the cluster, never a sharded message."""
    made = []
    for node in cluster.primaries():
        client = node.client()
        pubsub = client.pubsub()
        pubsub.psubscribe(f"{cprefix}:wake:*")
        assert pubsub.get_message(timeout=5)["type"] == "psubscribe"
        made.append((client, pubsub))
    yield [p for _, p in made]
    for client, pubsub in made:
        pubsub.close()
        client.close()


def _handoff(cluster: Cluster, client: RedisCluster, granter: Any, kind: str, url_prefix: str,
             name: str, queue: str) -> float:
    """A holder in a child process releases ``name`` while this process waits for it;
    returns how long after the release the waiter here had it."""
    holder = Holder(kind, "cluster+" + cluster.url, url_prefix, name, "30", "1")
    try:
        got: dict[str, float] = {}

        def wait() -> None:
            lease = granter.acquire(name)
            got["at"] = time.monotonic()
            lease.release()

        thread = threading.Thread(target=wait)
        thread.start()
        _until(lambda: client.llen(queue) == 1, "the waiter is queued")
        released = time.monotonic()
        assert holder.command("release").startswith("RELEASED True")
        thread.join(15)
        assert "at" in got, "the waiter never got the grant"
        return got["at"] - released
    finally:
        holder.close()


def test_grants_go_only_to_the_shard_of_their_key(
    cluster: Cluster, cluster_client: RedisCluster, cprefix: str, eavesdroppers: list[Any]
) -> None:
    keys = KeySpace(cprefix)
    mutex = create_mutex(timeout=20, lease=30,
                         storage=RedisMutexStorage(cluster_client, prefix=cprefix))
    sem = create_semaphore(permits=1, timeout=20, lease=30,
                           storage=RedisSemaphoreStorage(cluster_client, prefix=cprefix))
    names = cluster.names_per_master(lambda n: keys.lock(n).lock)
    for port, (name,) in names.items():
        for kind, granter, queue in (("mutex", mutex, keys.lock(name).queue),
                                     ("semaphore", sem, keys.semaphore(name).queue)):
            took = _handoff(cluster, cluster_client, granter, kind, cprefix, name, queue)
            assert took < 1.0, f"{kind} on {port}: woken {took:.2f} s after the release"
    heard = [m for p in eavesdroppers for m in iter(lambda p=p: p.get_message(timeout=0.3),
                                                    None) if m["type"] == "pmessage"]
    assert not heard, f"grants were broadcast to every node: {heard[:3]}"
    for port, (name,) in names.items():
        channel = keys.sharded_wake_prefix(key_slot(keys.lock(name).lock)) + process_id()
        assert _shard_subscribers(cluster.node_of_port(port), channel) == 1, (
            "not subscribed on the key's shard")


def test_wakeups_follow_their_slot_to_another_master(
    cluster: Cluster, cluster_client: RedisCluster, cprefix: str
) -> None:
    keys = KeySpace(cprefix)
    name = "wander"
    slot = key_slot(keys.lock(name).lock)
    channel = keys.sharded_wake_prefix(slot) + process_id()
    source = cluster.node_of_slot(slot)
    target = next(n for n in cluster.primaries() if n is not source)
    mutex = create_mutex(timeout=20, lease=30,
                         storage=RedisMutexStorage(cluster_client, prefix=cprefix))
    queue = keys.lock(name).queue
    assert _handoff(cluster, cluster_client, mutex, "mutex", cprefix, name, queue) < 1.0
    assert _shard_subscribers(source, channel) == 1
    try:
        for _ in cluster.migrate_slot(slot, target):
            pass  # the source ends our subscription (sunsubscribe)
        _until(lambda: _shard_subscribers(source, channel) == 0, "the source let go")
        holder = Holder("mutex", "cluster+" + cluster.url, cprefix, name, "30", "1")
        try:
            got: dict[str, float] = {}

            def wait() -> None:
                lease = mutex.acquire(name)
                got["at"] = time.monotonic()
                lease.release()

            thread = threading.Thread(target=wait)
            thread.start()
            _until(lambda: cluster_client.llen(queue) == 1, "the waiter is queued")
            # Its wait reads the hub's connections, sees the subscription end and
            # subscribes again on the slot's new master.
            _until(lambda: _shard_subscribers(target, channel) == 1, "subscribed on the target")
            released = time.monotonic()
            assert holder.command("release").startswith("RELEASED True")
            thread.join(15)
            assert got and got["at"] - released < 1.0, "the grant did not reach the waiter"
        finally:
            holder.close()
    finally:
        for _ in cluster.migrate_slot(slot, source):
            pass


def test_idle_slot_channels_are_dropped(
    cluster: Cluster, cluster_client: RedisCluster, cprefix: str,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past SHARDED_CHANNELS subscribed slots, those unused for SHARDED_IDLE seconds are
    unsubscribed; wake-ups on the slots still in use keep working."""
    monkeypatch.setattr(wakeup, "SHARDED_CHANNELS", 2)
    monkeypatch.setattr(wakeup, "SHARDED_IDLE", 0.0)
    keys = KeySpace(cprefix)
    mutex = create_mutex(timeout=20, lease=30,
                         storage=RedisMutexStorage(cluster_client, prefix=cprefix))
    names = [f"idle{i}" for i in range(5)]
    assert len({key_slot(keys.lock(n).lock) for n in names}) == 5
    for name in names:
        took = _handoff(cluster, cluster_client, mutex, "mutex", cprefix, name,
                        keys.lock(name).queue)
        assert took < 1.0
    subscribed = 0
    for node in cluster.primaries():
        with node.client() as c:
            subscribed += len(c.execute_command("PUBSUB", "SHARDCHANNELS", f"{cprefix}:wake:*"))
    assert subscribed <= 3, f"{subscribed} slot channels still subscribed"


def test_a_plain_redis_client_still_uses_one_process_channel(
    client: redis.Redis, prefix: str
) -> None:
    """Off a cluster nothing changes: PUBLISH on the process channel, one hub per client."""
    assert type(wakeup.hub_for(client)) is wakeup.WakeupHub
    assert RedisMutexStorage(client, prefix=prefix).wake_prefix("x") == f"{prefix}:wake:"
