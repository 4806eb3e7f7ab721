"""The Celery layer keeps every key and channel under its prefix: its Redis user may touch
nothing else (the broker and result backend use another, unrestricted connection)."""

from __future__ import annotations

import redis
from celery import Celery

from celery_rediskit.devserver import PrivateServer
from celery_rediskit.integration import RedisKit

from .conftest import WorkerFactory

PREFIX = "acl-celery"


def test_tasks_run_with_a_redis_user_confined_to_the_prefix(
    private_server: PrivateServer, worker: WorkerFactory
) -> None:
    admin = redis.Redis.from_url(private_server.url)
    admin.acl_setuser(
        "kit", enabled=True, passwords=["+s3cret"], keys=[f"{PREFIX}:*"],
        channels=[f"{PREFIX}:*"], commands=["+@all"],
    )
    app = Celery("acl", broker=private_server.url, backend=private_server.url,
                 set_as_current=False)
    app.conf.update(task_default_queue="q-acl", broker_connection_retry_on_startup=True,
                    worker_hijack_root_logger=False)
    RedisKit(app, url=f"redis://kit:s3cret@127.0.0.1:{private_server.port}/0", prefix=PREFIX,
             retry_delay=0.1)
    runs: list[int] = []

    @app.task(shared=False, singleton=True, singleton_scope="queued")
    def single(x: int) -> int:
        return x

    @app.task(shared=False, concurrency_limit="db:{x}:1")
    def limited(x: int) -> int:
        return x

    @app.task(shared=False, cache_ttl="1m", cache_tags=["x:{x}"])
    def cached(x: int) -> int:
        runs.append(x)
        return x

    kit_client = RedisKit.of(app).runtime().client
    assert kit_client.connection_pool.connection_kwargs["username"] == "kit"
    with worker(app):
        assert single.delay(1).get(timeout=20) == 1
        assert [r.get(timeout=20) for r in [limited.delay(i) for i in range(1, 4)]] == [1, 2, 3]
        assert cached.delay(7).get(timeout=20) == 7
        assert cached.delay(7).get(timeout=20) == 7
    assert runs == [7]
    ours = [k for k in admin.scan_iter(match="*") if k.startswith(PREFIX.encode())]
    assert ours, "the integration wrote its claims and cache under the prefix"
