"""Custom task events from a real ``celery worker -P prefork -E``, read by a real
``app.events.Receiver``: ``task-requeued`` and ``task-skipped`` leave the pool process that
runs the task, and ``celery.events.State`` (what Flower builds on) shows them."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, states

from celery_rediskit.integration import RedisKit

from .observeapp import WorkerProcess, build

WAIT = 30


class Capture:
    """A receiver of every event of the app's broker, in a thread, listening once our own
    marker event comes back."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.events: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.conn = app.connection_for_read()
        self.receiver = app.events.Receiver(self.conn, handlers={"*": self._on_event})
        self.thread = threading.Thread(
            target=self.receiver.capture,
            kwargs={"limit": None, "timeout": None, "wakeup": False}, daemon=True)
        self.thread.start()
        with app.events.default_dispatcher() as dispatcher:
            deadline = time.monotonic() + WAIT
            while not self.of("rediskit-test-marker"):
                assert time.monotonic() < deadline, "the event receiver never listened"
                dispatcher.send("rediskit-test-marker")
                with self.cond:
                    self.cond.wait(0.05)

    def _on_event(self, event: dict[str, Any]) -> None:
        with self.cond:
            self.events.append(event)
            self.cond.notify_all()

    def of(self, kind: str, task_id: str | None = None) -> list[dict[str, Any]]:
        with self.cond:
            return [e for e in self.events if e["type"] == kind
                    and (task_id is None or e.get("uuid") == task_id)]

    def wait_for(self, kind: str, task_id: str, count: int = 1) -> list[dict[str, Any]]:
        deadline = time.monotonic() + WAIT
        with self.cond:
            while len(found := self.of(kind, task_id)) < count:
                left = deadline - time.monotonic()
                assert left > 0, f"no {kind} event for {task_id}"
                self.cond.wait(left)
        return found

    def of_task(self, task_id: str) -> list[dict[str, Any]]:
        with self.cond:
            return [e for e in self.events if e.get("uuid") == task_id]

    def close(self) -> None:
        self.receiver.should_stop = True
        self.thread.join(10)
        self.conn.release()


@pytest.fixture(scope="module")
def worker_app(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Celery]:
    prefix = f"rkev-{uuid.uuid4().hex[:8]}"
    app = build(redis_url, prefix)
    worker = WorkerProcess(redis_url, prefix, tmp_path_factory.mktemp("ev") / "worker.log")
    try:
        worker.wait_ready(app)
        yield app
    finally:
        worker.stop()
        app.close()


@pytest.fixture
def capture(worker_app: Celery) -> Iterator[Capture]:
    c = Capture(worker_app)
    yield c
    c.close()


def _lock_name(app: Celery, task: str, key: str) -> str:
    t = app.tasks[task]
    p = t._rk_policy
    return str(p.singleton_name(t.name, p.bind((key,), {}), (key,), {}))


def test_requeue_sends_task_requeued(worker_app: Celery, capture: Capture) -> None:
    app = worker_app
    key = uuid.uuid4().hex
    name = _lock_name(app, "blocked", key)
    with RedisKit.of(app).runtime().mutex.acquire(name, blocking=False):
        result = app.tasks["blocked"].delay(key)
        first, second = capture.wait_for("task-requeued", result.id, 2)
    assert result.get(timeout=WAIT) > 0
    assert (first["reason"], first["key"], first["requeues"]) == ("locked", name, 0)
    assert first["name"] == "singleton:blocked" and second["requeues"] == 1
    assert 0 < first["countdown"] <= 0.2
    assert first["hostname"].startswith("w1-")  # sent by the worker's pool process
    capture.wait_for("task-succeeded", result.id)
    # what a monitor built on celery.events.State (Flower) makes of it
    state = app.events.State()
    for event in capture.of_task(result.id):
        if event["type"] == "task-requeued":
            state.event(event)
    task = state.tasks[result.id]
    assert task.state == "REQUEUED" and task.reason == "locked" and task.key == name
    for event in capture.of_task(result.id):
        state.event(event)
    assert state.tasks[result.id].state == states.SUCCESS


def test_full_limit_sends_task_requeued_with_the_template(worker_app: Celery,
                                                         capture: Capture) -> None:
    app = worker_app
    tenant = uuid.uuid4().hex[:8]
    sem = RedisKit.of(app).runtime().semaphore(2)  # the task's declared permits: both held
    with sem.acquire(f"tenant:{tenant}", blocking=False), \
            sem.acquire(f"tenant:{tenant}", blocking=False):
        result = app.tasks["limited"].delay(tenant, 1)
        (got, *_) = capture.wait_for("task-requeued", result.id)
    assert result.get(timeout=WAIT) == 1
    assert (got["reason"], got["key"], got["name"]) == (
        "limited", f"tenant:{tenant}", "tenant:{tenant}")


def test_skip_sends_task_skipped_from_a_pool_process(worker_app: Celery,
                                                     capture: Capture) -> None:
    app = worker_app
    key = uuid.uuid4().hex
    name = _lock_name(app, "skippable", key)
    with RedisKit.of(app).runtime().mutex.acquire(name, blocking=False) as hold:
        result = app.tasks["skippable"].delay(key)
        assert result.get(timeout=WAIT) is None
    (got,) = capture.wait_for("task-skipped", result.id)
    assert (got["reason"], got["lock"], got["holder"]) == ("locked", name, hold.owner)


def test_a_park_on_receipt_sends_task_parked(worker_app: Celery, capture: Capture) -> None:
    """A message parked by the worker's main process sends ``task-parked`` (one per park,
    from the worker's node), which ``celery.events.State`` shows as ``PARKED`` until the
    re-sent run succeeds."""
    app = worker_app
    key = uuid.uuid4().hex[:8]
    sem = RedisKit.of(app).runtime().semaphore(1)
    with sem.acquire(f"pslot:{key}", blocking=False):
        results = [app.tasks["parking"].delay(key) for _ in range(3)]
        parked = [capture.wait_for("task-parked", r.id)[0] for r in results]
    for got in parked:
        assert (got["resource"], got["kind"]) == (f"pslot:{key}", "semaphore")
        assert got["hostname"].startswith("w1-")
    state = app.events.State()
    state.event(parked[0])
    assert state.tasks[results[0].id].state == "PARKED"
    for r in results:  # the sweeper re-sends them: the permit was freed by a plain release
        assert r.get(timeout=WAIT) > 0
        capture.wait_for("task-succeeded", r.id)
        assert len(capture.of("task-parked", r.id)) == 1
    for event in capture.of_task(results[0].id):
        state.event(event)
    assert state.tasks[results[0].id].state == states.SUCCESS
