"""The mutex and the semaphore on a 3-master Redis Cluster: contended across threads and
processes, with a key on every master, and the report finding held resources on every master."""

from __future__ import annotations

import json
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
from celery_rediskit.report import read_resources
from tests.cluster.nodes import Cluster
from tests.processes import Holder, run_contenders

pytestmark = pytest.mark.usefixtures("no_stray_leases")


def _curl(cluster: Cluster) -> str:
    return "cluster+" + cluster.url


def test_mutex_excludes_across_processes_on_every_master(
    cluster: Cluster, cluster_client: RedisCluster, cprefix: str
) -> None:
    keys = KeySpace(cprefix)
    names = cluster.names_per_master(lambda n: keys.lock(n).lock)
    assert len(names) == 3
    for port, (name,) in names.items():
        outs = run_contenders(3, "mutex", _curl(cluster), cprefix, name, "1", "15")
        results = [json.loads(o) for o in outs]
        assert max(max(r["seen"]) for r in results) == 1, f"two holders at once on {port}"
        tokens = sorted(t for r in results for t in r["tokens"])
        assert len(set(tokens)) == len(tokens) == 45, "fencing tokens repeat"
        assert cluster.owner(keys.lock(name).lock).port == port


def test_semaphore_bound_holds_across_processes_on_every_master(
    cluster: Cluster, cluster_client: RedisCluster, cprefix: str
) -> None:
    keys = KeySpace(cprefix)
    names = cluster.names_per_master(lambda n: keys.semaphore(n).holders)
    for port, (name,) in names.items():
        outs = run_contenders(4, "semaphore", _curl(cluster), cprefix, name, "2", "10")
        seen = max(max(json.loads(o)["seen"]) for o in outs)
        assert 1 <= seen <= 2, f"more than 2 permits held at once on master {port}"


def test_release_wakes_a_waiter_of_another_process_on_every_master(
    cluster: Cluster, cluster_client: RedisCluster, cprefix: str
) -> None:
    """A holder in a child process; the waiter here is woken by the release, long before the
    holder's lease would end, for a key on each master (lock and semaphore)."""
    keys = KeySpace(cprefix)
    mutexes = RedisMutexStorage(cluster_client, prefix=cprefix)
    sems = RedisSemaphoreStorage(cluster_client, prefix=cprefix)
    cases = [
        ("mutex", create_mutex(timeout=20, lease=30, storage=mutexes),
         lambda n: keys.lock(n).queue,
         cluster.names_per_master(lambda n: keys.lock(n).lock)),
        ("semaphore", create_semaphore(permits=1, timeout=20, lease=30, storage=sems),
         lambda n: keys.semaphore(n).queue,
         cluster.names_per_master(lambda n: keys.semaphore(n).holders)),
    ]
    for kind, granter, queue_of, names in cases:
        for port, (name,) in names.items():
            holder = Holder(kind, _curl(cluster), cprefix, name, "30", "1")
            try:
                got: dict[str, float] = {}

                def wait(granter: object = granter, name: str = name,
                         got: dict[str, float] = got) -> None:
                    lease = granter.acquire(name)  # type: ignore[attr-defined]
                    got["at"] = time.monotonic()
                    lease.release()

                thread = threading.Thread(target=wait)
                thread.start()
                while not cluster_client.llen(queue_of(name)):
                    time.sleep(0.005)  # until the waiter is queued in Redis
                released = time.monotonic()
                assert holder.command("release").startswith("RELEASED True")
                thread.join(15)
                assert "at" in got, f"{kind} waiter on master {port} never got the grant"
                assert got["at"] - released < 2.0, (
                    f"{kind} waiter on master {port} was not woken by the release")
            finally:
                holder.close()


def test_report_finds_locks_and_semaphores_on_every_master(
    cluster: Cluster, cluster_client: RedisCluster, cprefix: str
) -> None:
    keys = KeySpace(cprefix)
    lock_names = [n for (n,) in cluster.names_per_master(lambda n: keys.lock(n).lock).values()]
    sem_names = [
        n for (n,) in cluster.names_per_master(lambda n: keys.semaphore(n).total).values()
    ]
    mutex = create_mutex(storage=RedisMutexStorage(cluster_client, prefix=cprefix))
    sem = create_semaphore(permits=2, storage=RedisSemaphoreStorage(cluster_client,
                                                                    prefix=cprefix))
    held = [mutex.acquire(n) for n in lock_names] + [sem.acquire(n) for n in sem_names]
    try:
        found = read_resources(cluster_client, cprefix)
        assert sorted(r.key for r in found if r.kind.resource == "lock") == sorted(lock_names)
        assert sorted(r.key for r in found if r.kind.resource == "semaphore") == sorted(
            sem_names)
        assert all(r.holders for r in found)
    finally:
        for lease in held:
            lease.release()
