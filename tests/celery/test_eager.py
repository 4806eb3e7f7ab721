"""What a direct call ``task(...)``, ``task.apply()`` and ``task_always_eager=True`` do with
each option. Nothing here needs a worker: all of it runs in the calling thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery import Celery, chain, chord, group, states

from celery_rediskit.integration import RedisKit, TaskLocked

from .conftest import make_app, waiting
from .probe import Probe

WAIT = 20
MODES = ["apply", "eager"]


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def eapp(redis_url: str, prefix: str, mode: str) -> Iterator[Celery]:
    """An app whose tasks the test runs with ``apply()`` or, in eager mode, ``delay()``."""
    a = make_app(redis_url, prefix)
    a.conf.task_always_eager = mode == "eager"
    yield a
    a.close()


def call(mode: str, task: Any, *args: Any) -> Any:
    """Run ``task(*args)`` the way ``mode`` says: ``apply()``, or ``delay()`` in eager mode."""
    return task.apply(args) if mode == "apply" else task.delay(*args)


def lock_name(app: Celery, task: Any, *args: Any) -> str:
    t = app.tasks[task.name]
    p = t._rk_policy
    return str(p.singleton_name(t.name, p.bind(args, {}), args, {}))


def wait_for(what: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_direct_call_is_a_plain_function_call(app: Celery, client: redis.Redis,
                                              prefix: str) -> None:
    """``task(...)`` runs the body here and now: no lock, no permit, no cache."""
    probe = Probe(client, prefix + ":p")

    @app.task(shared=False, singleton=True, singleton_key=(), on_locked="raise")
    def single() -> str:
        probe.enter()
        probe.exit()
        return "ran"

    @app.task(shared=False, concurrency_limit="one:1")
    def limited() -> str:
        probe.enter()
        probe.exit()
        return "ran"

    @app.task(shared=False, cache_ttl="5m")
    def cached(x: int) -> int:
        probe.enter()
        probe.exit()
        return x * 2

    rt = RedisKit.of(app).runtime()
    lock = rt.mutex.acquire(lock_name(app, single), blocking=False)
    permit = rt.semaphore(1).acquire("one", blocking=False)
    try:
        assert single() == "ran" and limited() == "ran"
    finally:
        lock.release()
        permit.release()
    assert cached(3) == 6 and cached(3) == 6
    assert probe.runs == 4
    assert cached.apply((3,)).get() == 6  # the direct calls stored nothing in the cache
    assert probe.runs == 5


def test_lock_is_held_while_the_body_runs(eapp: Celery, mode: str) -> None:
    rt = RedisKit.of(eapp).runtime()

    @eapp.task(shared=False, bind=True, singleton=True)
    def single(self: Any, x: int) -> dict[str, Any]:
        lease = self.lease
        return {"held": rt.mutex_storage.is_locked(lock_name(eapp, single, x)),
                "token": lease.fencing_token if lease else None}

    first = call(mode, single, 1)
    second = call(mode, single, 1)
    assert first.get()["held"] is True and second.get()["held"] is True
    assert second.get()["token"] > first.get()["token"]
    assert not rt.mutex_storage.is_locked(lock_name(eapp, single, 1))


def test_when_the_lock_is_held(eapp: Celery, mode: str, client: redis.Redis,
                               prefix: str) -> None:
    """raise: TaskLocked; retry: TaskLocked at once (nothing to re-queue); skip: SUCCESS,
    None. The body never runs."""
    probe = Probe(client, prefix + ":p")

    def body() -> str:
        probe.enter()
        probe.exit()
        return "ran"

    tasks = {
        how: eapp.task(shared=False, name=f"{prefix}.{how}", singleton=True,
                       singleton_key=(), on_locked=how)(body)
        for how in ("raise", "retry", "skip")
    }
    rt = RedisKit.of(eapp).runtime()
    holds = [rt.mutex.acquire(lock_name(eapp, t), blocking=False) for t in tasks.values()]
    try:
        raised = call(mode, tasks["raise"])
        assert raised.state == states.FAILURE and isinstance(raised.result, TaskLocked)
        started = time.monotonic()
        retried = call(mode, tasks["retry"])
        assert retried.state == states.FAILURE and isinstance(retried.result, TaskLocked)
        assert "cannot be re-queued" in str(retried.result)
        assert time.monotonic() - started < WAIT / 2  # at once: it did not wait for the lock
        skipped = call(mode, tasks["skip"])
        assert skipped.state == states.SUCCESS, skipped.state
        assert skipped.get() is None
    finally:
        for hold in holds:
            hold.release()
    assert probe.runs == 0
    assert call(mode, tasks["skip"]).get() == "ran"  # free again


def test_when_the_limit_is_full(eapp: Celery, mode: str, client: redis.Redis,
                                prefix: str) -> None:
    """on_limited="retry": TaskLocked at once; "wait": waits for the permit."""
    probe = Probe(client, prefix + ":p")

    def body() -> str:
        probe.enter()
        probe.exit()
        return "ran"

    retry = eapp.task(shared=False, name=f"{prefix}.retry", concurrency_limit="lim:1")(body)
    wait = eapp.task(shared=False, name=f"{prefix}.wait", concurrency_limit="lim:1",
                     on_limited="wait", limit_timeout=WAIT)(body)
    rt = RedisKit.of(eapp).runtime()
    permit = rt.semaphore(1).acquire("lim", blocking=False)
    results: list[Any] = []
    waiter = threading.Thread(target=lambda: results.append(call(mode, wait)))
    try:
        refused = call(mode, retry)
        assert refused.state == states.FAILURE and isinstance(refused.result, TaskLocked)
        waiter.start()
        wait_for(lambda: waiting(client, prefix, "lim", lock=False) == 1)
        assert probe.runs == 0
    finally:
        permit.release()
        if waiter.is_alive() or waiter.ident is not None:
            waiter.join(WAIT)
    assert results[0].get() == "ran" and probe.runs == 1
    assert rt.semaphore_storage.get_semaphore_info("lim").available == 1


def test_cached_results(eapp: Celery, mode: str, client: redis.Redis, prefix: str) -> None:
    probe = Probe(client, prefix + ":p")

    @eapp.task(shared=False, cache_ttl="5m")
    def square(x: int) -> int:
        probe.enter()
        probe.exit()
        return x * x

    assert call(mode, square, 4).get() == 16
    assert call(mode, square, 4).get() == 16
    assert call(mode, square, 5).get() == 25
    assert probe.runs == 2


def test_queued_claim_is_held_while_the_task_runs(eapp: Celery, mode: str, redis_url: str,
                                                  prefix: str) -> None:
    """While an eager run of a queued-scope task runs, a producer sending the same call
    (a real, non-eager app) gets the running task's id and publishes nothing."""
    producer = make_app(redis_url, prefix)

    def body(self: Any, x: int) -> dict[str, Any]:
        sent = producer.tasks[self.name].delay(x)
        return {"me": self.request.id, "sent": sent.id,
                "duplicate": getattr(sent, "rediskit_duplicate", False)}

    for a in (eapp, producer):
        a.task(shared=False, bind=True, name=f"{prefix}.refresh", singleton=True,
               singleton_scope="queued")(body)
    try:
        out = call(mode, eapp.tasks[f"{prefix}.refresh"], 7).get()
        assert out["duplicate"] is True and out["sent"] == out["me"]
        qname = "queued:" + lock_name(eapp, eapp.tasks[f"{prefix}.refresh"], 7)
        assert not RedisKit.of(eapp).runtime().mutex_storage.is_locked(qname)
    finally:
        producer.close()


def test_eager_canvases_with_a_skipped_member_complete(redis_url: str, prefix: str) -> None:
    app = make_app(redis_url, prefix)
    app.conf.task_always_eager = True

    @app.task(shared=False, singleton=True, singleton_key=("key",), on_locked="skip")
    def skippable(key: str, x: int) -> int:
        return x

    @app.task(shared=False)
    def collect(values: list[Any]) -> list[Any]:
        return values

    @app.task(shared=False)
    def describe(value: Any) -> dict[str, Any]:
        return {"got": value}

    rt = RedisKit.of(app).runtime()
    hold = rt.mutex.acquire(lock_name(app, skippable, "busy", 0), blocking=False)
    try:
        members = [skippable.s("busy", 1), skippable.s("free", 2)]
        assert group(members).apply_async().get() == [None, 2]
        assert chord(members)(collect.s()).get() == [None, 2]
        assert chain(skippable.s("busy", 1), describe.s()).apply_async().get() == {"got": None}
    finally:
        hold.release()
        app.close()


def test_map_starmap_and_chunks_items_honour_the_options(eapp: Celery, mode: str,
                                                         client: redis.Redis,
                                                         prefix: str) -> None:
    """Their items are direct calls inside Celery's builtin tasks, yet they use the cache
    and take the lock; an item that meets a held lock with on_locked="retry" cannot be
    re-queued on its own, so it waits for the lock."""
    probe = Probe(client, prefix + ":p")

    @eapp.task(shared=False, cache_ttl="5m")
    def square(x: int) -> int:
        probe.enter()
        probe.exit()
        return x * x

    @eapp.task(shared=False, singleton=True, singleton_key=())
    def single(x: int) -> int:
        probe.enter()
        probe.exit()
        return x

    def run(sig: Any) -> Any:
        return sig.apply() if mode == "apply" else sig.apply_async()

    assert run(square.map([3, 3, 4])).get() == [9, 9, 16]
    assert run(square.starmap([(3,), (5,)])).get() == [9, 25]
    assert probe.runs == 3  # 3, 4 and 5 ran once each
    rt = RedisKit.of(eapp).runtime()
    name = lock_name(eapp, single, 0)
    hold = rt.mutex.acquire(name, blocking=False)
    results: list[Any] = []
    waiter = threading.Thread(target=lambda: results.append(run(single.starmap([(1,), (2,)]))))
    try:
        waiter.start()
        wait_for(lambda: waiting(client, prefix, name, lock=True) == 1)
        assert probe.runs == 3  # the item waits for the lock: nothing ran
    finally:
        hold.release()
        waiter.join(WAIT)
    assert results[0].get() == [1, 2] and probe.runs == 5
    if mode == "eager":  # chunks: a group of starmap tasks
        assert single.chunks([(i,) for i in range(4)], 2).apply_async().get() == [[0, 1], [2, 3]]
