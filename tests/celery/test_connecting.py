"""How the Celery layer connects: the forms of ``rediskit_url``, ``rediskit_sentinel_master``,
``rediskit_cluster``, ``rediskit_redis_options``, a ready client (``RedisKit(app,
client=...)``), and the one client factory the runtime and the CLI share.

(Sentinel at work: test_sentinel.py; TLS and ACL users: test_tls.py; clusters: the cluster
tests.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click
import pytest
import redis
from celery import Celery
from click.testing import CliRunner
from redis.backoff import ConstantBackoff
from redis.retry import Retry

from celery_rediskit import ConfigurationError
from celery_rediskit.devserver import PrivateServer
from celery_rediskit.integration import RedisKit
from celery_rediskit.integration.cli import Ops, rediskit
from celery_rediskit.integration.settings import Settings

from . import readyapp

HERE = Path(__file__).parent
RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"
SENTINELS = "sentinel://10.0.0.1:26379;sentinel://10.0.0.2:26380"


def cli_ops(app: Celery) -> Ops:
    """What a ``celery -A app rediskit ...`` command works with (its client)."""
    return Ops(click.Context(rediskit, obj=SimpleNamespace(app=app)))


def cli(app: Celery, *args: str) -> Any:
    """Run ``celery -A app rediskit ARGS --json`` in this process; its JSON output."""
    result = CliRunner().invoke(rediskit, [*args, "--json"], obj=SimpleNamespace(app=app))
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.output)


def new_app(broker: str = RABBITMQ, **conf: Any) -> Celery:
    app = Celery("connect", broker=broker, set_as_current=False)
    app.conf.update(**conf)
    return app


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:6379/0", "rediscluster://127.0.0.1:7000", "sentinel:/127.0.0.1",
    "sentinel://127.0.0.1:26379;redis://127.0.0.1:6379", "127.0.0.1:6379",
])
def test_an_unknown_scheme_is_refused_naming_the_setting(url: str) -> None:
    with pytest.raises(ConfigurationError, match="rediskit_url"):
        RedisKit(new_app(), url=url)


def test_a_sentinel_url_needs_the_master_name() -> None:
    with pytest.raises(ConfigurationError, match="rediskit_sentinel_master"):
        RedisKit(new_app(), url=SENTINELS)
    kit = RedisKit(new_app(), url=SENTINELS, sentinel_master="mymaster")
    assert kit.settings.sentinel_master == "mymaster"
    assert kit.settings.sentinel_address().sentinels == (("10.0.0.1", 26379),
                                                         ("10.0.0.2", 26380))


def test_a_sentinel_url_passes_its_credentials_and_database_to_the_master() -> None:
    url = "sentinel://app:p%40ss@10.0.0.1:26379/3;sentinel://10.0.0.2"
    settings = Settings(url=url, sentinel_master="m")
    address = settings.sentinel_address()
    assert (address.username, address.password, address.db) == ("app", "p@ss", 3)
    assert address.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26379))


@pytest.mark.parametrize("via", ["broker", "result backend"])
def test_a_sentinel_broker_or_backend_is_inherited_with_its_transport_options(via: str) -> None:
    options = {"master_name": "mymaster", "sentinel_kwargs": {"password": "s3cret"}}
    if via == "broker":
        app = new_app(broker=SENTINELS, broker_transport_options=options)
    else:
        app = new_app(result_backend=SENTINELS, result_backend_transport_options=options)
    kit = RedisKit(app)
    assert kit.settings.url == SENTINELS
    assert kit.settings.sentinel_master == "mymaster"
    assert kit.settings.redis_options == {"sentinel_kwargs": {"password": "s3cret"}}
    # Listed failover URLs, as Celery also accepts them, are the same sentinels.
    listed = new_app(broker=SENTINELS.split(";"), broker_transport_options=options)
    assert RedisKit(listed).settings.url == SENTINELS


def test_rediskit_cluster_is_a_flag_for_a_node_url() -> None:
    assert Settings(url="redis://10.0.0.1:7000", cluster="true").cluster is True
    assert Settings(url="redis://10.0.0.1:7000", cluster="0").cluster is False
    with pytest.raises(ConfigurationError, match="rediskit_cluster must be True or False"):
        Settings(url="redis://10.0.0.1:7000", cluster="maybe")
    for url in ("unix:///run/redis.sock", SENTINELS):
        with pytest.raises(ConfigurationError, match="rediskit_cluster"):
            RedisKit(new_app(), url=url, cluster=True, sentinel_master="m")


def test_redis_options_reach_the_runtime_and_the_cli(redis_url: str) -> None:
    retry = Retry(ConstantBackoff(0.1), 2)
    app = new_app(rediskit_url=redis_url, rediskit_redis_options={
        "client_name": "rk-options", "health_check_interval": 7, "socket_keepalive": True,
        "retry": retry,
    })
    kit = RedisKit(app)
    client = kit.runtime().client
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["health_check_interval"], kwargs["socket_keepalive"]) == (7, True)
    assert kwargs["retry"] is retry
    assert client.client_getname() == "rk-options"  # the server saw the option
    lease = kit.runtime().mutex.acquire("res", timeout=5)
    lease.release()

    # The CLI's client: the same options, but short timeouts and no retries of its own.
    ops = cli_ops(app)
    assert ops.client.client_getname() == "rk-options"
    cli_kwargs = ops.client.connection_pool.connection_kwargs
    assert cli_kwargs["health_check_interval"] == 7
    retry = cli_kwargs["retry"]
    assert (retry.get_retries() if hasattr(retry, "get_retries") else retry._retries) == 0
    assert cli_kwargs["socket_timeout"] <= 3.0
    ops.client.close()


def test_an_option_the_client_does_not_take_is_refused_when_installing(redis_url: str) -> None:
    app = new_app(rediskit_url=redis_url, rediskit_redis_options={"no_such_option": 1})
    with pytest.raises(ConfigurationError, match="rediskit_redis_options.*no_such_option"):
        RedisKit(app)
    with pytest.raises(ConfigurationError, match="rediskit_redis_options"):
        RedisKit(new_app(rediskit_url=redis_url, rediskit_redis_options=["retry"]))
    # redis-py's RedisCluster would drop an option it does not take without a word.
    with pytest.raises(ConfigurationError, match="rediskit_redis_options.*no_such_option"):
        RedisKit(new_app(rediskit_url="redis://127.0.0.1:1/0", rediskit_cluster=True,
                         rediskit_redis_options={"no_such_option": 1}))


@pytest.fixture
def unix_server() -> Iterator[PrivateServer]:
    server = PrivateServer()
    server.extra_args = ("--unixsocket", str(server.pidfile.parent / "redis.sock"),
                         "--unixsocketperm", "700")
    with server:
        yield server


def test_a_unix_socket_url(unix_server: PrivateServer, prefix: str) -> None:
    socket_path = unix_server.pidfile.parent / "redis.sock"
    app = new_app(rediskit_url=f"unix://{socket_path}?db=2", rediskit_prefix=prefix)
    kit = RedisKit(app)
    lease = kit.runtime().mutex.acquire("res", timeout=5)
    assert [r["key"] for r in cli(app, "locks", "--no-ping")] == ["res"]
    assert cli_ops(app).where == f"unix://{socket_path}"
    lease.release()
    assert redis.Redis(unix_socket_path=str(socket_path), db=2).keys(f"{prefix}:*")


def test_a_ready_client_is_used_by_the_runtime_and_the_cli(redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url, client_name="rk-ready")
    app = new_app()  # a RabbitMQ broker and no rediskit_url: the client is all it needs
    kit = RedisKit(app, client=client, prefix=prefix)
    assert kit.settings.url is None
    assert kit.runtime().client is client
    lease = kit.runtime().mutex.acquire("res", timeout=5)
    assert cli_ops(app).client is client
    assert [r["key"] for r in cli(app, "locks", "--no-ping")] == ["res"]
    lease.release()
    client.close()


def test_a_ready_client_must_be_a_client(redis_url: str) -> None:
    with pytest.raises(ConfigurationError, match=r"RedisKit\(client=\.\.\.\) must be"):
        RedisKit(new_app(), client=redis_url)
    with pytest.raises(ConfigurationError, match="either url= or client="):
        RedisKit(new_app(), url=redis_url, client=redis.Redis.from_url(redis_url))


def test_prefork_children_use_the_ready_client_made_before_the_fork(
    redis_url: str, prefix: str
) -> None:
    env = dict(os.environ, RK_URL=redis_url, RK_PREFIX=prefix, PYTHONPATH=str(HERE))
    cmd = [sys.executable, "-m", "celery", "-A", "readyapp", "worker", "-P", "prefork",
           "-c", "2", "-n", f"ready-{prefix}@%h", "-Q", f"q-{prefix}", "-l", "warning",
           "--without-gossip", "--without-mingle", "--without-heartbeat"]
    worker = subprocess.Popen(cmd, env=env, cwd=HERE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    app = readyapp.build(redis_url, prefix)
    try:
        held = app.tasks["held"]
        results = [held.delay(run, 3 * readyapp.LEASE) for run in ("a", "b")]
        outcomes = [r.get(timeout=60) for r in results]
        pids = {pid for pid, _, _ in outcomes}
        assert worker.pid not in pids and len(pids) == 2  # two forked children
        assert [lost for _, lost, _ in outcomes] == [False, False]  # renewed in the children
    finally:
        worker.terminate()
        worker.wait(30)
        app.close()
