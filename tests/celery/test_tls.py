"""The Celery layer over TLS (certificates made by ``trustme``), as an ACL user confined to the
prefix's keys (``~<prefix>:*``) and channels (``&<prefix>:*``): on a single node whose TLS
port asks clients for a certificate, and on Sentinel with every node, replication and sentinel
on TLS only. The broker and result backend stay on a plain, unrestricted connection.

(The primitives over TLS with an ACL user: tests/test_security.py; clusters: the cluster
tests.)
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from celery_rediskit.devserver import PrivateServer, free_port
from celery_rediskit.integration import RedisKit
from tests.faults.sentinel import MASTER_NAME, SentinelSetup, stop_process
from tests.faults.tls import TLSFiles

from .conftest import WorkerFactory
from .test_connecting import cli, cli_ops

PREFIX = "tls-app"
WAIT = 30


def confine(admin: redis.Redis) -> None:
    """Create user ``kit`` (password ``s3cret``), confined to the prefix's keys and channels."""
    admin.acl_setuser("kit", enabled=True, passwords=["+s3cret"], keys=[f"{PREFIX}:*"],
                      channels=[f"{PREFIX}:*"], commands=["+@all"])


def run_tasks(app: Celery, worker: WorkerFactory) -> None:
    """A singleton (with a contended duplicate), a limited and a cached task, and the CLI."""
    runs: list[int] = []
    running, finish = threading.Event(), threading.Event()

    @app.task(shared=False, bind=True, singleton=True, singleton_key=())
    def single(self: Any) -> int:
        assert self.lease is not None and not self.lease.lost
        running.set()
        assert finish.wait(WAIT)
        return int(self.lease.fencing_token)

    @app.task(shared=False, concurrency_limit="db:{x}:1", on_limited="wait")
    def limited(x: int) -> int:
        return x

    @app.task(shared=False, cache_ttl="1m", cache_tags=["x:{x}"])
    def cached(x: int) -> int:
        runs.append(x)
        return x

    try:
        with worker(app, concurrency=3):
            first = single.delay()
            assert running.wait(WAIT)
            second = single.delay()  # locked: re-queued until the first ends
            assert [r["kind"] for r in cli(app, "locks", "--no-ping")] == ["lock"]
            finish.set()
            assert second.get(timeout=WAIT) > first.get(timeout=WAIT)
            assert [r.get(timeout=WAIT) for r in [limited.delay(i) for i in (1, 2, 3)]] == [
                1, 2, 3]
            assert cached.delay(7).get(timeout=WAIT) == cached.delay(7).get(timeout=WAIT) == 7
        assert runs == [7]
    finally:
        finish.set()
    # The user is confined: its client can't write outside the prefix.
    with pytest.raises(redis.exceptions.NoPermissionError):
        cli_ops(app).client.set("outside", 1)


def plain_app(broker: str) -> Celery:
    app = Celery("tls", broker=broker, backend=broker, set_as_current=False)
    app.conf.update(task_default_queue=f"q-{PREFIX}", broker_connection_retry_on_startup=True,
                    worker_hijack_root_logger=False, result_expires=600)
    return app


class MutualTLSServer:
    """A private server with a plain port (admin, broker) and a TLS port that requires a
    client certificate signed by the CA."""

    def __init__(self, files: TLSFiles) -> None:
        self.tls_port = free_port()
        self.server = PrivateServer(extra_args=(
            "--tls-port", str(self.tls_port), *files.server_args(auth_clients=True)))


@pytest.fixture
def mtls_server(tls_files: TLSFiles) -> Iterator[MutualTLSServer]:
    made = MutualTLSServer(tls_files)
    try:
        made.server.start()
    except (subprocess.CalledProcessError, redis.ConnectionError) as exc:
        made.server.stop()
        pytest.skip(f"{made.server.binary} cannot serve TLS here: {exc}")
    yield made
    pid = made.server.pid()
    if pid is not None:
        stop_process(pid, kill=True)
    shutil.rmtree(made.server.pidfile.parent, ignore_errors=True)


@pytest.mark.parametrize("via", ["rediskit_ssl", "rediskit_redis_options"])
def test_tls_with_a_client_certificate_and_a_confined_user_on_one_node(
    mtls_server: MutualTLSServer, tls_files: TLSFiles, worker: WorkerFactory, via: str
) -> None:
    admin = redis.Redis.from_url(mtls_server.server.url)
    confine(admin)
    app = plain_app(mtls_server.server.url)
    options = tls_files.client_options(with_cert=True)
    url = f"rediss://kit:s3cret@localhost:{mtls_server.tls_port}/0"
    if via == "rediskit_ssl":
        app.conf.rediskit_ssl = options
    else:
        app.conf.rediskit_redis_options = options
    RedisKit(app, url=url, prefix=PREFIX, retry_delay=0.1)
    # Without the client certificate, the server refuses the connection.
    bare = {k: v for k, v in options.items() if k not in ("ssl_certfile", "ssl_keyfile")}
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, **bare).ping()
    try:
        run_tasks(app, worker)
    finally:
        app.close()
    ours = [k for k in admin.scan_iter(match=f"{PREFIX}:*")]
    assert ours, "the integration wrote its claims and cache under the prefix"


def test_tls_and_a_confined_user_on_sentinel(
    tls_sentinel_setup: SentinelSetup, tls_files: TLSFiles, redis_url: str,
    worker: WorkerFactory
) -> None:
    setup = tls_sentinel_setup
    for port in setup.ports:  # ACL users are not replicated: each node gets its own
        confine(setup.node(port))
    first, *others = setup.sentinel_addresses()
    url = ";".join([f"sentinel://kit:s3cret@{first[0]}:{first[1]}",
                    *(f"sentinel://{h}:{p}" for h, p in others)])
    app = plain_app(redis_url)
    tls = tls_files.client_options()
    # TLS to the master (rediskit_ssl) and to the sentinels (sentinel_kwargs).
    RedisKit(app, url=url, sentinel_master=MASTER_NAME, prefix=PREFIX, retry_delay=0.1,
             ssl=tls, redis_options={"sentinel_kwargs": {"ssl": True, **tls}})
    client = cli_ops(app).client
    assert client.connection_pool.connection_kwargs["username"] == "kit"
    try:
        run_tasks(app, worker)
    finally:
        app.close()
    master = setup.node(setup.master_port)
    assert list(master.scan_iter(match=f"{PREFIX}:*"))
