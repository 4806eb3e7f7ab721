"""Concurrency limits, cached results, lost leases and a Redis restart on in-process workers."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from celery import Celery

from celery_rediskit.integration import RedisKit, lease_lost

from .conftest import make_app
from .probe import Probe

WAIT = 20


def test_limit_wait_mode_and_combined_limits_do_not_deadlock(app, worker, client,
                                                             prefix) -> None:
    db, api = Probe(client, prefix + ":db"), Probe(client, prefix + ":api")

    @app.task(shared=False, concurrency_limit="db:2", on_limited="wait", limit_timeout=10)
    def waits(i: int) -> int:
        db.enter()
        time.sleep(0.02)
        db.exit()
        return i

    # two tasks naming the same two limits in opposite orders: acquired in one global order
    @app.task(shared=False, concurrency_limit=["db:2", "api:1"], on_limited="wait")
    def both_a(i: int) -> int:
        api.enter()
        time.sleep(0.01)
        api.exit()
        return i

    @app.task(shared=False, concurrency_limit=["api:1", "db:2"], on_limited="wait")
    def both_b(i: int) -> int:
        api.enter()
        time.sleep(0.01)
        api.exit()
        return i

    with worker(app, concurrency=6):
        rs = [waits.delay(i) for i in range(12)]
        rs += [(both_a if i % 2 else both_b).delay(i) for i in range(12)]
        assert sorted(r.get(timeout=WAIT) for r in rs) == sorted([*range(12), *range(12)])
    assert db.peak <= 2 and db.runs == 12
    assert api.peak == 1 and api.runs == 12


def test_limit_template_takes_values_from_arguments(app, worker, client, prefix) -> None:
    probes = {t: Probe(client, f"{prefix}:t{t}") for t in (1, 2)}

    @app.task(shared=False, concurrency_limit="tenant:{tenant_id}:1")
    def job(tenant_id: int, i: int) -> int:
        probes[tenant_id].enter()
        time.sleep(0.02)
        probes[tenant_id].exit()
        return i

    with worker(app, concurrency=4):
        rs = [job.delay(1 + i % 2, i) for i in range(10)]
        assert sorted(r.get(timeout=WAIT) for r in rs) == list(range(10))
    assert all(p.peak == 1 and p.runs == 5 for p in probes.values())


def test_limit_requeue_does_not_use_up_max_retries(app, worker) -> None:
    @app.task(shared=False, concurrency_limit="one:1", max_retries=0)
    def job(i: int) -> int:
        time.sleep(0.05)
        return i

    with worker(app, concurrency=4):
        rs = [job.delay(i) for i in range(6)]
        assert sorted(r.get(timeout=WAIT) for r in rs) == list(range(6))


def test_cached_result(app, worker, client, prefix) -> None:
    probe = Probe(client, prefix + ":c")

    @app.task(shared=False, cache_ttl="5m", cache_key=("x",), cache_tags=["x:{x}"])
    def square(x: int, note: str = "") -> int:
        probe.enter()
        probe.exit()
        if x < 0:
            raise ValueError("negative")
        return x * x

    with worker(app):
        first_started = time.perf_counter()
        assert square.delay(4).get(timeout=WAIT) == 16
        first = time.perf_counter() - first_started
        hit_started = time.perf_counter()
        hit = square.delay(4, note="other note, same cache_key")
        assert hit.get(timeout=WAIT) == 16
        second = time.perf_counter() - hit_started
        assert probe.runs == 1 and second < first
        # send_task skips the enqueue-time lookup: the worker serves the hit without the body
        assert app.send_task(square.name, args=(4,)).get(timeout=WAIT) == 16
        assert probe.runs == 1
        # a failed call is not cached
        for _ in range(2):
            with pytest.raises(ValueError):
                square.delay(-1).get(timeout=WAIT)
        assert probe.runs == 3
        assert square.invalidate(4) is True
        assert square.delay(4).get(timeout=WAIT) == 16
        assert probe.runs == 4
        assert RedisKit.of(app).runtime().cache.revalidate_tag("x:4") == 1


def test_lease_lost_is_reported_to_the_task(redis_url: str, prefix: str, worker) -> None:
    app = make_app(redis_url, prefix, lease=0.6)
    lost = threading.Event()
    seen: list[Any] = []
    started, check = threading.Event(), threading.Event()

    @app.task(shared=False, bind=True, singleton=True)
    def job(self: Any) -> bool:
        started.set()
        check.wait(WAIT)
        return bool(self.lease.lost)

    def on_lost(sender: Any = None, task_id: str | None = None, lease: Any = None,
                reason: str = "", **_: Any) -> None:
        seen.append((sender, task_id, reason))
        lost.set()

    lease_lost.connect(on_lost, weak=False)
    try:
        with worker(app):
            result = job.delay()
            assert started.wait(WAIT)
            name = job._rk_policy.singleton_name(job.name, {}, (), {})
            RedisKit.of(app).runtime().mutex_storage.force_release(name)  # taken away
            assert lost.wait(WAIT)
            check.set()
            assert result.get(timeout=WAIT) is True
        assert seen[0][1] == result.id and seen[0][0].name == job.name
    finally:
        lease_lost.disconnect(on_lost)
        app.close()


def test_redis_restart_while_tasks_run(private_server: Any, redis_url: str, prefix: str,
                                       worker) -> None:
    # Only rediskit's Redis restarts: the broker and backend stay on the session server. (A
    # broker restart under an in-process worker races inside kombu's reconnect, about 1 run
    # in 10 under load; that is Celery's behaviour, not this library's.)
    app: Celery = make_app(redis_url, prefix, lease=1.0, url=private_server.url)
    app.conf.broker_transport_options = {"visibility_timeout": 600}
    lost = threading.Event()
    started, release = threading.Event(), threading.Event()

    @app.task(shared=False, bind=True, singleton=True, singleton_key=())
    def long(self: Any) -> bool:
        started.set()
        release.wait(WAIT)
        return bool(self.lease.lost)

    @app.task(shared=False, singleton=True)
    def short(x: int) -> int:
        return x

    def on_lost(**_: Any) -> None:
        lost.set()

    lease_lost.connect(on_lost, weak=False)
    try:
        with worker(app, concurrency=2):
            assert short.delay(1).get(timeout=WAIT) == 1
            long.delay()
            assert started.wait(WAIT)
            private_server.restart()  # no persistence: every key is gone
            assert lost.wait(WAIT)    # the running task's lock vanished: reported lost
            release.set()
            # the worker survived and new tasks work once Redis is back
            deadline = time.monotonic() + 30
            while True:
                try:
                    assert short.delay(2).get(timeout=5) == 2
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
    finally:
        lease_lost.disconnect(on_lost)
        app.close()
