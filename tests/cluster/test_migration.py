"""A slot moving between masters while leases in it are held: renewal, release and the hand-off
to a waiter keep working through ASK (keys moved, slot still migrating) and MOVED (done)."""

from __future__ import annotations

import threading
import time

import pytest
from redis.cluster import RedisCluster

from celery_rediskit import (
    RedisMutexStorage,
    RedisSemaphoreStorage,
    create_mutex,
    create_semaphore,
)
from celery_rediskit._redis.keys import KeySpace
from celery_rediskit._redis.slots import key_slot
from celery_rediskit.renewal import renewer
from tests.cluster.nodes import Cluster

pytestmark = pytest.mark.usefixtures("no_stray_leases")

LEASE = 2.0


def test_leases_renew_release_and_hand_over_while_their_slot_migrates(
    cluster: Cluster, cluster_client: RedisCluster, cprefix: str
) -> None:
    keys = KeySpace(cprefix)
    name = "moving"
    slot = key_slot(keys.lock(name).lock)
    assert key_slot(keys.semaphore(name).holders) == slot  # one hash tag: one slot
    source = cluster.node_of_slot(slot)
    target = next(n for n in cluster.primaries() if n is not source)
    mutexes = RedisMutexStorage(cluster_client, prefix=cprefix)
    mutex = create_mutex(timeout=20, lease=LEASE, storage=mutexes)
    sem = create_semaphore(permits=1, timeout=20, lease=LEASE,
                           storage=RedisSemaphoreStorage(cluster_client, prefix=cprefix))
    lock = mutex.acquire(name)
    permit = sem.acquire(name)
    first_token = lock.fencing_token
    try:
        for phase in cluster.migrate_slot(slot, target):
            renewer().renew_now([lock, permit])
            assert not lock.lost and not permit.lost, f"a lease was lost at {phase!r}"
            info = mutex.get_lock_info(name)
            assert info.holder == lock.owner and info.ttl > LEASE * 0.75, phase
            if phase == "migrated":  # the keys sit on the target; the source answers ASK
                with target.client() as direct:
                    direct.execute_command("ASKING")
                    assert direct.exists(keys.lock(name).lock) == 1
        assert cluster.owner(keys.lock(name).lock) is target
        # A waiter queued after the move gets the lock by hand-off when it is released.
        got: dict[str, float] = {}

        def wait() -> None:
            held = mutex.acquire(name)
            got["at"], got["token"] = time.monotonic(), held.fencing_token  # type: ignore[assignment]
            held.release()

        thread = threading.Thread(target=wait)
        thread.start()
        while not cluster_client.llen(keys.lock(name).queue):
            time.sleep(0.005)  # until the waiter is queued in Redis
        released = time.monotonic()
        assert lock.release()
        thread.join(15)
        assert got and got["at"] - released < LEASE / 2, "the waiter was not handed the lock"
        assert got["token"] > first_token
        assert permit.release()
    finally:
        lock.release()
        permit.release()
        for _ in cluster.migrate_slot(slot, source):  # the session's cluster as it was
            pass
    assert cluster.owner(keys.lock(name).lock) is source


def test_release_and_acquire_wait_out_a_slow_slot_migration(
    cluster: Cluster, cluster_client: RedisCluster, cprefix: str
) -> None:
    """A slot is marked migrating while its keys are still on the source (a slot with many
    keys takes a while to move): a script naming a key that is absent there (a lock's queue)
    is answered TRYAGAIN. redis-py gives up after about 0.4 s; the library keeps trying until
    the keys have moved, so release and acquire succeed once they have."""
    keys = KeySpace(cprefix)
    name = "slow-move"
    slot = key_slot(keys.lock(name).lock)
    source = cluster.node_of_slot(slot)
    target = next(n for n in cluster.primaries() if n is not source)
    mutex = create_mutex(timeout=20, lease=10,
                         storage=RedisMutexStorage(cluster_client, prefix=cprefix))
    sem = create_semaphore(permits=1, timeout=20, lease=10,
                           storage=RedisSemaphoreStorage(cluster_client, prefix=cprefix))
    lock = mutex.acquire(name)
    permit = sem.acquire(name)
    results: dict[str, object] = {}
    steps = cluster.migrate_slot(slot, target)
    try:
        assert next(steps) == "importing"

        def operate() -> None:
            try:
                results["released"] = lock.release()
                results["permit released"] = permit.release()
                again = mutex.acquire(name, timeout=5)
                results["acquired"] = again.fencing_token
                results["released again"] = again.release()
            except BaseException as exc:
                results["error"] = exc

        thread = threading.Thread(target=operate)
        thread.start()
        thread.join(1.0)  # the migration takes a second: longer than redis-py's retries
        assert "error" not in results, f"gave up during the migration: {results['error']!r}"
        assert thread.is_alive(), "finished while the keys could not be reached?"
        for _ in steps:  # the keys move, the slot changes hands
            pass
        thread.join(15)
        assert results == {"released": True, "permit released": True,
                           "acquired": results.get("acquired"), "released again": True}
        assert int(results["acquired"]) > lock.fencing_token  # type: ignore[call-overload]
    finally:
        for _ in steps:
            pass
        lock.release()
        permit.release()
        for _ in cluster.migrate_slot(slot, source):
            pass
