"""The Celery options with the kit on a 3-master Redis Cluster (``RedisKit(app, client=...)``)
and the broker on a plain private Redis: singleton (running and queued scopes), concurrency
limits and the result cache with tags, through an in-process worker, with keys on every
master; then the ``celery rediskit`` commands against the cluster."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from redis.cluster import RedisCluster

from celery_rediskit._redis.keys import KeySpace
from celery_rediskit._redis.slots import key_slot
from celery_rediskit.integration import RedisKit
from celery_rediskit.report import scan_keys
from tests.celery.conftest import in_process_worker, make_app
from tests.celery.probe import Probe
from tests.cluster.nodes import Cluster

HERE = Path(__file__).parent
WAIT = 30


class Kit:
    """The app (kit on the cluster), its worker's tasks, and probes on the plain Redis."""

    def __init__(self, app: Celery, plain: redis.Redis, prefix: str, cluster: Cluster) -> None:
        self.app, self.plain, self.prefix, self.cluster = app, plain, prefix, cluster
        self.keys = KeySpace(prefix)

    def probe(self, name: str) -> Probe:
        return Probe(self.plain, f"{self.prefix}:probe:{name}")

    def per_master(self, key_of: Callable[[Any], str], candidates: range) -> dict[int, Any]:
        """One candidate per master whose key ``key_of(candidate)`` lands there."""
        owners = self.cluster.slot_owners()
        found: dict[int, Any] = {}
        for value in candidates:
            found.setdefault(owners[key_slot(key_of(value))], value)
            if len(found) == 3:
                return found
        raise AssertionError("no candidate for some master")

    def lock_key(self, task: str, **kwargs: Any) -> str:
        t = self.app.tasks[task]
        policy = t._rk_policy
        return self.keys.lock(policy.singleton_name(t.name, policy.bind((), kwargs), (),
                                                    kwargs)).lock


@pytest.fixture(scope="module")
def kit(cluster: Cluster, redis_url: str) -> Iterator[Kit]:
    prefix = f"rkc-{uuid.uuid4().hex[:8]}"
    kit_client = cluster.client()
    app = make_app(redis_url, prefix, client=kit_client)
    plain = redis.Redis.from_url(redis_url)
    k = Kit(app, plain, prefix, cluster)

    @app.task(shared=False, name="single", singleton=True, singleton_key=("run",))
    def single(run: int, seconds: float = 0.02) -> int:
        p = k.probe(f"single-{run}")
        p.enter()
        time.sleep(seconds)
        p.exit()
        return run

    @app.task(shared=False, name="queued", singleton=True, singleton_scope="queued")
    def queued(run: int) -> int:
        return run

    @app.task(shared=False, name="limited", concurrency_limit="t-{tenant}:2")
    def limited(tenant: int) -> int:
        p = k.probe(f"limited-{tenant}")
        p.enter()
        time.sleep(0.03)
        p.exit()
        return tenant

    @app.task(shared=False, name="priced", cache_ttl=60, cache_key=("sku",),
              cache_tags=["sku:{sku}", "prices"])
    def priced(sku: int) -> int:
        k.probe("priced").enter()
        return sku * 10

    with in_process_worker(app, concurrency=6):
        yield k
    gc.collect()  # finalize AsyncResults while the broker is up (their __del__ talks to it)
    app.close()
    plain.close()
    kit_client.close()


def test_the_kit_runs_on_the_cluster_client(kit: Kit) -> None:
    assert isinstance(RedisKit.of(kit.app).runtime().client, RedisCluster)


def test_singleton_on_every_master(kit: Kit) -> None:
    runs = kit.per_master(lambda r: kit.lock_key("single", run=r), range(100))
    results = [kit.app.tasks["single"].delay(run) for run in runs.values() for _ in range(4)]
    assert sorted(r.get(timeout=WAIT) for r in results) == sorted(list(runs.values()) * 4)
    for run in runs.values():
        probe = kit.probe(f"single-{run}")
        assert (probe.peak, probe.runs) == (1, 4), f"run {run}: two bodies at once"
    client = RedisKit.of(kit.app).runtime().client
    assert not any(client.exists(kit.lock_key("single", run=r)) for r in runs.values())


def test_queued_scope_duplicates_get_the_first_id_on_every_master(kit: Kit) -> None:
    queued = kit.app.tasks["queued"]
    runs = kit.per_master(lambda r: kit.lock_key("queued", run=r), range(100))
    for run in runs.values():
        first = queued.apply_async((run,), countdown=0.5)  # queued for half a second at least
        again = queued.delay(run)
        assert again.id == first.id and again.rediskit_duplicate  # type: ignore[attr-defined]
        assert first.get(timeout=WAIT) == run


def test_concurrency_limit_on_every_master(kit: Kit) -> None:
    tenants = kit.per_master(lambda t: kit.keys.semaphore(f"t-{t}").holders, range(100))
    results = [kit.app.tasks["limited"].delay(t) for t in tenants.values() for _ in range(6)]
    assert sorted(r.get(timeout=WAIT) for r in results) == sorted(list(tenants.values()) * 6)
    for tenant in tenants.values():
        probe = kit.probe(f"limited-{tenant}")
        assert probe.runs == 6 and 1 <= probe.peak <= 2, f"tenant {tenant}: {probe.peak}"


def test_cached_results_and_tags_on_every_master(kit: Kit) -> None:
    priced = kit.app.tasks["priced"]
    runs = kit.probe("priced")
    skus = range(30)
    assert [priced.delay(s).get(timeout=WAIT) for s in skus] == [s * 10 for s in skus]
    assert runs.runs == 30
    assert [priced.delay(s).get(timeout=WAIT) for s in skus] == [s * 10 for s in skus]
    assert runs.runs == 30, "cached results were computed again"
    entries = {node.port: 0 for node in kit.cluster.primaries()}
    for node in kit.cluster.primaries():
        with node.client() as c:
            entries[node.port] = sum(1 for _ in scan_keys(c, f"{kit.prefix}:cache:e:*"))
    assert sum(entries.values()) == 30 and all(entries.values()), entries
    cache = RedisKit.of(kit.app).runtime().cache
    assert cache.revalidate_tag("sku:3") == 1
    assert priced.delay(3).get(timeout=WAIT) == 30 and runs.runs == 31
    assert cache.revalidate_tag("prices") == 30
    assert [priced.delay(s).get(timeout=WAIT) for s in skus] == [s * 10 for s in skus]
    assert runs.runs == 61


# -- the command line -----------------------------------------------------------------------

def _cli(kit: Kit, *args: str) -> subprocess.CompletedProcess[str]:
    broker = f"redis://127.0.0.1:{kit.plain.connection_pool.connection_kwargs['port']}/0"
    env = {**os.environ, "RK_BROKER": broker, "RK_CLUSTER": kit.cluster.url,
           "RK_PREFIX": kit.prefix, "PYTHONPATH": f"{HERE}:{HERE.parent.parent}"}
    cmd = [sys.executable, "-m", "celery", "-A", "clusterapp", "rediskit", *args]
    return subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=60)


def test_cli_sees_and_releases_locks_on_every_master(kit: Kit) -> None:
    rt = RedisKit.of(kit.app).runtime()
    names = kit.cluster.names_per_master(lambda n: kit.keys.lock(n).lock)
    held = [rt.mutex.acquire(f"{n}") for (n,) in names.values()]
    permit = rt.semaphore(3).acquire("cli-sem")
    try:
        shown = _cli(kit, "locks", "--no-ping", "--json")
        assert shown.returncode == 0, shown.stderr
        found = json.loads(shown.stdout)
        assert sorted(r["key"] for r in found if r["kind"] == "lock") == sorted(
            n for (n,) in names.values())
        assert [r["key"] for r in found if r["kind"] == "semaphore"] == ["cli-sem"]
        victim = held[0]
        released = _cli(kit, "release", victim.key, "--yes")
        assert released.returncode == 0 and "released lock" in released.stdout, released
        assert not rt.mutex_storage.is_locked(victim.key)
        stats = _cli(kit, "cache", "stats", "--json")
        assert stats.returncode == 0, stats.stderr
        assert json.loads(stats.stdout)["entries"] >= 0
    finally:
        for lease in held:
            lease.release()
        permit.release()
