"""The Celery layer on a Redis Cluster over TLS, as an ACL user confined to the prefix's keys
(``~<prefix>:*``) and channels (``&<prefix>:*``): tasks, limits, cached results with tags and
cross-process wake-ups (sharded subscriptions included) all stay inside what the user may do.
Certificates come from ``trustme``; the broker is a plain private Redis."""

from __future__ import annotations

import gc
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import trustme
from redis.cluster import RedisCluster

from celery_rediskit import RedisMutexStorage, create_mutex
from celery_rediskit._redis.keys import KeySpace
from celery_rediskit.devserver import PrivateCluster
from celery_rediskit.integration import RedisKit
from tests.celery.conftest import in_process_worker, make_app
from tests.celery.probe import Probe
from tests.cluster.conftest import _binary_or_skip
from tests.processes import Holder

WAIT = 30
PREFIX = f"rkt-{uuid.uuid4().hex[:6]}"
USER, PASSWORD = "kit", "kit-secret"


class TLSCluster:
    def __init__(self, cluster: PrivateCluster, folder: Path) -> None:
        self.cluster, self.folder = cluster, folder

    @property
    def ca(self) -> str:
        return str(self.folder / "ca.pem")

    @property
    def port(self) -> int:
        port = self.cluster.nodes[0].tls_port
        assert port is not None
        return port

    def client(self, **kwargs: Any) -> RedisCluster:
        """A TLS cluster client, as the confined user unless told otherwise."""
        kwargs.setdefault("username", USER)
        kwargs.setdefault("password", PASSWORD)
        return RedisCluster(host="127.0.0.1", port=self.port, ssl=True, ssl_ca_certs=self.ca,
                            socket_timeout=5.0, **kwargs)

    @property
    def url(self) -> str:
        """For tests/holder_proc.py (a cluster client from a URL)."""
        return (f"cluster+rediss://{USER}:{PASSWORD}@127.0.0.1:{self.port}/0"
                f"?ssl_ca_certs={self.ca}")


@pytest.fixture(scope="module")
def tls_cluster() -> Iterator[TLSCluster]:
    _binary_or_skip()
    folder = Path(tempfile.mkdtemp(prefix="rediskit-cltls-"))
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    cert.private_key_pem.write_to_path(str(folder / "key.pem"))
    cluster = PrivateCluster(masters=3,
                             tls=(folder / "ca.pem", folder / "cert.pem", folder / "key.pem"))
    try:
        cluster.start()
    except (OSError, redis.RedisError) as exc:  # a server built without TLS
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"no TLS cluster: {exc}")
    try:
        for node in cluster.nodes:  # ACL users are per node
            with node.client() as admin:
                admin.execute_command(
                    "ACL", "SETUSER", USER, "on", f">{PASSWORD}", "resetkeys", f"~{PREFIX}:*",
                    "resetchannels", f"&{PREFIX}:*", "+@all", "-@admin", "-@dangerous",
                )
        yield TLSCluster(cluster, folder)
    finally:
        cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)


def test_the_user_is_confined_to_the_prefix(tls_cluster: TLSCluster) -> None:
    client = tls_cluster.client()
    try:
        client.set(f"{PREFIX}:mine", 1)
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.set("elsewhere:key", 1)
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command("SPUBLISH", "elsewhere:wake:{x}:p", "hi")
    finally:
        client.close()


def test_celery_options_on_the_tls_cluster_as_the_confined_user(
    tls_cluster: TLSCluster, redis_url: str
) -> None:
    kit_client = tls_cluster.client()
    app = make_app(redis_url, PREFIX, client=kit_client)
    plain = redis.Redis.from_url(redis_url)

    @app.task(shared=False, singleton=True, singleton_key=("n",))
    def single(n: int) -> int:
        probe = Probe(plain, f"{PREFIX}:probe:single-{n}")
        probe.enter()
        time.sleep(0.02)
        probe.exit()
        return n

    @app.task(shared=False, concurrency_limit="tls-{n}:2")
    def limited(n: int) -> int:
        probe = Probe(plain, f"{PREFIX}:probe:limited-{n}")
        probe.enter()
        time.sleep(0.03)
        probe.exit()
        return n

    @app.task(shared=False, cache_ttl=60, cache_tags=["tls-tag"])
    def cached(n: int) -> int:
        Probe(plain, f"{PREFIX}:probe:cached").enter()
        return n * 2

    try:
        with in_process_worker(app, concurrency=6):
            results = [single.delay(n % 3) for n in range(9)]
            assert sorted(r.get(timeout=WAIT) for r in results) == sorted([0, 1, 2] * 3)
            results = [limited.delay(n % 2) for n in range(8)]
            assert sorted(r.get(timeout=WAIT) for r in results) == [0] * 4 + [1] * 4
            assert [cached.delay(n).get(timeout=WAIT) for n in range(6)] == [0, 2, 4, 6, 8, 10]
            assert [cached.delay(n).get(timeout=WAIT) for n in range(6)] == [0, 2, 4, 6, 8, 10]
            assert RedisKit.of(app).runtime().cache.revalidate_tag("tls-tag") == 6
            assert cached.delay(1).get(timeout=WAIT) == 2
            gc.collect()  # finalize AsyncResults while the broker is up
        for n in range(3):
            assert Probe(plain, f"{PREFIX}:probe:single-{n}").peak == 1
        for n in range(2):
            assert Probe(plain, f"{PREFIX}:probe:limited-{n}").peak <= 2
        assert Probe(plain, f"{PREFIX}:probe:cached").runs == 7
    finally:
        app.close()
        plain.close()
        kit_client.close()


@pytest.mark.usefixtures("no_stray_leases")
def test_cross_process_wakeups_as_the_confined_user(tls_cluster: TLSCluster) -> None:
    """The waiter subscribes (SSUBSCRIBE on its slot's channel) and the holder's release
    publishes (SPUBLISH inside the script) as the confined user, over TLS."""
    client = tls_cluster.client()
    keys = KeySpace(PREFIX)
    mutex = create_mutex(timeout=20, lease=30, storage=RedisMutexStorage(client, prefix=PREFIX))
    holder = Holder("mutex", tls_cluster.url, PREFIX, "tls-res", "30", "1")
    try:
        got: dict[str, float] = {}

        def wait() -> None:
            lease = mutex.acquire("tls-res")
            got["at"] = time.monotonic()
            lease.release()

        thread = threading.Thread(target=wait)
        thread.start()
        end = time.monotonic() + 10
        while not client.llen(keys.lock("tls-res").queue):
            assert time.monotonic() < end, "the waiter never queued"
            time.sleep(0.005)  # until the waiter is queued in Redis
        released = time.monotonic()
        assert holder.command("release").startswith("RELEASED True")
        thread.join(15)
        assert got and got["at"] - released < 1.0, "the waiter was not woken by the release"
    finally:
        holder.close()
        client.close()
