"""What a run of a task with options sends to Redis: on one server, the claims record rides
inside the first acquire and the last release script, and every release of the run's end goes
in one round trip. Run with ``apply()`` in this thread (or on an in-process worker, counting the
round trips of the thread that runs the task), on a connection that records its round trips
(``tests/roundtrips.py``)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery, signals, states

from celery_rediskit.integration import RedisKit
from celery_rediskit.integration.claims import holder_line, parse_record
from celery_rediskit.lease import LeaseKind
from tests.roundtrips import round_trip_client, thread_round_trip_client

from .conftest import WorkerFactory, make_app


@pytest.fixture
def counted(redis_url: str, prefix: str) -> Iterator[tuple[Celery, list[list[str]]]]:
    c, trips = round_trip_client(redis_url)
    a = make_app(redis_url, prefix, client=c)
    yield a, trips
    a.close()
    c.close()


def _run(app: Celery, trips: list[list[str]], name: str, *args: Any,
         task_id: str | None = None) -> tuple[Any, list[list[str]]]:
    """Run the task once to warm up (scripts loaded), then again counted."""
    task = app.tasks[name]
    task.apply(("warm-up", *args[1:]))
    trips.clear()
    result = task.apply(args, task_id=task_id)
    return result, list(trips)


def _records(client: redis.Redis, prefix: str) -> list[Any]:
    return list(client.scan_iter(match=f"{prefix}:claims:*"))


def _locked(client: redis.Redis, prefix: str) -> list[Any]:
    """Lock owner keys (a lock's other keys, fence and release records, stay a while)."""
    return [k for k in client.scan_iter(match=f"{prefix}:lock:*") if k.endswith(b"}")]


def _record_seen(client: redis.Redis, prefix: str, seen: dict[str, Any]) -> Any:
    """A body noting its claims record (read on another client: not counted)."""
    def body(self: Any, x: str) -> str:
        raw = client.get(f"{prefix}:claims:{self.request.id}")
        seen[x] = parse_record(raw)[0] if raw else []
        return x

    return body


def test_a_singleton_run_is_two_round_trips_of_one_script_each(
    counted: tuple[Celery, list[list[str]]], client: redis.Redis, prefix: str
) -> None:
    app, trips = counted
    seen: dict[str, Any] = {}
    app.task(shared=False, bind=True, name="single",
             singleton=True)(_record_seen(client, prefix, seen))
    result, sent = _run(app, trips, "single", "a")
    assert result.get() == "a"
    assert sent == [["EVALSHA"], ["EVALSHA"]], "record + lock, then release + record deleted"
    assert [kind for kind, _key, _owner in seen["a"]] == [LeaseKind.MUTEX], \
        "the record names the lock while the body runs"
    assert not _records(client, prefix), "the record is deleted at the end"
    assert not _locked(client, prefix), "the lock is released"


def test_a_limited_run_is_two_round_trips_of_one_script_each(
    counted: tuple[Celery, list[list[str]]], client: redis.Redis, prefix: str
) -> None:
    app, trips = counted
    seen: dict[str, Any] = {}
    app.task(shared=False, bind=True, name="limited",
             concurrency_limit="db:3")(_record_seen(client, prefix, seen))
    result, sent = _run(app, trips, "limited", "a")
    assert result.get() == "a"
    assert sent == [["EVALSHA"], ["EVALSHA"]]
    assert [kind for kind, _key, _owner in seen["a"]] == [LeaseKind.SEMAPHORE]
    assert not _records(client, prefix)
    info = RedisKit.of(app).runtime().semaphore_storage.get_semaphore_info("db")
    assert info.total == 3 and info.acquired == 0


def test_every_release_of_a_run_goes_in_one_round_trip(
    counted: tuple[Celery, list[list[str]]], client: redis.Redis, prefix: str
) -> None:
    app, trips = counted
    seen: dict[str, Any] = {}
    app.task(shared=False, bind=True, name="both", singleton=True,
             concurrency_limit=["db:3", "api:2"])(_record_seen(client, prefix, seen))
    result, sent = _run(app, trips, "both", "a")
    assert result.get() == "a"
    assert sent == [["EVALSHA"], ["EVALSHA"], ["EVALSHA"], ["EVALSHA"] * 3]
    assert sorted(kind for kind, _key, _owner in seen["a"]) == ["m", "s", "s"]
    assert not _records(client, prefix) and not _locked(client, prefix)


def test_a_queued_scope_run_takes_its_claim_and_lock_in_one_round_trip(
    counted: tuple[Celery, list[list[str]]], client: redis.Redis, prefix: str
) -> None:
    """Before the body: the claim renewed and the lock tried (with the record, the lock being
    free) in one script (before: the claim's try, then the lock's, two scripts in one round
    trip; earlier two round trips); at the end both released and the record deleted in one
    script (``claims_queued_release.lua``; before: the lock's release and the claim's, two
    scripts in one round trip)."""
    app, trips = counted
    seen: dict[str, Any] = {}
    before_body: dict[str, list[list[str]]] = {}
    record_seen = _record_seen(client, prefix, seen)

    def body(self: Any, x: str) -> str:
        before_body[x] = list(trips)
        return str(record_seen(self, x))

    app.task(shared=False, bind=True, name="queued", singleton=True,
             singleton_scope="queued")(body)
    result, sent = _run(app, trips, "queued", "a")
    assert result.get() == "a"
    assert before_body["a"] == [["EVALSHA"]], "the claim, the record and the lock: one script"
    assert sent == [["EVALSHA"], ["EVALSHA"]]
    assert sorted(key.split(":")[0] for _k, key, _o in seen["a"]) == ["queued", "singleton"]
    assert not _records(client, prefix) and not _locked(client, prefix)


def test_a_queued_scope_run_on_a_worker_makes_one_round_trip_before_its_body(
    redis_url: str, prefix: str, worker: WorkerFactory
) -> None:
    """On a real (in-process) worker: from the moment the task is handed to its thread
    (``task_prerun``) until its body starts, that thread makes one round trip of one script,
    the claim's renewal and the lock's try together (before: two scripts; earlier two round
    trips)."""
    c, trips = thread_round_trip_client(redis_url)
    app = make_app(redis_url, prefix, client=c)
    marks: dict[str, int] = {}
    before_body: dict[int, list[list[str]]] = {}

    @app.task(shared=False, bind=True, singleton=True, singleton_scope="queued")
    def job(self: Any, x: int) -> int:
        me = threading.get_ident()
        before_body[x] = [names for thread, names in trips[marks[self.request.id]:]
                          if thread == me]
        return x

    def mark(task_id: str | None = None, **_: Any) -> None:  # in the task's thread
        if task_id is not None:
            marks[task_id] = len(trips)

    signals.task_prerun.connect(mark, weak=False)
    try:
        with worker(app, pool="threads", concurrency=1):
            assert job.delay(0).get(timeout=20) == 0  # warm up: scripts loaded
            assert job.delay(1).get(timeout=20) == 1
    finally:
        signals.task_prerun.disconnect(mark)
        app.close()
        c.close()
    assert before_body[1] == [["EVALSHA"]], "the claim and the lock, one script"


def test_a_queued_run_meeting_its_lock_held_keeps_the_other_runs_record(
    counted: tuple[Celery, list[list[str]]], client: redis.Redis, prefix: str
) -> None:
    """Another run of the same task id holds the lock (a redelivered message): this run is
    dropped, and the record of the running one is left as it wrote it."""
    app, _trips = counted

    @app.task(shared=False, name="queued", singleton=True, singleton_scope="queued")
    def queued(x: str) -> str:
        return x

    rt = RedisKit.of(app).runtime()
    policy = queued._rk_policy
    lock = policy.singleton_name("queued", policy.bind(("a",), {}), ("a",), {})
    running = rt.mutex.acquire(lock)
    task_id = "the-task-id"
    rt.claims.record(task_id, [(LeaseKind.MUTEX, lock, running.owner)], 60,
                     holder_line("queued", "elsewhere@host"))
    before = client.get(f"{prefix}:claims:{task_id}")
    try:
        result = queued.apply(("a",), task_id=task_id)
        assert result.state == states.IGNORED
        assert client.get(f"{prefix}:claims:{task_id}") == before
        assert rt.mutex_storage.get_lock_info(lock).holder == running.owner
    finally:
        running.release()


def test_a_queued_run_whose_claim_another_task_holds_is_a_duplicate_that_touches_nothing(
    counted: tuple[Celery, list[list[str]]], client: redis.Redis, prefix: str
) -> None:
    """The claim is another task id's (sent since this message's claim expired): the run is
    dropped as its duplicate, in the one script, which takes neither the lock nor the claim
    and writes no claims record."""
    app, trips = counted

    ran: list[str] = []

    @app.task(shared=False, name="queued", singleton=True, singleton_scope="queued")
    def queued(x: str) -> str:
        ran.append(x)
        return x

    rt = RedisKit.of(app).runtime()
    policy = queued._rk_policy
    lock = policy.singleton_name("queued", policy.bind(("a",), {}), ("a",), {})
    qname = f"queued:{lock}"
    other = rt.mutex.acquire(qname, owner="q:the-other-task")
    try:
        queued.apply(("warm-up",))
        trips.clear()
        result = queued.apply(("a",), task_id="this-task")
        assert ran == ["warm-up"] and result.get() is None, "skipped: the body did not run"
        assert trips[0] == ["EVALSHA"], "one script (then the report of who holds the claim)"
        assert rt.mutex_storage.get_lock_info(qname).holder == "q:the-other-task"
        assert rt.mutex_storage.get_lock_info(lock).holder is None
        assert not _records(client, prefix)
    finally:
        other.release()
