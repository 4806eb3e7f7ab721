"""``self.retry()`` of a singleton task: the lock is held until the retry is really sent.

Celery raises ``MaxRetriesExceededError`` before publishing anything, so a fallback in
``except MaxRetriesExceededError`` still belongs to the run and must hold the lock; and code
after ``retry()`` (``finally`` blocks, ``throw=False``) must not overlap the retried run.
In-process worker (threads pool); bodies report to Redis through a :class:`Probe`.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from celery import signals
from celery.exceptions import MaxRetriesExceededError
from celery.utils import uuid

from .conftest import make_app
from .probe import Probe
from .test_singleton import is_locked, lock_name

WAIT = 20  # seconds: upper bound for any result in these tests


@pytest.fixture
def requeued() -> Any:
    """``requeued(task_id)`` is an Event set when the worker re-queues or retries that task."""
    events: dict[str, threading.Event] = {}

    def on_retry(request: Any = None, **_: Any) -> None:
        event = events.get(getattr(request, "id", None) or "")
        if event is not None:
            event.set()

    signals.task_retry.connect(on_retry, weak=False)

    def factory(task_id: str) -> threading.Event:
        return events.setdefault(task_id, threading.Event())

    yield factory
    signals.task_retry.disconnect(on_retry)


def test_fallback_after_max_retries_holds_the_lock(app, worker, client, prefix,
                                                   requeued) -> None:
    probe = Probe(client, prefix + ":p")
    in_fallback, fallback_done = threading.Event(), threading.Event()
    dup_id = uuid()
    dup_settled = requeued(dup_id)  # set when the duplicate is turned away (re-queued)
    overlapped: list[bool] = []
    locked_in_fallback: list[bool] = []

    @app.task(shared=False, bind=True, singleton=True, singleton_key=(), max_retries=1)
    def job(self: Any, role: str) -> str:
        probe.enter()
        try:
            if role == "dup":
                overlapped.append(in_fallback.is_set() and not fallback_done.is_set())
                dup_settled.set()
                return "dup"
            try:
                raise self.retry(countdown=0)
            except MaxRetriesExceededError:
                in_fallback.set()
                locked_in_fallback.append(is_locked(app, lock_name(app, job, role)))
                # a slow fallback: it lasts until the duplicate has been dealt with
                dup_settled.wait(WAIT)
                fallback_done.set()
                return "fallback"
        finally:
            probe.exit()

    with worker(app, concurrency=4):
        first = job.delay("first")
        assert in_fallback.wait(WAIT)
        dup = job.apply_async(("dup",), task_id=dup_id)
        assert first.get(timeout=WAIT) == "fallback"
        assert dup.get(timeout=WAIT) == "dup"
    assert overlapped == [False], "the duplicate ran beside the fallback"
    assert locked_in_fallback == [True]
    assert probe.peak == 1
    assert probe.runs == 3  # the first run, its retry (the fallback), the duplicate
    assert not is_locked(app, lock_name(app, job, "first"))


def test_queued_fallback_keeps_its_claim(redis_url, worker, client, prefix) -> None:
    """A queued-scope fallback longer than the lease keeps the claim renewed: a duplicate
    sent meanwhile maps to the running task instead of running beside it."""
    lease = 1.0
    app = make_app(redis_url, prefix, lease=lease)
    probe = Probe(client, prefix + ":p")
    in_fallback, go = threading.Event(), threading.Event()

    @app.task(shared=False, bind=True, singleton=True, singleton_scope="queued",
              singleton_key=(), max_retries=1)
    def job(self: Any, role: str) -> str:
        probe.enter()
        try:
            if role == "dup":
                return "dup"
            try:
                raise self.retry(countdown=0)
            except MaxRetriesExceededError:
                in_fallback.set()
                go.wait(WAIT)
                return "fallback"
        finally:
            probe.exit()

    try:
        with worker(app, concurrency=4):
            first = job.delay("first")
            assert in_fallback.wait(WAIT)
            time.sleep(2.5 * lease)  # the fallback is slow: it outlives an unrenewed claim
            dup = job.delay("dup")
            go.set()
            assert first.get(timeout=WAIT) == "fallback"
            assert dup.id == first.id, "the claim lapsed during the fallback"
        assert probe.peak == 1 and probe.runs == 2
    finally:
        app.close()


@pytest.mark.parametrize("how", ["raise", "throw_false"])
def test_code_after_retry_never_overlaps_the_retried_run(app, worker, client, prefix,
                                                         how: str) -> None:
    """What runs after ``retry()`` (a ``finally`` block, or the rest of the body with
    ``throw=False``) still holds the lock: the retry is sent when the run has ended."""
    probe = Probe(client, prefix + ":p")
    second, second_done = threading.Event(), threading.Event()

    @app.task(shared=False, bind=True, singleton=True, singleton_key=(), max_retries=1)
    def job(self: Any) -> str:
        probe.enter()
        retries = self.request.retries
        try:
            if retries > 0:
                second.set()
                return "done"
            if how == "throw_false":
                self.retry(countdown=0, throw=False)
                second.wait(1.0)  # the rest of the body: a retried run must not start meanwhile
                return "sent"
            raise self.retry(countdown=0)
        finally:
            if retries == 0 and how == "raise":
                second.wait(1.0)  # cleanup after retry(): likewise
            probe.exit()
            if retries > 0:
                second_done.set()

    with worker(app, concurrency=4):
        job.delay()
        assert second_done.wait(WAIT)
    assert probe.runs == 2
    assert probe.peak == 1, "the retried run started while the first was still running"


def test_a_retry_that_cannot_be_sent_fails_the_task_and_frees_the_lock(app, worker) -> None:
    """As in Celery, a retry whose message cannot be sent fails the task (``Reject``)."""

    @app.task(shared=False, bind=True, singleton=True, singleton_key=(), max_retries=1)
    def job(self: Any) -> str:
        raise self.retry(args=(object(),), countdown=0)  # not JSON: sending it fails

    with worker(app):
        result = job.delay()
        with pytest.raises(Exception) as failure:
            result.get(timeout=WAIT)
        assert result.state == "FAILURE", failure.value
    assert not is_locked(app, lock_name(app, job))
