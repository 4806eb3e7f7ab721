"""The rate limiter on a 3-master Redis Cluster: one key per limiter, on every master."""

from __future__ import annotations

from redis.cluster import RedisCluster

from celery_rediskit import RedisRateLimitStorage, create_rate_limiter
from celery_rediskit._redis.keys import KeySpace
from celery_rediskit.report import read_rate_limiters
from tests.cluster.nodes import Cluster


def test_limiters_on_every_master_count_and_expire(
    cluster: Cluster, cluster_client: RedisCluster, cprefix: str
) -> None:
    keys = KeySpace(cprefix)
    names = cluster.names_per_master(keys.rate_limiter)
    assert len(names) == 3
    storage = RedisRateLimitStorage(cluster_client, prefix=cprefix)
    limiter = create_rate_limiter("10/s", burst=2, storage=storage)
    for port, (name,) in names.items():
        assert [limiter.try_acquire(name)[0] for _ in range(3)] == [True, True, False]
        assert limiter.acquire(name, timeout=1.0) > 0  # a reserved slot, then its sleep
        assert cluster.owner(keys.rate_limiter(name)).port == port
        assert 0 < cluster_client.pttl(keys.rate_limiter(name)) <= 300
        info = storage.get_rate_info(name)
        assert (info.rate, info.burst, info.remaining, info.active) == ("10/s", 2, 0, True)
    # The report finds them on every master (SCAN on each primary).
    slow = create_rate_limiter("1/m", storage=storage)
    for (name,) in names.values():
        slow.try_acquire(name)  # state for a minute: it outlives the report
    found = read_rate_limiters(cluster_client, cprefix)
    assert sorted(i.key for i in found) == sorted(n for (n,) in names.values())
    for name in (n for (n,) in names.values()):
        assert limiter.reset(name) and limiter.try_acquire(name) == (True, 0.0)
