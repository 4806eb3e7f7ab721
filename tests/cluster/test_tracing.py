"""``trace_commands`` on a Redis Cluster client: the library's scripts go through
``RedisCluster.execute_command`` (what tracing wraps) instead of straight to a node's pool."""

from __future__ import annotations

from typing import Any

from redis.cluster import RedisCluster

from celery_rediskit import RedisMutexStorage, create_mutex, trace_commands
from celery_rediskit._redis.scripts import load_script
from tests.cluster.nodes import Cluster


class RecordingCluster(RedisCluster):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.seen: list[Any] = []
        super().__init__(*args, **kwargs)

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        self.seen.append(args[:2])
        return super().execute_command(*args, **kwargs)


def test_traced_cluster_client_sends_through_execute_command(cluster: Cluster,
                                                             cprefix: str) -> None:
    client = RecordingCluster(startup_nodes=cluster.startup_nodes, socket_timeout=5.0)
    try:
        mutex = create_mutex(storage=RedisMutexStorage(client, prefix=cprefix), lease=30)
        names = ["a", "b", "c", "d"]  # spread over the masters
        for name in names:
            mutex.acquire(name).release()
        acquire, release = load_script("mutex_acquire").sha, load_script("mutex_release").sha
        assert ("EVALSHA", acquire) not in client.seen  # the lean path, straight to a node
        trace_commands(client)
        client.seen.clear()
        for name in names:
            mutex.acquire(name).release()
        assert client.seen.count(("EVALSHA", acquire)) == len(names)
        assert client.seen.count(("EVALSHA", release)) == len(names)
    finally:
        client.close()
