"""Singleton tasks on a real in-process worker (threads pool) against the private Redis.

Some tests use the testing kit's fixtures (``rediskit_app``, ``rediskit_worker``), as users
do; those with ``rediskit_no_leaks`` also fail if a lock or claim stays held at the end."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from celery import chain, group, signals
from celery.result import AsyncResult

from celery_rediskit._redis.keys import KeySpace
from celery_rediskit.integration import RedisKit, TaskDuplicated, TaskLocked

from .probe import Probe

WAIT = 20  # seconds: upper bound for any result in these tests


def lock_name(app: Any, task: Any, *args: Any, **kwargs: Any) -> str:
    t = app.tasks[task.name]
    policy = t._rk_policy
    return str(policy.singleton_name(t.name, policy.bind(args, kwargs), args, kwargs))


def is_locked(app: Any, name: str) -> bool:
    return bool(RedisKit.of(app).runtime().mutex_storage.is_locked(name))


def claims_of(app: Any, task_id: str) -> list[tuple[str, str, str]]:
    return RedisKit.of(app).runtime().claims.held(task_id)


def test_running_scope_never_two_bodies_at_once(app, worker, client, prefix,
                                                rediskit_no_leaks) -> None:
    probe = Probe(client, prefix + ":p")

    @app.task(shared=False, singleton=True, singleton_key=())
    def job(i: int) -> int:
        probe.enter()
        time.sleep(0.02)
        probe.exit()
        return i

    with worker(app, concurrency=4):
        results = [job.delay(i) for i in range(20)]
        # 20 runs re-queued with backoff on one lock: on Celery 5.3 (the floor), whose worker
        # schedules countdowns more coarsely, this takes about 20 s in all, not 3 s
        assert sorted(r.get(timeout=3 * WAIT) for r in results) == list(range(20))
    assert probe.peak == 1 and probe.runs == 20
    assert not is_locked(app, lock_name(app, job, 0))


def test_queued_scope_duplicates_get_the_first_id(app, worker, client, prefix) -> None:
    probe = Probe(client, prefix + ":p")

    @app.task(shared=False, singleton=True, singleton_scope="queued")
    def job(x: int) -> int:
        probe.enter()
        probe.exit()
        return x

    first = job.delay(1)
    dupes = [job.delay(1) for _ in range(19)]
    assert {d.id for d in dupes} == {first.id}
    assert all(getattr(d, "rediskit_duplicate", False) for d in dupes)
    other = job.delay(2)
    assert other.id != first.id
    with worker(app):
        assert first.get(timeout=WAIT) == 1 and other.get(timeout=WAIT) == 2
        assert probe.runs == 2
        # finished: the claim is gone, so the next call is a new task
        again = job.delay(1)
        assert again.id != first.id and again.get(timeout=WAIT) == 1


@pytest.fixture
def job(rediskit_app: Any) -> Any:
    """A singleton task of the kit's app: defined before ``rediskit_worker`` starts."""

    @rediskit_app.task(shared=False, singleton=True)
    def job(fail: bool) -> str:
        if fail:
            raise ValueError("boom")
        return "ok"

    return job


def test_released_on_success_and_failure(job, rediskit_app, rediskit_worker,
                                         rediskit_no_leaks) -> None:
    app = rediskit_app
    ok = job.delay(False)
    assert ok.get(timeout=WAIT) == "ok"
    assert not is_locked(app, lock_name(app, job, False))
    bad = job.delay(True)
    with pytest.raises(ValueError):
        bad.get(timeout=WAIT)
    assert not is_locked(app, lock_name(app, job, True))
    # the record of what each held is deleted when it ends, whichever way
    assert claims_of(app, ok.id) == [] and claims_of(app, bad.id) == []
    assert RedisKit.of(app).runtime().release_task(ok.id) == 0


@pytest.mark.parametrize("scope", ["running", "queued"])
def test_retry_runs_again_holding_the_lock(app, worker, scope: str, rediskit_no_leaks) -> None:
    seen: list[tuple[int, bool, int]] = []

    @app.task(shared=False, bind=True, singleton=True, singleton_scope=scope, max_retries=3)
    def job(self: Any, x: int) -> int:
        name = lock_name(app, job, x)
        seen.append((self.request.retries, is_locked(app, name), self.lease.fencing_token))
        if self.request.retries < 2:
            raise self.retry(countdown=0)  # countdown=0: the retry must not meet its own lock
        return x

    with worker(app):
        result = job.delay(5)
        assert result.get(timeout=WAIT) == 5
    assert [(r, held) for r, held, _ in seen] == [(0, True), (1, True), (2, True)]
    tokens = [t for _, _, t in seen]
    assert tokens == sorted(tokens) and len(set(tokens)) == 3  # fencing token rises
    assert not is_locked(app, lock_name(app, job, 5))


def test_queued_claim_survives_retry_countdown(app, worker) -> None:
    release = threading.Event()

    @app.task(shared=False, bind=True, singleton=True, singleton_scope="queued")
    def job(self: Any, x: int) -> int:
        if self.request.retries == 0:
            raise self.retry(countdown=1)
        release.wait(WAIT)
        return x

    with worker(app):
        first = job.delay(1)
        # while the retry waits out its countdown, and while it runs, duplicates map to it
        deadline = time.monotonic() + WAIT
        while AsyncResult(first.id, app=app).state != "RETRY" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert job.delay(1).id == first.id
        release.set()
        assert first.get(timeout=WAIT) == 1
        assert job.delay(1).id != first.id


def test_on_locked_skip_and_raise(app, worker, rediskit_no_leaks) -> None:
    started, release = threading.Event(), threading.Event()

    @app.task(shared=False, singleton=True, singleton_key=())
    def holder() -> str:
        started.set()
        release.wait(WAIT)
        return "held"

    @app.task(shared=False, singleton=True, singleton_key=(), on_locked="skip")
    def skipper() -> str:
        return "ran"

    @app.task(shared=False, singleton=True, singleton_key=(), on_locked="raise")
    def raiser() -> str:
        return "ran"

    # skipper/raiser share holder's lock only if their keys match: use the holder's key space
    with worker(app, concurrency=3):
        h = holder.delay()
        assert started.wait(WAIT)
        hold = RedisKit.of(app).runtime().mutex.acquire(
            lock_name(app, skipper), blocking=False)
        hold2 = RedisKit.of(app).runtime().mutex.acquire(lock_name(app, raiser), blocking=False)
        try:
            s = skipper.delay()
            r = raiser.delay()
            with pytest.raises(TaskLocked):
                r.get(timeout=WAIT)
            assert s.get(timeout=WAIT) is None  # skipped: finished, without running
            assert s.state == "SUCCESS"
        finally:
            hold.release()
            hold2.release()
            release.set()
        assert h.get(timeout=WAIT) == "held"


def test_send_task_duplicate_does_not_break_the_holder(app, worker, client, prefix,
                                                       rediskit_no_leaks) -> None:
    """celery-heimdall: a duplicate sent by send_task (beat's path) skipped at run time and
    deleted the running holder's lock, so a third call ran concurrently."""
    probe = Probe(client, prefix + ":p")
    started, release = threading.Event(), threading.Event()

    @app.task(shared=False, singleton=True, singleton_scope="queued")
    def job(x: int) -> int:
        probe.enter()
        started.set()
        release.wait(WAIT)
        probe.exit()
        return x

    with worker(app, concurrency=3):
        first = job.delay(1)
        assert started.wait(WAIT)
        dup = app.send_task(job.name, args=(1,))
        assert dup.get(timeout=WAIT) is None  # skipped at the worker
        assert dup.state == "SUCCESS"
        assert job.delay(1).id == first.id  # the holder's claim is intact
        release.set()
        assert first.get(timeout=WAIT) == 1
    assert probe.peak == 1 and probe.runs == 1


@pytest.mark.parametrize("on_locked", ["skip", "raise"])
def test_a_duplicate_at_run_time_never_takes_the_free_lock(app, worker, client, prefix,
                                                          on_locked: str) -> None:
    """The claim is held by another task, still queued (its lock free); a duplicate sent past
    the claim (send_task, beat's path) tries its claim and its lock in one round trip: it is
    skipped (or raises) as before, and neither holds the lock, not even for a moment (the
    lock's fencing token never rose), nor leaves a claims record."""
    probe = Probe(client, prefix + ":p")

    @app.task(shared=False, singleton=True, singleton_scope="queued", on_locked=on_locked)
    def job(x: int) -> int:
        probe.enter()
        probe.exit()
        return x

    rt = RedisKit.of(app).runtime()
    name = lock_name(app, job, 1)
    queued_elsewhere = rt.mutex_storage.try_acquire("queued:" + name, "q:the-first", 60)
    assert queued_elsewhere >= 1
    keys = KeySpace(prefix).lock(name)
    try:
        with worker(app, concurrency=2):
            dup = app.send_task(job.name, args=(1,))
            if on_locked == "raise":
                with pytest.raises(TaskLocked, match="is a duplicate of task the-first"):
                    dup.get(timeout=WAIT)
            else:
                assert dup.get(timeout=WAIT) is None and dup.state == "SUCCESS"
            assert probe.runs == 0
            assert not client.exists(keys.lock), "the duplicate kept the lock"
            assert not client.exists(keys.fence), "the duplicate took the lock for a moment"
            assert not client.exists(rt.claims.key(dup.id)), "the duplicate left a record"
            info = rt.mutex_storage.get_lock_info("queued:" + name)
            assert info.holder == "q:the-first", "the claim changed hands"
    finally:
        rt.mutex_storage.release("queued:" + name, "q:the-first")


def test_send_task_runs_through_the_lock(app, worker, client, prefix, rediskit_no_leaks) -> None:
    probe = Probe(client, prefix + ":p")

    @app.task(shared=False, singleton=True, singleton_key=())
    def job(i: int) -> int:
        probe.enter()
        time.sleep(0.01)
        probe.exit()
        return i

    with worker(app, concurrency=4):
        results = [app.send_task(job.name, args=(i,)) for i in range(8)]
        results += [job.apply_async((i,), countdown=0.3) for i in range(8, 12)]
        results += [job.apply_async((12,), eta=time.time() + 0.3)] if False else []
        assert sorted(r.get(timeout=WAIT) for r in results) == list(range(12))
    assert probe.peak == 1 and probe.runs == 12


def test_countdown_and_eta_with_queued_scope(app, worker) -> None:
    import datetime as dt

    @app.task(shared=False, singleton=True, singleton_scope="queued")
    def job(x: int) -> int:
        return x

    with worker(app):
        a = job.apply_async((1,), countdown=0.5)
        assert job.delay(1).id == a.id
        eta = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=0.5)
        b = job.apply_async((2,), eta=eta)
        assert job.apply_async((2,), countdown=5).id == b.id
        assert a.get(timeout=WAIT) == 1 and b.get(timeout=WAIT) == 2


def test_chains_and_groups_keep_callbacks(app, worker, client, prefix, rediskit_no_leaks) -> None:
    probe = Probe(client, prefix + ":p")

    @app.task(shared=False, singleton=True, singleton_key=())
    def add(x: int, y: int) -> int:
        probe.enter()
        time.sleep(0.01)
        probe.exit()
        return x + y

    @app.task(shared=False, singleton=True, singleton_scope="queued")
    def head(x: int) -> int:
        return x

    with worker(app, concurrency=4):
        c = chain(add.s(1, 2), add.s(10), add.s(100)).apply_async()
        assert c.get(timeout=WAIT) == 113
        g = group(add.s(i, i) for i in range(6)).apply_async()
        assert sorted(g.get(timeout=WAIT)) == [0, 2, 4, 6, 8, 10]
        assert probe.peak == 1

        started = head.apply_async((7,), countdown=2)
        with pytest.raises(TaskDuplicated) as info:
            chain(head.s(7), add.s(1)).apply_async()
        assert info.value.task_id == started.id  # reported, not silently dropped
        assert started.get(timeout=WAIT) == 7


def test_revoke_before_start_releases_the_claim(app, worker) -> None:
    revoked = threading.Event()

    @app.task(shared=False, singleton=True, singleton_scope="queued")
    def job(x: int) -> int:
        return x

    def on_revoked(request: Any = None, **_: Any) -> None:
        if request is not None and request.id == first.id:
            revoked.set()

    signals.task_revoked.connect(on_revoked, weak=False)
    try:
        with worker(app):
            first = job.apply_async((1,), countdown=1)
            assert job.delay(1).id == first.id
            first.revoke()
            assert revoked.wait(WAIT)  # the worker discards it when its countdown ends
            second = job.delay(1)
            assert second.id != first.id  # celery-singleton returned the revoked task's id
            assert second.get(timeout=WAIT) == 1
    finally:
        signals.task_revoked.disconnect(on_revoked)


def test_task_reads_its_lease(rediskit_app, rediskit_worker, rediskit_no_leaks) -> None:
    @rediskit_app.task(shared=False, bind=True, singleton=True)
    def reader(self: Any) -> dict[str, Any]:
        lease = self.lease
        return {"token": lease.fencing_token, "ttl": lease.ttl(), "lost": lease.lost,
                "key": lease.key}

    rediskit_worker.reload()  # the worker started before this task was defined
    one = reader.delay().get(timeout=WAIT)
    two = reader.delay().get(timeout=WAIT)
    assert one["key"].startswith("singleton:") and not one["lost"]
    assert 0 < one["ttl"] <= 30 and two["token"] > one["token"]
