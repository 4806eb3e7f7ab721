"""Every option inside every canvas: chain, group, chord, chunks and starmap, each with a
running-scope singleton, a queued-scope singleton, a concurrency limit and a cached result.

chain, group and chord send each member as its own message; chunks and starmap run their
items as direct calls inside one Celery builtin task (``celery.starmap``), which the options
must cover too. One in-process worker (4 threads) serves the whole module; each test uses
its own ``run`` id, so keys and probes never mix.
"""

from __future__ import annotations

import gc
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from celery import Celery, chain, chord, group, signals

from celery_rediskit.integration import RedisKit, TaskDuplicated
from celery_rediskit.integration.runtime import Runtime

from .conftest import in_process_worker, make_app, waiting
from .probe import Probe

WAIT = 30
KINDS = ["chain", "group", "chord", "chunks", "starmap"]
ITEMS = list(range(6))
CHAIN = [0, 1, 2]  # the inputs of a 3-link chain started at 0 (each link returns i + 1)


@dataclass
class Env:
    app: Celery
    client: redis.Redis
    prefix: str
    tasks: dict[str, Any]
    retried: set[str] = field(default_factory=set)  # run ids of re-queued tasks

    @property
    def rt(self) -> Runtime:
        return RedisKit.of(self.app).runtime()

    def probe(self, run: str) -> Probe:
        return Probe(self.client, f"{self.prefix}:probe:{run}")

    def lock_name(self, task: str, *args: Any) -> str:
        t = self.app.tasks[self.tasks[task].name]
        p = t._rk_policy
        return str(p.singleton_name(t.name, p.bind(args, {}), args, {}))


@pytest.fixture(scope="module")
def env(redis_url: str) -> Iterator[Env]:
    prefix = f"rkc-{uuid.uuid4().hex[:8]}"
    app = make_app(redis_url, prefix)
    client = redis.Redis.from_url(redis_url)

    def body(i: int, run: str) -> int:
        probe = Probe(client, f"{prefix}:probe:{run}")
        probe.enter()
        time.sleep(0.02)  # work long enough for overlaps to show
        probe.exit()
        return i + 1

    tasks = {
        "single": app.task(shared=False, name="single", singleton=True,
                           singleton_key=("run",))(body),
        "queued": app.task(shared=False, name="queued", singleton=True,
                           singleton_scope="queued")(body),
        "limited": app.task(shared=False, name="limited",
                            concurrency_limit="lim-{run}:2")(body),
        "cached": app.task(shared=False, name="cached", cache_ttl="5m")(body),
    }

    @app.task(shared=False, name="collect")
    def collect(values: list[Any]) -> list[Any]:
        return values

    tasks["collect"] = collect
    e = Env(app, client, prefix, tasks)

    def on_retry(request: Any = None, **_: Any) -> None:
        values = list(getattr(request, "args", None) or ())
        values += list((getattr(request, "kwargs", None) or {}).values())
        e.retried.update(v for v in values if isinstance(v, str))

    signals.task_retry.connect(on_retry, weak=False)
    try:
        with in_process_worker(app, concurrency=4):
            yield e
            # Canvas results sit in reference cycles; collected at interpreter exit, after
            # the private Redis is gone, each one's __del__ would retry a dead connection.
            gc.collect()
    finally:
        signals.task_retry.disconnect(on_retry)
        app.close()
        client.close()


def launch(env: Env, kind: str, task_name: str, run: str) -> Callable[[], list[Any]]:
    """Send the canvas ``kind`` of task ``task_name``; a function returning its results
    as one flat list (a chain: its final value)."""
    task = env.tasks[task_name]
    if kind == "chain":
        res = chain(task.s(CHAIN[0], run), *[task.s(run=run) for _ in CHAIN[1:]]).apply_async()
        return lambda: [res.get(timeout=WAIT)]
    if kind == "group":
        res = group(task.s(i, run) for i in ITEMS).apply_async()
        return lambda: list(res.get(timeout=WAIT))
    if kind == "chord":
        res = chord(task.s(i, run) for i in ITEMS)(env.tasks["collect"].s())
        return lambda: list(res.get(timeout=WAIT))
    if kind == "chunks":
        res = task.chunks([(i, run) for i in ITEMS], 2).apply_async()
        return lambda: [v for part in res.get(timeout=WAIT) for v in part]
    res = task.starmap([(i, run) for i in ITEMS]).apply_async()
    return lambda: list(res.get(timeout=WAIT))


def inputs(kind: str) -> list[int]:
    return CHAIN if kind == "chain" else ITEMS


def expected(kind: str) -> list[Any]:
    return [CHAIN[-1] + 1] if kind == "chain" else [i + 1 for i in ITEMS]


def wait_blocked(env: Env, run: str, name: str, *, lock: bool) -> None:
    """Wait until the canvas's first task has met the held lock or full limit: re-queued
    (chain, group, chord) or queued in Redis (the items of chunks and starmap); or until a
    body ran anyway."""
    probe = env.probe(run)
    deadline = time.monotonic() + WAIT
    while not (run in env.retried or waiting(env.client, env.prefix, name, lock=lock)
               or probe.runs):
        assert time.monotonic() < deadline, "the canvas never started"
        time.sleep(0.01)


@pytest.mark.parametrize("kind", KINDS)
def test_running_scope_singleton(env: Env, kind: str) -> None:
    run = uuid.uuid4().hex
    name = env.lock_name("single", 0, run)
    hold = env.rt.mutex.acquire(name, blocking=False)  # another task with this key runs
    try:
        results = launch(env, kind, "single", run)
        wait_blocked(env, run, name, lock=True)
        assert env.probe(run).runs == 0, "a body ran while another held the lock"
    finally:
        hold.release()
    assert sorted(results()) == expected(kind)
    probe = env.probe(run)
    assert probe.peak == 1 and probe.runs == len(inputs(kind))
    assert not env.rt.mutex_storage.is_locked(name)


@pytest.mark.parametrize("kind", KINDS)
def test_concurrency_limit(env: Env, kind: str) -> None:
    run = uuid.uuid4().hex
    name = f"lim-{run}"
    sem = env.rt.semaphore(2)
    holds = [sem.acquire(name, blocking=False) for _ in range(2)]  # the limit is full
    try:
        results = launch(env, kind, "limited", run)
        wait_blocked(env, run, name, lock=False)
        assert env.probe(run).runs == 0, "a body ran while the limit was full"
    finally:
        for hold in holds:
            hold.release()
    assert sorted(results()) == expected(kind)
    probe = env.probe(run)
    assert probe.peak <= 2 and probe.runs == len(inputs(kind))
    assert env.rt.semaphore_storage.get_semaphore_info(name).available == 2


@pytest.mark.parametrize("kind", KINDS)
def test_cached_result(env: Env, kind: str) -> None:
    run = uuid.uuid4().hex
    cached = env.tasks["cached"]
    assert cached.apply((1, run)).get() == 2  # input 1 is cached before the canvas runs
    assert sorted(launch(env, kind, "cached", run)()) == expected(kind)
    probe = env.probe(run)
    assert probe.runs == len(inputs(kind)), "the cached input ran again"
    # every input is cached now: a call is served at send time, without a body
    assert [cached.delay(i, run).get(timeout=WAIT) for i in inputs(kind)] == \
        [i + 1 for i in inputs(kind)]
    assert probe.runs == len(inputs(kind))


@pytest.mark.parametrize("kind", KINDS)
def test_queued_scope_singleton(env: Env, kind: str) -> None:
    run = uuid.uuid4().hex
    assert sorted(launch(env, kind, "queued", run)()) == expected(kind)
    assert env.probe(run).runs == len(inputs(kind))
    storage = env.rt.mutex_storage
    for i in inputs(kind):  # every claim is given back when its task ends
        assert not storage.is_locked("queued:" + env.lock_name("queued", i, run))


@pytest.mark.parametrize("kind", KINDS)
def test_queued_scope_member_already_queued(env: Env, kind: str) -> None:
    """One input of the canvas is already queued elsewhere (its claim is held): members sent
    as messages with callbacks are refused with TaskDuplicated, never dropped silently;
    items of chunks and starmap are skipped (None) like a duplicate met at the worker."""
    run = uuid.uuid4().hex
    dup = inputs(kind)[-1]  # a chain's last link: sent by the worker with no callbacks left
    qname = "queued:" + env.lock_name("queued", dup, run)
    other = uuid.uuid4().hex
    storage = env.rt.mutex_storage
    storage.acquire(qname, "q:" + other, 60.0, 0)
    try:
        if kind in ("group", "chord"):
            with pytest.raises(TaskDuplicated) as info:
                launch(env, kind, "queued", run)
            assert info.value.task_id == other
            return
        results = launch(env, kind, "queued", run)
        if kind == "chain":
            with pytest.raises(TaskDuplicated) as info:
                results()
            assert info.value.task_id == other
            assert env.probe(run).runs == len(CHAIN) - 1
            return
        assert results() == [None if i == dup else i + 1 for i in ITEMS]
        assert env.probe(run).runs == len(ITEMS) - 1
    finally:
        storage.release(qname, "q:" + other)


def test_starmap_item_and_a_message_of_the_same_key_never_overlap(env: Env) -> None:
    """A starmap item takes the lock like a message does: while it runs, a message of the
    same key is re-queued, and the other way round."""
    run = uuid.uuid4().hex
    single = env.tasks["single"]
    results = [single.starmap([(i, run) for i in range(4)]).apply_async()]
    results += [single.delay(10 + i, run) for i in range(4)]
    values = [r.get(timeout=WAIT) for r in results]
    assert values[0] == [1, 2, 3, 4] and sorted(values[1:]) == [11, 12, 13, 14]
    probe = env.probe(run)
    assert probe.peak == 1 and probe.runs == 8

