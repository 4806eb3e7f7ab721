"""``on_locked="skip"``: a skipped task is finished (SUCCESS, result None), so its group,
chord and chain complete and ``.get()`` returns at once; a ``task-skipped`` event tells
monitors why. One in-process worker (task events on) serves the whole module."""

from __future__ import annotations

import gc
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from celery import Celery, chain, chord, group, states

from celery_rediskit.integration import RedisKit
from celery_rediskit.mutex import MutexLease

from .conftest import in_process_worker, make_app

WAIT = 20


@dataclass
class Env:
    app: Celery
    skippable: Any
    add: Any
    describe: Any
    collect: Any

    def lock_name(self, key: str) -> str:
        t = self.app.tasks[self.skippable.name]
        p = t._rk_policy
        return str(p.singleton_name(t.name, p.bind((key, 0), {}), (key, 0), {}))

    @contextmanager
    def held(self, key: str) -> Iterator[MutexLease]:
        """Hold the singleton lock of ``skippable(key, ...)`` as another running task would."""
        lease = RedisKit.of(self.app).runtime().mutex.acquire(self.lock_name(key),
                                                              blocking=False)
        try:
            yield lease
        finally:
            lease.release()


@pytest.fixture(scope="module")
def env(redis_url: str) -> Iterator[Env]:
    app = make_app(redis_url, f"rks-{uuid.uuid4().hex[:8]}")
    app.conf.worker_send_task_events = True  # so the monitor test sees task-succeeded too

    @app.task(shared=False, singleton=True, singleton_key=("key",), on_locked="skip")
    def skippable(key: str, x: int) -> int:
        return x

    @app.task(shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(shared=False)
    def describe(value: Any) -> dict[str, Any]:
        return {"got": value}

    @app.task(shared=False)
    def collect(values: list[Any]) -> list[Any]:
        return values

    with in_process_worker(app, concurrency=4):
        yield Env(app, skippable, add, describe, collect)
        gc.collect()  # canvas results in cycles: finalize them while Redis is up (test_canvas)
    app.close()


def test_skipped_task_is_ready_at_once(env: Env) -> None:
    with env.held("busy"):
        result = env.skippable.delay("busy", 1)
        assert result.get(timeout=WAIT) is None
        assert result.state == states.SUCCESS and result.ready()
        # another client polling by id sees the same
        assert env.app.AsyncResult(result.id).state == states.SUCCESS
    assert env.skippable.delay("busy", 2).get(timeout=WAIT) == 2  # free again: runs


def test_group_with_a_skipped_member_completes(env: Env) -> None:
    with env.held("busy"):
        g = group(env.skippable.s("busy", 1), env.skippable.s("free", 2),
                  env.add.s(3, 4)).apply_async()
        assert g.get(timeout=WAIT) == [None, 2, 7]
        assert g.results[0].state == states.SUCCESS


def test_chord_with_a_skipped_member_runs_its_body(env: Env) -> None:
    with env.held("busy"):
        c = chord([env.skippable.s("busy", 1), env.skippable.s("free", 2),
                   env.add.s(3, 4)])(env.collect.s())
        assert c.get(timeout=WAIT) == [None, 2, 7]


def test_chain_with_a_skipped_member_goes_on(env: Env) -> None:
    with env.held("busy"):
        # a skipped link in the middle: the next link gets its result, None
        middle = chain(env.add.s(1, 2), env.skippable.si("busy", 3), env.describe.s())
        assert middle.apply_async().get(timeout=WAIT) == {"got": None}
        # a skipped head
        head = chain(env.skippable.s("busy", 1), env.describe.s())
        assert head.apply_async().get(timeout=WAIT) == {"got": None}
        # a link that is not skipped passes its value on as usual
        free = chain(env.skippable.s("free", 5), env.describe.s())
        assert free.apply_async().get(timeout=WAIT) == {"got": 5}


def _wait(what: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_skip_sends_a_task_skipped_event_for_monitors(env: Env) -> None:
    app = env.app
    events: list[dict[str, Any]] = []
    lock = threading.Lock()

    def on_event(event: dict[str, Any]) -> None:
        with lock:
            events.append(event)

    def seen(kind: str, task_id: str | None = None) -> list[dict[str, Any]]:
        with lock:
            return [e for e in events if e["type"] == kind
                    and (task_id is None or e.get("uuid") == task_id)]

    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": on_event})
        thread = threading.Thread(target=receiver.capture,
                                  kwargs={"limit": None, "timeout": None, "wakeup": False},
                                  daemon=True)
        thread.start()
        try:
            # the receiver is listening once one of our own marker events comes back
            with app.events.default_dispatcher() as dispatcher:
                deadline = time.monotonic() + WAIT
                while not seen("rediskit-test-marker"):
                    assert time.monotonic() < deadline, "the event receiver never listened"
                    dispatcher.send("rediskit-test-marker")
                    time.sleep(0.05)
            with env.held("busy") as hold:
                result = env.skippable.delay("busy", 1)
                assert result.get(timeout=WAIT) is None
            _wait(lambda: bool(seen("task-skipped", result.id))
                  and bool(seen("task-succeeded", result.id)))
        finally:
            receiver.should_stop = True
            thread.join(10)

    skipped = seen("task-skipped", result.id)[0]
    assert skipped["reason"] == "locked"
    assert skipped["lock"] == env.lock_name("busy")
    assert skipped["holder"] == hold.owner
    # what a monitor built on celery.events.State (Flower) makes of it
    state = app.events.State()
    with lock:
        mine = [e for e in events if e.get("uuid") == result.id]
    for event in mine:
        if event["type"] != "task-succeeded":
            state.event(event)
    assert state.tasks[result.id].state == "SKIPPED"
    state.event(seen("task-succeeded", result.id)[0])
    task = state.tasks[result.id]
    # SUCCESS outranks custom states in Celery's event state; the skip's fields stay on it
    assert task.state == states.SUCCESS
    assert task.reason == "locked" and task.holder == hold.owner
