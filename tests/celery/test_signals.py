"""The integration's signals (``celery_rediskit.integration.signals``), seen from a real
in-process worker: each is sent with its documented arguments, and none is built while
nobody listens."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from celery.utils.dispatch import Signal

from celery_rediskit.errors import LockTimeout
from celery_rediskit.integration import (
    RedisKit,
    acquire_timeout,
    cache_hit,
    cache_miss,
    lease_acquired,
    lease_lost,
    lease_released,
    task_duplicate,
    task_requeued,
    task_skipped,
)
from celery_rediskit.integration.naming import OTHER, NameMatcher

from .conftest import in_process_worker, make_app, waiting

WAIT = 20
SIGNALS = {
    "task_skipped": task_skipped, "task_requeued": task_requeued,
    "task_duplicate": task_duplicate, "cache_hit": cache_hit, "cache_miss": cache_miss,
    "lease_acquired": lease_acquired, "lease_released": lease_released,
    "acquire_timeout": acquire_timeout, "lease_lost": lease_lost,
}


class Recorder:
    """Every signal of the integration sent for the tasks of one app, in order."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self.cond = threading.Condition()
        self.handlers: list[tuple[Signal, Callable[..., None]]] = []
        for name, signal in SIGNALS.items():
            self.handlers.append((signal, self._handler(name)))
        for signal, handler in self.handlers:
            signal.connect(handler, weak=False)

    def _handler(self, name: str) -> Callable[..., None]:
        def handle(sender: Any = None, signal: Any = None, **kwargs: Any) -> None:
            if getattr(sender, "app", None) is not self.app:
                return
            with self.cond:
                self.seen.append((name, dict(kwargs, sender=sender)))
                self.cond.notify_all()
        return handle

    def of(self, name: str, **match: Any) -> list[dict[str, Any]]:
        with self.cond:
            return [k for n, k in self.seen if n == name
                    and all(k.get(f) == v for f, v in match.items())]

    def wait_for(self, name: str, count: int = 1, **match: Any) -> list[dict[str, Any]]:
        deadline = time.monotonic() + WAIT
        with self.cond:
            while len(found := self.of(name, **match)) < count:
                left = deadline - time.monotonic()
                assert left > 0, f"{name} {match} was not sent: {self.seen}"
                self.cond.wait(left)
        return found

    def close(self) -> None:
        for signal, handler in self.handlers:
            signal.disconnect(handler)


class Env:
    def __init__(self, app: Celery, tasks: dict[str, Any], rec: Recorder) -> None:
        self.app, self.t, self.rec = app, tasks, rec
        self.rt = RedisKit.of(app).runtime()

    def lock_name(self, task: str, *args: Any) -> str:
        t = self.app.tasks[self.t[task].name]
        p = t._rk_policy
        return str(p.singleton_name(t.name, p.bind(args, {}), args, {}))


@pytest.fixture(scope="module")
def env(redis_url: str) -> Iterator[Env]:
    app = make_app(redis_url, f"rksig-{uuid.uuid4().hex[:8]}", retry_delay=0.05,
                   retry_delay_max=0.2)
    gates: dict[str, threading.Event] = {}

    @app.task(shared=False, singleton=True, singleton_key=("key",),
              concurrency_limit="tenant:{tenant}:2")
    def guarded(key: str, tenant: int, gate: str = "") -> int:
        if gate:
            gates[gate].wait(WAIT)
        return tenant

    @app.task(shared=False, singleton=True, on_locked="skip")
    def skippable() -> str:
        return "ran"

    @app.task(shared=False, singleton=True)
    def retrying() -> str:
        return "ran"

    @app.task(shared=False, concurrency_limit="pool:1")
    def limited() -> str:
        return "ran"

    @app.task(shared=False, concurrency_limit="slow:1", on_limited="wait", limit_timeout=10)
    def waiter() -> str:
        return "ran"

    @app.task(shared=False, concurrency_limit="tight:1", on_limited="wait", limit_timeout=0.3)
    def impatient() -> str:
        return "ran"

    @app.task(shared=False, singleton=True, singleton_scope="queued", on_locked="skip")
    def once(x: int) -> int:
        return x

    @app.task(shared=False, cache_ttl=60)
    def square(x: int) -> int:
        return x * x

    @app.task(shared=False, global_rate_limit="feed:{tenant}:12/m")
    def feed(tenant: int) -> int:
        return tenant

    rec = Recorder(app)
    tasks = dict(guarded=guarded, skippable=skippable, retrying=retrying, limited=limited,
                 waiter=waiter, impatient=impatient, once=once, square=square,
                 feed=feed)
    try:
        with in_process_worker(app, concurrency=4):
            e = Env(app, tasks, rec)
            e.gates = gates  # type: ignore[attr-defined]
            yield e
    finally:
        rec.close()
        app.close()


def test_lease_acquired_and_released_name_the_declared_resource(env: Env) -> None:
    gate = uuid.uuid4().hex
    env.gates[gate] = threading.Event()  # type: ignore[attr-defined]
    result = env.t["guarded"].delay("k1", 7, gate)
    got = env.rec.wait_for("lease_acquired", 2, task_id=result.id)
    lock, permit = got
    assert (lock["kind"], lock["key"]) == ("lock", env.lock_name("guarded", "k1", 7, gate))
    assert lock["name"] == f"singleton:{env.t['guarded'].name}"
    assert (permit["kind"], permit["key"], permit["name"]) == (
        "semaphore", "tenant:7", "tenant:{tenant}")
    assert all(0 <= g["wait"] < WAIT for g in got)
    assert lock["lease"].key == lock["key"] and permit["lease"].kind.resource == "semaphore"
    assert lock["sender"].name == env.t["guarded"].name
    assert env.rec.of("lease_released", task_id=result.id) == []  # still running
    opened = time.monotonic()
    time.sleep(0.2)  # the measured hold, not synchronisation: the gate holds the body
    env.gates[gate].set()  # type: ignore[attr-defined]
    assert result.get(timeout=WAIT) == 7
    gone = env.rec.wait_for("lease_released", 2, task_id=result.id)
    assert [g["kind"] for g in gone] == ["semaphore", "lock"]  # released in reverse order
    assert [g["name"] for g in gone] == ["tenant:{tenant}", lock["name"]]
    assert all(0.2 <= g["held"] < time.monotonic() - opened + 1 for g in gone)
    assert not any(g["lost"] for g in gone)


def test_waiting_for_a_permit_reports_the_wait(env: Env, client: redis.Redis) -> None:
    prefix = env.rt.settings.prefix
    held = env.rt.semaphore(1).acquire("slow", blocking=False)
    result = env.t["waiter"].delay()
    deadline = time.monotonic() + WAIT
    while waiting(client, prefix, "slow", lock=False) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.3)  # the wait to be measured
    held.release()
    assert result.get(timeout=WAIT) == "ran"
    (got,) = env.rec.wait_for("lease_acquired", task_id=result.id)
    assert got["name"] == "slow" and 0.3 <= got["wait"] < WAIT


def test_a_wait_that_runs_out_sends_acquire_timeout(env: Env) -> None:
    held = env.rt.semaphore(1).acquire("tight", blocking=False)
    try:
        result = env.t["impatient"].delay()
        with pytest.raises(LockTimeout):
            result.get(timeout=WAIT)
    finally:
        held.release()
    (got,) = env.rec.wait_for("acquire_timeout", task_id=result.id)
    assert (got["kind"], got["key"], got["name"]) == ("semaphore", "tight", "tight")
    assert 0.3 <= got["wait"] < WAIT
    assert env.rec.of("lease_acquired", task_id=result.id) == []


def test_requeue_on_a_held_lock_and_on_a_full_limit(env: Env) -> None:
    name = env.lock_name("retrying")
    with env.rt.mutex.acquire(name, blocking=False):
        locked = env.t["retrying"].delay()
        first, second = env.rec.wait_for("task_requeued", 2, task_id=locked.id)
    assert locked.get(timeout=WAIT) == "ran"
    assert (first["reason"], first["key"], first["requeues"]) == ("locked", name, 0)
    assert first["name"] == f"singleton:{env.t['retrying'].name}"
    assert second["requeues"] == 1
    assert 0 < first["countdown"] <= 0.2 and 0 < second["countdown"] <= 0.2

    with env.rt.semaphore(1).acquire("pool", blocking=False):
        limited = env.t["limited"].delay()
        (got, *_) = env.rec.wait_for("task_requeued", task_id=limited.id)
    assert limited.get(timeout=WAIT) == "ran"
    assert (got["reason"], got["key"], got["name"]) == ("limited", "pool", "pool")


def test_requeue_on_a_spent_rate_names_the_declared_limiter(env: Env) -> None:
    tenant = uuid.uuid4().int % 10**6
    policy = env.app.tasks[env.t["feed"].name]._rk_policy
    ((_, rate),) = policy.rate_names({"tenant": tenant})
    # the slot of now is spent: the call waits for the next one, 5 s on (12/m)
    assert env.rt.rate_storage.check(f"feed:{tenant}", rate, policy.rate_burst).allowed
    call = env.t["feed"].delay(tenant)
    (requeue,) = env.rec.wait_for("task_requeued", task_id=call.id)
    assert call.get(timeout=WAIT) == tenant
    assert requeue["reason"] == "rate_limited" and requeue["requeues"] == 0
    assert (requeue["key"], requeue["name"]) == (f"feed:{tenant}", "feed:{tenant}")
    assert 0 < requeue["countdown"] <= 5


def test_skip_sends_task_skipped(env: Env) -> None:
    name = env.lock_name("skippable")
    with env.rt.mutex.acquire(name, blocking=False) as hold:
        result = env.t["skippable"].delay()
        assert result.get(timeout=WAIT) is None
    (got,) = env.rec.wait_for("task_skipped", task_id=result.id)
    assert (got["reason"], got["key"], got["holder"]) == ("locked", name, hold.owner)
    assert got["name"] == f"singleton:{env.t['skippable'].name}"


def test_duplicates_at_send_and_in_the_worker(env: Env) -> None:
    once = env.t["once"]
    claim = "queued:" + env.lock_name("once", 1)
    # in the worker: a message sent around apply_async (send_task) meets the claim held
    with env.rt.mutex.acquire(claim, blocking=False) as hold:
        sent = env.app.send_task(once.name, (1,))
        assert sent.get(timeout=WAIT) is None
        (dup,) = env.rec.wait_for("task_duplicate", task_id=sent.id)
        assert dup["where"] == "run" and dup["key"] == claim
        assert dup["existing"] == hold.owner
        assert dup["name"] == f"queued:singleton:{once.name}"
        (skip,) = env.rec.wait_for("task_skipped", task_id=sent.id)
        assert skip["reason"] == "duplicate"
    # at send: the claim is held by a queued message
    first_id = uuid.uuid4().hex
    env.rt.mutex_storage.acquire(claim, "q:" + first_id, 30, 0)  # as a queued message would
    try:
        again = once.delay(1)
        assert again.id == first_id and getattr(again, "rediskit_duplicate", False)
        (dup,) = env.rec.wait_for("task_duplicate", where="send", existing=first_id)
        assert dup["key"] == claim and dup["name"] == f"queued:singleton:{once.name}"
    finally:
        env.rt.mutex_storage.release(claim, "q:" + first_id)


def test_cache_hits_and_misses(env: Env) -> None:
    square = env.t["square"]
    x = int(uuid.uuid4().int % 10**9)
    first = square.delay(x)
    assert first.get(timeout=WAIT) == x * x
    key = square._rk_policy.cache_name(square.name, {"x": x}, (x,), {})
    misses = env.rec.wait_for("cache_miss", 2, key=key)
    assert sorted(m["where"] for m in misses) == ["run", "send"]
    assert [m["task_id"] for m in misses if m["where"] == "run"] == [first.id]
    second = square.delay(x)  # served at send time
    assert second.get(timeout=WAIT) == x * x
    (hit,) = env.rec.wait_for("cache_hit", key=key, where="send")
    assert hit["task_id"] == second.id
    third = env.app.send_task(square.name, (x,))  # past apply_async: the worker's lookup
    assert third.get(timeout=WAIT) == x * x
    (hit,) = env.rec.wait_for("cache_hit", key=key, where="run")
    assert hit["task_id"] == third.id


def test_lease_lost_names_the_resource(redis_url: str, prefix: str) -> None:
    app = make_app(redis_url, prefix, lease=0.6)
    started, check = threading.Event(), threading.Event()

    @app.task(shared=False, bind=True, concurrency_limit="lost:{n}:1")
    def job(self: Any, n: int) -> bool:
        started.set()
        check.wait(WAIT)
        return bool(self.lease.lost)

    rec = Recorder(app)
    try:
        with in_process_worker(app):
            result = job.delay(3)
            assert started.wait(WAIT)
            RedisKit.of(app).runtime().semaphore_storage.clear("lost:3")  # taken away
            (got,) = rec.wait_for("lease_lost", task_id=result.id)
            check.set()
            assert result.get(timeout=WAIT) is True
        assert (got["kind"], got["key"], got["name"]) == ("semaphore", "lost:3", "lost:{n}")
        assert got["reason"] and got["lease"].lost
        (gone,) = rec.wait_for("lease_released", task_id=result.id)
        assert gone["lost"] is True
    finally:
        rec.close()
        app.close()


def test_declared_names() -> None:
    match = NameMatcher(["db", "tenant:{tenant_id}", "tenant:{tenant_id}:io", "{any}"])
    assert match("s", "db") == "db"
    assert match("s", "tenant:42") == "tenant:{tenant_id}"
    assert match("s", "tenant:42:io") == "tenant:{tenant_id}:io"
    assert match("s", "other") == "{any}"
    digest = "0123456789abcdef" * 2
    assert match("m", f"singleton:app.sync:{digest}") == "singleton:app.sync"
    assert match("m", f"queued:singleton:app.sync:{digest}") == "queued:singleton:app.sync"
    assert match("m", f"cache/task:app.sq:{digest}") == "cache/task:app.sq"
    assert NameMatcher([])("s", "tenant:1") == OTHER
