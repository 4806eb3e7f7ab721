"""A cluster primary killed (SIGKILL) and its replica promoted, while leases are held on it.

What must hold (the README's table, row "Replication with failover"): the library reconnects
to the promoted replica; a lease whose grant reached the replica stays held and renewed, one
whose grant did not is reported lost, by its lease's end at the latest; nothing blocks longer
than a lease; fencing tokens keep rising across the failover. A second grant of the lost key
is possible (replication is asynchronous) and is fenced above the first.

The lost grant is made deterministic: the victim's replica is paused (SIGSTOP) and its link cut
(``CLIENT KILL TYPE replica``) just before that grant, the victim is killed right after it,
then the replica resumes: it was out of touch for milliseconds, well within what lets it be
promoted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from celery_rediskit import (
    RedisMutexStorage,
    RedisSemaphoreStorage,
    create_mutex,
    create_semaphore,
)
from celery_rediskit._redis.keys import KeySpace
from celery_rediskit._redis.slots import key_slot
from celery_rediskit.lease import Lease, process_id
from tests.cluster.conftest import _binary_or_skip
from tests.cluster.nodes import Cluster
from tests.processes import Holder

LEASE = 6.0


@pytest.fixture
def replicated() -> Iterator[Cluster]:
    """3 masters with a replica each; a master unreachable for 1 s is failed over."""
    _binary_or_skip()
    with Cluster(masters=3, replicas=1, node_timeout=1000) as made:
        yield made


def test_primary_killed_replica_promoted(replicated: Cluster) -> None:
    cluster = replicated
    prefix = "fo"
    keys = KeySpace(prefix)
    client = cluster.client(socket_timeout=2.0, socket_connect_timeout=1.0)
    lost: dict[str, tuple[float, str]] = {}

    def on_lost(lease: Lease, reason: str) -> None:
        lost[lease.key] = (time.monotonic(), reason)

    mutex = create_mutex(timeout=LEASE, lease=LEASE, on_lost=on_lost,
                         storage=RedisMutexStorage(client, prefix=prefix))
    sem = create_semaphore(permits=2, timeout=LEASE, lease=LEASE, on_lost=on_lost,
                           storage=RedisSemaphoreStorage(client, prefix=prefix))
    victim = cluster.primaries()[0]
    kept_name, lost_name, sem_name = cluster.names_per_master(
        lambda n: keys.lock(n).lock, count=3)[victim.port]
    replica = cluster.replica_of(victim)
    held = [mutex.acquire(kept_name), sem.acquire(sem_name)]
    kept, permit = held
    try:
        with victim.client() as direct:
            assert direct.execute_command("WAIT", 1, 5000) == 1  # these grants reached it
            replica.pause()  # so that it cannot connect again at once
            try:
                direct.execute_command("CLIENT", "KILL", "TYPE", "replica")
                doomed = mutex.acquire(lost_name)  # not copied: no replica is connected
                held.append(doomed)
                assert direct.info("replication")["connected_slaves"] == 0
                victim.kill()
            finally:
                replica.resume()
        killed = time.monotonic()
        # A waiter blocked on a key of the killed master returns within its timeout (a
        # lease), whether the failover is over by then or not.
        waited: dict[str, object] = {}

        def wait() -> None:
            started = time.monotonic()
            try:
                other = mutex.acquire(kept_name, timeout=LEASE)
                other.release()
                waited["result"] = "granted"
            except Exception as exc:  # LockTimeout, or a connection error mid-failover
                waited["result"] = repr(exc)
            waited["took"] = time.monotonic() - started

        thread = threading.Thread(target=wait)
        thread.start()
        cluster.wait_promoted(replica, timeout=30)
        promoted = time.monotonic()
        thread.join(LEASE + 10)
        assert not thread.is_alive() and float(waited["took"]) < LEASE + 2.0, waited
        # The grant that never reached the replica is reported lost, by its lease's end.
        end = time.monotonic() + LEASE + 5
        while lost_name not in lost:
            assert time.monotonic() < end, "the lost grant was never reported"
            time.sleep(0.02)  # the renewer's tick: nothing to wait on but the callback
        assert doomed.lost
        assert lost[lost_name][0] - killed < LEASE + 1.0, lost[lost_name]
        # The copied grants survive: renewed on the promoted replica.
        with replica.client() as new_master:
            assert new_master.get(keys.lock(kept_name).lock) == kept.owner.encode()
            assert new_master.exists(keys.lock(lost_name).lock) == 0
        renewed_after = promoted + LEASE / 3 + 1.0
        while time.monotonic() < renewed_after and not (kept.lost or permit.lost):
            time.sleep(0.05)  # let at least one renewal tick run on the new master
        assert not kept.lost and not permit.lost, lost
        assert mutex.get_lock_info(kept_name).ttl > LEASE / 2
        assert permit.owner in sem.get_semaphore_info(sem_name).holders
        # The lost key is granted again (the double grant the table allows), fenced higher.
        again = mutex.acquire(lost_name, timeout=LEASE)
        held.append(again)
        assert again.fencing_token > doomed.fencing_token
        # Wake-ups follow the slot to the promoted replica: the waiter above subscribed on
        # the killed master; a grant from another process now reaches a waiter here at once.
        assert kept.release()
        holder = Holder("mutex", "cluster+" + cluster.url, prefix, kept_name, str(LEASE), "1")
        try:
            got: dict[str, float] = {}

            def wait_kept() -> None:
                lease = mutex.acquire(kept_name, timeout=LEASE)
                got["at"], got["token"] = time.monotonic(), lease.fencing_token
                lease.release()

            waiter = threading.Thread(target=wait_kept)
            waiter.start()
            while not client.llen(keys.lock(kept_name).queue):
                time.sleep(0.005)  # until the waiter is queued in Redis
            released = time.monotonic()
            assert holder.command("release").startswith("RELEASED True")
            waiter.join(LEASE + 5)
            assert got and got["at"] - released < 1.0, "no prompt wake-up after the failover"
            assert got["token"] > holder.token > kept.fencing_token
            channel = keys.sharded_wake_prefix(key_slot(keys.lock(kept_name).lock))
            with replica.client() as new_master:
                subscribed = new_master.execute_command(
                    "PUBSUB", "SHARDNUMSUB", channel + process_id())[1]
            assert subscribed == 1
        finally:
            holder.close()
    finally:
        for lease in held:
            lease.release()
        client.close()
