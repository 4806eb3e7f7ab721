"""ACL credentials and TLS (rediss://), and proof that every key and channel is under the prefix.

The ACL user may touch only ``<prefix>:*`` keys and publish/subscribe only ``<prefix>:*``
channels: any script or command reaching outside the prefix fails with NOPERM.
"""

from __future__ import annotations

import threading

import pytest
import redis

from celery_rediskit import (
    RedisMutexStorage,
    RedisSemaphoreStorage,
    create_mutex,
    create_semaphore,
)
from celery_rediskit.cache import RedisCacheProvider, cache_tag, cached, revalidate_tag
from celery_rediskit.devserver import PrivateServer
from celery_rediskit.report import read_resources
from tests.conftest import TLSServer

PREFIX = "acl-app"


def exercise(client: redis.Redis, prefix: str) -> None:
    """Every primitive, including a contended handoff (pub/sub) and the cache's tag index."""
    mutex = create_mutex(timeout=5, lease=5, storage=RedisMutexStorage(client, prefix))
    sem = create_semaphore(permits=1, timeout=5, storage=RedisSemaphoreStorage(client, prefix))
    got = threading.Event()

    def waiter() -> None:
        with mutex.lock("res"), sem.permit("db"):
            got.set()

    with mutex.lock("res"), sem.permit("db"):
        thread = threading.Thread(target=waiter)
        thread.start()
        while not client.llen(f"{prefix}:lock:{{res}}:queue"):
            pass  # until the waiter is queued: the handoff is what is tested
        assert {r.key for r in read_resources(client, prefix)} == {"res", "db"}
    thread.join(5)
    assert got.is_set()

    provider = RedisCacheProvider(client, prefix=prefix)
    calls: list[int] = []

    @cached(ttl=60, provider=provider)
    def user(uid: int) -> dict[str, int]:
        cache_tag(f"user:{uid}")
        calls.append(uid)
        return {"id": uid}

    assert user(1) == user(1) == {"id": 1} and calls == [1]
    revalidate_tag("user:1", provider=provider)
    assert user(1) == {"id": 1} and calls == [1, 1]
    assert provider.clear() >= 1


def test_an_acl_user_limited_to_the_prefix_can_do_everything(
    private_server: PrivateServer,
) -> None:
    admin = redis.Redis.from_url(private_server.url)
    admin.acl_setuser(
        "app", enabled=True, passwords=["+s3cret"], keys=[f"{PREFIX}:*"],
        channels=[f"{PREFIX}:*"], commands=["+@all"],
    )
    url = f"redis://app:s3cret@127.0.0.1:{private_server.port}/0"
    client = redis.Redis.from_url(url)
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.set("outside", 1)  # the restriction is real
    exercise(client, PREFIX)
    assert admin.dbsize() == len(list(admin.scan_iter(match=f"{PREFIX}:*")))


def test_tls_with_acl_credentials(tls_server: TLSServer) -> None:
    server, tls_port = tls_server.server, tls_server.port
    redis.Redis.from_url(server.url).acl_setuser(
        "app", enabled=True, passwords=["+s3cret"], keys=[f"{PREFIX}:*"],
        channels=[f"{PREFIX}:*"], commands=["+@all"],
    )
    url = (f"rediss://app:s3cret@localhost:{tls_port}/0"
           f"?ssl_ca_certs={tls_server.ca_file}&ssl_cert_reqs=required")
    client = redis.Redis.from_url(url)
    assert client.connection_pool.connection_class is redis.SSLConnection
    exercise(client, PREFIX)
