"""Testing your own rediskit tasks (``examples/shop.py``) with the plugin.

``conftest.py`` opts in (``pytest_plugins = ["celery_rediskit.contrib.pytest"]``). Overriding
``rediskit_app`` with the project's app, built from ``rediskit_celery_config``, makes
``rediskit_worker`` run the project's own tasks: on the session's Redis (``REDIS_URL``, else
a private server), under a key prefix and queue of the test's own. ``rediskit_no_leaks``
fails the test if a lock or permit is still held when it ends.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import shop
from celery import Celery
from celery.signals import task_retry

WAIT = 20  # seconds: the most any step may take


@pytest.fixture
def rediskit_app(rediskit_celery_config: dict[str, Any]) -> Iterator[Celery]:
    app = shop.create_app(rediskit_celery_config)
    yield app
    app.close()


def test_one_sync_per_account_at_a_time(rediskit_app: Celery, rediskit_worker: Any,
                                        rediskit_no_leaks: None,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    started, gate = threading.Event(), threading.Event()

    def slow_fetch(account_id: int) -> dict[str, Any]:
        if account_id == 7:
            started.set()
            assert gate.wait(WAIT)
        return {"id": account_id}

    monkeypatch.setattr(shop, "fetch_account", slow_fetch)
    sync = rediskit_app.tasks["shop.sync_account"]
    first = sync.delay(7)
    assert started.wait(WAIT)  # the first sync of account 7 runs, and holds its lock
    assert sync.delay(7).get(timeout=WAIT) is None  # a duplicate meanwhile is skipped
    assert sync.delay(8).get(timeout=WAIT) == "synced 8"  # another account is not held up
    gate.set()
    assert first.get(timeout=WAIT) == "synced 7"
    assert sync.delay(7).get(timeout=WAIT) == "synced 7"  # the lock was freed


def test_at_most_two_reports_at_once(rediskit_app: Celery, rediskit_worker: Any,
                                     rediskit_no_leaks: None,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    changed, gate = threading.Condition(), threading.Event()
    state = {"running": 0, "peak": 0, "requeued": 0}

    def slow_query(day: int) -> int:
        with changed:
            state["running"] += 1
            state["peak"] = max(state["peak"], state["running"])
            changed.notify_all()
        assert gate.wait(WAIT)
        with changed:
            state["running"] -= 1
        return day

    def on_retry(sender: Any = None, **_: Any) -> None:  # a limited task is re-queued
        if getattr(sender, "name", None) == "shop.daily_report":
            with changed:
                state["requeued"] += 1
                changed.notify_all()

    monkeypatch.setattr(shop, "run_report_query", slow_query)
    task_retry.connect(on_retry, weak=False)
    try:
        report = rediskit_app.tasks["shop.daily_report"]
        results = [report.delay(day) for day in range(5)]
        with changed:  # two run; the worker's other threads meet the limit and re-queue
            assert changed.wait_for(lambda: state["running"] == 2 and state["requeued"] > 0,
                                    timeout=WAIT)
        gate.set()
        assert sorted(r.get(timeout=WAIT) for r in results) == list(range(5))
    finally:
        task_retry.disconnect(on_retry)
    assert state["peak"] == 2
