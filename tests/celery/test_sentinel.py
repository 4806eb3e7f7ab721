"""The Celery layer on Sentinel: ``rediskit_url = "sentinel://...;sentinel://..."`` with
``rediskit_sentinel_master``, or inherited from a Sentinel broker, and a singleton task that
keeps its lock through a failover (in-process workers; tests/faults/sentinel.py starts the
servers)."""

from __future__ import annotations

import threading
import time
from typing import Any

from celery import Celery

from celery_rediskit._redis.keys import KeySpace
from celery_rediskit.integration import RedisKit, lease_lost
from tests.faults.sentinel import MASTER_NAME, SentinelSetup, wait_until

from .conftest import WorkerFactory
from .test_connecting import cli, cli_ops

WAIT = 30


def kit_on_sentinel(broker: str, setup: SentinelSetup, prefix: str, **settings: Any) -> Celery:
    """An app whose broker and results are on ``broker`` and whose kit is on the setup."""
    app = Celery(f"snt-{prefix}", broker=broker, backend=broker, set_as_current=False)
    app.conf.update(task_default_queue=f"q-{prefix}", broker_connection_retry_on_startup=True,
                    worker_hijack_root_logger=False, result_expires=600)
    RedisKit(app, url=setup.url, sentinel_master=MASTER_NAME, prefix=prefix,
             retry_delay=0.1, **settings)
    return app


def test_a_singleton_task_with_the_kit_on_sentinel(
    sentinel_setup: SentinelSetup, redis_url: str, prefix: str, worker: WorkerFactory
) -> None:
    app = kit_on_sentinel(redis_url, sentinel_setup, prefix)
    master = sentinel_setup.node(sentinel_setup.master_port)
    running, finish = threading.Event(), threading.Event()

    @app.task(shared=False, bind=True, singleton=True, on_locked="skip")
    def single(self: Any, x: int) -> int:
        assert self.lease is not None and not self.lease.lost
        assert master.exists(KeySpace(prefix).lock(self.lease.key).lock)  # on the master
        running.set()
        assert finish.wait(WAIT)
        return x

    try:
        with worker(app, concurrency=2):
            first = single.delay(1)
            assert running.wait(WAIT)
            assert single.delay(1).get(timeout=WAIT) is None  # skipped: locked
            # The CLI reaches the same master through the sentinels.
            assert "Sentinel master" in cli_ops(app).where
            assert [r["kind"] for r in cli(app, "locks", "--no-ping")] == ["lock"]
            finish.set()
            assert first.get(timeout=WAIT) == 1
        assert cli(app, "locks", "--no-ping") == []
    finally:
        finish.set()
        app.close()


def test_the_kit_takes_a_sentinel_broker_as_its_redis(
    sentinel_setup: SentinelSetup, prefix: str, worker: WorkerFactory
) -> None:
    app = Celery(f"snt-{prefix}", broker=sentinel_setup.url, backend=sentinel_setup.url,
                 set_as_current=False)
    options = {"master_name": MASTER_NAME}
    app.conf.update(task_default_queue=f"q-{prefix}", broker_connection_retry_on_startup=True,
                    worker_hijack_root_logger=False, result_expires=600,
                    broker_transport_options=options, result_backend_transport_options=options)
    kit = RedisKit(app, prefix=prefix, retry_delay=0.1)
    assert (kit.settings.url, kit.settings.sentinel_master) == (sentinel_setup.url, MASTER_NAME)

    @app.task(shared=False, bind=True, singleton=True, concurrency_limit="db:1")
    def job(self: Any, x: int) -> int:
        assert self.lease is not None and not self.lease.lost
        return x * 2

    try:
        with worker(app, concurrency=2):
            assert [r.get(timeout=WAIT) for r in [job.delay(i) for i in range(3)]] == [0, 2, 4]
    finally:
        app.close()


def test_a_running_singleton_keeps_its_lock_through_a_failover(
    sentinel_setup: SentinelSetup, redis_url: str, prefix: str, worker: WorkerFactory
) -> None:
    setup = sentinel_setup
    lease_s = 3.0
    app = kit_on_sentinel(redis_url, setup, prefix, lease=lease_s)
    running, finish = threading.Event(), threading.Event()
    tokens: list[int] = []
    lost: list[str] = []

    def on_lost(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
        lost.append(str(task_id))

    lease_lost.connect(on_lost, weak=False)

    @app.task(shared=False, bind=True, singleton=True, singleton_key=(), on_locked="skip")
    def single(self: Any) -> bool:
        assert self.lease is not None
        tokens.append(self.lease.fencing_token)
        running.set()
        assert finish.wait(WAIT)
        return bool(self.lease.lost)

    try:
        with worker(app, concurrency=2):
            first = single.delay()
            assert running.wait(WAIT)
            assert setup.replicated()
            # The old master keeps serving the connections it has for longer than a lease.
            old, new = setup.failover(hold_demotion=True)
            end = time.monotonic() + lease_s + 1.0
            while time.monotonic() < end:
                assert not lost
                time.sleep(0.1)  # watching the lease over time
            setup.end_hold(old)
            # The lock is on the new master (renewed there).
            assert list(setup.node(new).scan_iter(match=f"{prefix}:lock:{{*}}"))
            assert single.delay().get(timeout=WAIT) is None  # still locked: skipped
            finish.set()
            assert first.get(timeout=WAIT) is False  # the body never saw its lease lost
            # Released on the new master: the next one runs, with a higher token.
            running.clear()
            finish.clear()
            second = single.delay()
            assert running.wait(WAIT)
            finish.set()
            assert second.get(timeout=WAIT) is False
        assert tokens[1] > tokens[0]
        assert not lost
        wait_until(lambda: not cli(app, "locks", "--no-ping"), "the lock is released")
    finally:
        finish.set()
        lease_lost.disconnect(on_lost)
        app.close()
