"""Blocked tasks back off: each re-queue of a locked or limited task waits longer (doubling,
bounded, jittered), driven by its own re-queue count, and a task's own Celery retry options
(``retry_backoff``, ``retry_backoff_max``, ``retry_jitter``) are honoured."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery, signals

from celery_rediskit.integration import RedisKit
from celery_rediskit.integration.backoff import requeue_countdown
from tests.celery.conftest import WorkerFactory, make_app


@pytest.mark.parametrize(("options", "requeues", "low", "high"), [
    ({}, 0, 0.5, 1.0),
    ({}, 3, 4.0, 8.0),
    ({}, 10, 15.0, 30.0),                                  # the ceiling (rediskit_retry_delay_max)
    ({"retry_backoff": True}, 2, 2.0, 4.0),                # Celery's factor 1 s
    ({"retry_backoff": 5}, 1, 5.0, 10.0),
    ({"retry_backoff": 5, "retry_backoff_max": 7}, 4, 3.5, 7.0),
    ({"retry_backoff": 2, "retry_jitter": False}, 3, 16.0, 16.0),
    ({"retry_backoff": True, "retry_jitter": False}, 20, 600.0, 600.0),  # Celery's default max
])
def test_countdowns_double_up_to_a_ceiling_and_honour_the_tasks_options(
    options: dict[str, Any], requeues: int, low: float, high: float
) -> None:
    task = SimpleNamespace(**options)
    lowest = requeue_countdown(task, requeues, first=1.0, ceiling=30.0, rand=lambda: 0.0)
    highest = requeue_countdown(task, requeues, first=1.0, ceiling=30.0, rand=lambda: 1.0)
    assert (lowest, highest) == (pytest.approx(low), pytest.approx(high))


def test_a_locked_task_backs_off_further_with_each_requeue(
    redis_url: str, prefix: str, worker: WorkerFactory
) -> None:
    app: Celery = make_app(redis_url, prefix, retry_delay=0.05, retry_delay_max=0.4)
    countdowns: list[float] = []
    enough = threading.Event()

    @app.task(shared=False, singleton=True, singleton_key=())
    def job() -> str:
        return "ran"

    def on_retry(sender: Any = None, reason: Any = None, **_: Any) -> None:
        if sender is not None and sender.name == job.name:
            countdowns.append(float(reason.when))
            if len(countdowns) >= 6:
                enough.set()

    signals.task_retry.connect(on_retry, weak=False)
    runtime = RedisKit.of(app).runtime()
    name = job._rk_policy.singleton_name(job.name, {}, (), {})
    held = runtime.mutex.acquire(name)  # the lock is taken: every attempt is re-queued
    try:
        with worker(app, concurrency=2):
            result = job.delay()
            assert enough.wait(30), f"only {len(countdowns)} re-queues seen"
            held.release()
            assert result.get(timeout=30) == "ran"
    finally:
        signals.task_retry.disconnect(on_retry)
        app.close()
    steps = [min(0.4, 0.05 * 2 ** n) for n in range(6)]
    for n, (seen, step) in enumerate(zip(countdowns, steps, strict=False)):
        assert step / 2 <= seen <= step + 1e-9, (n, seen, step, countdowns)
