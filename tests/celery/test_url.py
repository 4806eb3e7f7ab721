"""Where the integration's Redis comes from: ``rediskit_url``, else a Redis broker, else a
Redis result backend (the common RabbitMQ broker + Redis results setup), with the TLS options
of the URL taken."""

from __future__ import annotations

import socket
import ssl
import uuid
from typing import Any

import pytest
from celery import Celery

from celery_rediskit import ConfigurationError
from celery_rediskit.integration import RedisKit
from tests.celery.conftest import WorkerFactory
from tests.conftest import TLSServer

RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"


def _rabbitmq_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1.0):
            return True
    except OSError:
        return False


def test_a_redis_result_backend_is_taken_when_the_broker_is_not_redis(redis_url: str) -> None:
    app = Celery("u", broker=RABBITMQ, backend=redis_url, set_as_current=False)
    assert RedisKit(app).settings.url == redis_url


def test_a_redis_broker_wins_over_a_redis_backend(redis_url: str) -> None:
    other = redis_url.rsplit("/", 1)[0] + "/3"
    app = Celery("u", broker=redis_url, backend=other, set_as_current=False)
    assert RedisKit(app).settings.url == redis_url


def test_neither_redis_names_the_setting() -> None:
    app = Celery("u", broker=RABBITMQ, backend="rpc://", set_as_current=False)
    with pytest.raises(ConfigurationError, match="rediskit_url.*neither the broker nor the "
                                                 "result backend"):
        RedisKit(app)


@pytest.mark.parametrize("via", ["broker", "backend"])
def test_the_tls_options_of_the_url_taken_are_inherited(tls_server: TLSServer, via: str) -> None:
    url = f"rediss://localhost:{tls_server.port}/0"
    options = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(tls_server.ca_file)}
    if via == "broker":
        app = Celery("tls", broker=url, set_as_current=False)
        app.conf.broker_use_ssl = options
    else:
        app = Celery("tls", broker=RABBITMQ, backend=url, set_as_current=False)
        app.conf.redis_backend_use_ssl = options
    kit = RedisKit(app, prefix=f"tls-{uuid.uuid4().hex[:6]}")
    client = kit.runtime().client
    # The server's certificate is signed by a CA only the inherited options name: without
    # them verification fails, so a working lock proves they were used.
    assert client.ping()
    lease = kit.runtime().mutex.acquire("res", timeout=5)
    assert lease.fencing_token >= 1
    lease.release()


def test_tasks_run_with_a_rabbitmq_broker_and_redis_results(
    redis_url: str, prefix: str, worker: WorkerFactory
) -> None:
    if not _rabbitmq_up():
        pytest.skip("RabbitMQ is not running on 127.0.0.1:5672 (this test needs a real broker)")
    app = Celery(f"rmq-{prefix}", broker=RABBITMQ, backend=redis_url, set_as_current=False)
    app.conf.update(task_default_queue=f"q-{prefix}", worker_hijack_root_logger=False,
                    broker_connection_retry_on_startup=True, broker_heartbeat=0)
    kit = RedisKit(app, prefix=prefix)
    assert kit.settings.url == redis_url

    @app.task(shared=False, bind=True, singleton=True, concurrency_limit="db:1")
    def job(self: Any, x: int) -> int:
        assert self.lease is not None and not self.lease.lost
        return x * 2

    try:
        with worker(app, concurrency=2):
            assert [r.get(timeout=30) for r in [job.delay(i) for i in range(4)]] == [0, 2, 4, 6]
    finally:
        app.close()
