"""``on_locked="park"`` / ``on_limited="park"`` on a real in-process worker and the private
Redis: blocked tasks wait in Redis and are re-sent when their lock or permit frees."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest
from celery import chord, group
from celery.result import AsyncResult
from click.testing import CliRunner
from kombu.utils.json import dumps
from prometheus_client import CollectorRegistry

from celery_rediskit.errors import ConfigurationError
from celery_rediskit.integration import RedisKit, TaskLocked, metrics
from celery_rediskit.integration.cli import rediskit
from celery_rediskit.integration.control import lock_report
from celery_rediskit.integration.parking import (
    PARKED,
    parked_tasks,
    publish,
    publish_all,
    store_of,
)
from celery_rediskit.integration.signals import task_parked
from celery_rediskit.parking import Dispatch
from tests.late_replies import LateReplies, late_replies_client

from .conftest import make_app
from .probe import Probe

WAIT = 30


def wait_for(what: Any, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def hold_until(client: Any, key: str, timeout: float = WAIT) -> None:
    """Block until ``key`` is pushed to, in waits of 1 s (redis-py 8's default socket
    timeout, 5 s, would cut a longer BLPOP)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not client.blpop([key], timeout=1):
        pass


def runs(client: Any, key: str) -> Counter[str]:
    return Counter(x.decode() for x in client.lrange(key, 0, -1))


def parked_count(app: Any, kind: str, name: str) -> int:
    return sum(store_of(RedisKit.of(app).runtime()).counts([(kind, name)])[0])


def holding_job(app: Any, client: Any, prefix: str, **options: Any) -> Any:
    """A task ``job(hold)`` with ``options`` (how it parks): it records its id in
    ``<prefix>:runs``, holds what it took until ``<prefix>:go`` is pushed to when ``hold``,
    and returns its id."""
    key = prefix + ":runs"

    @app.task(shared=False, bind=True, **options)
    def job(self: Any, hold: bool) -> str:
        client.rpush(key, self.request.id)
        if hold:
            hold_until(client, prefix + ":go")
        return self.request.id

    return job


def probed_job(app: Any, client: Any, probe: Probe, key: str, limit: str) -> Any:
    """A task ``job(i)`` limited to ``limit`` that parks: it runs 0.05 s inside ``probe``,
    records its id in ``key`` and returns ``i``."""

    @app.task(shared=False, bind=True, concurrency_limit=limit, on_limited="park")
    def job(self: Any, i: int) -> int:
        probe.enter()
        client.rpush(key, self.request.id)
        time.sleep(0.05)
        probe.exit()
        return i

    return job


def test_park_is_validated_at_decoration(app: Any) -> None:
    @app.task(shared=False, singleton=True, on_locked="park")
    def a() -> None: ...

    @app.task(shared=False, concurrency_limit="x:1", on_limited="park")
    def b() -> None: ...

    assert a._rk_policy.parks and b._rk_policy.parks
    with pytest.raises(ConfigurationError, match="on_limited must be one of.*'park'"):
        @app.task(shared=False, concurrency_limit="x:1", on_limited="parked")
        def c() -> None: ...
    with pytest.raises(ConfigurationError, match="on_locked must be one of.*'park'"):
        @app.task(shared=False, singleton=True, on_locked="Park")
        def d() -> None: ...


def test_limited_tasks_park_and_all_run_once(app, worker, client, prefix) -> None:
    probe = Probe(client, prefix + ":p")
    key = prefix + ":runs"
    job = probed_job(app, client, probe, key, "x:2")

    seen: list[dict[str, Any]] = []

    def on_parked(**kwargs: Any) -> None:
        seen.append(kwargs)

    task_parked.connect(on_parked, weak=False)
    try:
        with worker(app, concurrency=6):
            results = [job.delay(i) for i in range(24)]
            wait_for(lambda: parked_count(app, "s", "x") > 0)
            assert sorted(r.get(timeout=WAIT) for r in results) == list(range(24))
    finally:
        task_parked.disconnect(on_parked)
    assert seen and {(s["reason"], s["key"], s["name"]) for s in seen} == {
        ("limited", "x", "x")}
    assert probe.peak == 2 and probe.runs == 24
    assert set(runs(client, key).values()) == {1}
    assert parked_count(app, "s", "x") == 0
    assert RedisKit.of(app).runtime().semaphore_storage.get_semaphore_info("x").acquired == 0


def test_singleton_parks_then_runs_when_the_holder_releases(app, worker, client,
                                                             prefix) -> None:
    key = prefix + ":runs"
    job = holding_job(app, client, prefix, singleton=True, singleton_key=(),
                      on_locked="park")

    with worker(app, concurrency=4):
        first = job.delay(True)
        wait_for(lambda: client.llen(key) == 1)
        waiting = [job.delay(False) for _ in range(3)]
        wait_for(lambda: parked_count(app, "m", job_lock(app, job)) == 3)
        # parked: a documented non-ready state, and the worker slots are free
        for r in waiting:
            assert AsyncResult(r.id, app=app).state == PARKED
            assert not AsyncResult(r.id, app=app).ready()
        parked = [t["task_id"] for t in parked_tasks(app)]  # in the order they parked
        assert sorted(parked) == sorted(r.id for r in waiting)
        client.rpush(prefix + ":go", 1)
        assert first.get(timeout=WAIT) == first.id
        # each re-sent with its own id, oldest turn first
        assert [r.get(timeout=WAIT) for r in waiting] == [r.id for r in waiting]
    order = [x.decode() for x in client.lrange(key, 0, -1)]
    assert order == [first.id, *parked]


def job_lock(app: Any, task: Any) -> str:
    policy = task._rk_policy
    return str(policy.singleton_name(task.name, policy.bind((False,), {}), (False,), {}))


def test_parked_message_keeps_routing_callbacks_and_chord(app, worker, client,
                                                          prefix) -> None:
    @app.task(shared=False, bind=True, concurrency_limit="c:1", on_limited="park")
    def part(self: Any, x: int) -> int:
        client.rpush(prefix + ":order", x)
        time.sleep(0.02)
        return x * 10

    @app.task(shared=False)
    def total(values: list[int]) -> int:
        return sum(values)

    @app.task(shared=False)
    def note(value: int) -> None:
        client.rpush(prefix + ":linked", value)

    with worker(app, concurrency=4):
        res = chord(group(part.s(i) for i in range(6)), total.s()).apply_async()
        assert res.get(timeout=WAIT) == 150
        linked = part.apply_async((7,), link=note.s(), priority=5)
        assert linked.get(timeout=WAIT) == 70
        wait_for(lambda: client.llen(prefix + ":linked") == 1)
    assert sorted(int(x) for x in client.lrange(prefix + ":order", 0, -1)) == [*range(6), 7]


def test_revoke_removes_a_parked_task(app, worker, client, prefix) -> None:
    @app.task(shared=False, bind=True, concurrency_limit="r:1", on_limited="park")
    def job(self: Any, hold: bool) -> str:
        client.rpush(prefix + ":runs", self.request.id)
        if hold:
            hold_until(client, prefix + ":go")
        return "done"

    with worker(app, concurrency=4):
        holder = job.delay(True)
        wait_for(lambda: client.llen(prefix + ":runs") == 1)
        victim, other = job.delay(False), job.delay(False)
        wait_for(lambda: parked_count(app, "s", "r") == 2)
        victim.revoke()
        wait_for(lambda: parked_count(app, "s", "r") == 1)
        # stored right after the removal, by the worker that removed it
        wait_for(lambda: AsyncResult(victim.id, app=app).state == "REVOKED")
        client.rpush(prefix + ":go", 1)
        assert holder.get(timeout=WAIT) == "done" and other.get(timeout=WAIT) == "done"
    assert victim.id not in runs(client, prefix + ":runs")


def test_lock_report_and_inspect_show_parked(app, worker, client, prefix) -> None:
    @app.task(shared=False, concurrency_limit="rep:1", on_limited="park")
    def job(hold: bool) -> None:
        if hold:
            hold_until(client, prefix + ":go")

    with worker(app, concurrency=4) as w:
        first = job.delay(True)
        wait_for(lambda: RedisKit.of(app).runtime().semaphore_storage
                 .get_semaphore_info("rep").acquired == 1)
        rest = [job.delay(False) for _ in range(2)]
        wait_for(lambda: parked_count(app, "s", "rep") == 2)
        (resource,) = [r for r in lock_report(app, ping=False).resources if r.key == "rep"]
        assert resource.parked == 2
        (reply,) = app.control.broadcast("rediskit_parked", reply=True, timeout=5,
                                         destination=[w.hostname])
        listed = reply[w.hostname]
        assert sorted(t["task_id"] for t in listed) == sorted(r.id for r in rest)
        assert {t["resource"] for t in listed} == {"rep"}
        client.rpush(prefix + ":go", 1)
        first.get(timeout=WAIT)
        for r in rest:
            r.get(timeout=WAIT)


def test_dead_holder_lease_expiry_resends_within_lease_plus_two(worker, client, redis_url,
                                                                 prefix) -> None:
    app = make_app(redis_url, prefix, lease=2.0)

    @app.task(shared=False, concurrency_limit="dead:1", on_limited="park")
    def job() -> float:
        return time.time()

    storage = RedisKit.of(app).runtime().semaphore_storage
    # a holder that takes the only permit and dies (is never renewed nor released)
    assert storage.try_acquire("dead", "ghost/1/x:1", 1, 2.0) == 1
    taken = time.time()
    with worker(app, concurrency=2):
        r = job.delay()
        wait_for(lambda: parked_count(app, "s", "dead") == 1)
        ran = r.get(timeout=WAIT)
    assert ran - taken <= 2.0 + 2.0


def test_eager_park_raises_task_locked(app) -> None:
    @app.task(shared=False, singleton=True, singleton_key=(), on_locked="park")
    def job() -> None: ...

    storage = RedisKit.of(app).runtime().mutex_storage
    name = job._rk_policy.singleton_name(job.name, {}, (), {})
    storage.try_acquire(name, "someone/1/x:1", 5.0)
    with pytest.raises(TaskLocked):
        job.apply(throw=True).get()


def test_multiple_limits_keep_the_turn(app, worker, client, prefix) -> None:
    """A task with two limits parks at the first full one (releasing what it took); re-sent
    from there, it meets the other full and parks again with the turn of its first park, so
    it goes ahead of a task that parked there after that turn (the turn rule)."""
    order = prefix + ":order"

    def body(tag: str, hold: bool) -> str:
        client.rpush(order, tag)
        if hold:
            hold_until(client, f"{prefix}:go:{tag}")
        return tag

    @app.task(shared=False, concurrency_limit=["ta:1", "tb:1"], on_limited="park")
    def both(tag: str, hold: bool = False) -> str:
        return body(tag, hold)

    @app.task(shared=False, concurrency_limit="ta:1", on_limited="park")
    def only_a(tag: str, hold: bool = False) -> str:
        return body(tag, hold)

    @app.task(shared=False, concurrency_limit="tb:1", on_limited="park")
    def only_b(tag: str, hold: bool = False) -> str:
        return body(tag, hold)

    with worker(app, concurrency=6):
        hb = only_b.delay("HB", True)
        wait_for(lambda: client.llen(order) == 1)
        t = both.delay("T")  # takes ta, parks at tb (its turn: now), gives ta back
        wait_for(lambda: parked_count(app, "s", "tb") == 1)
        ha = only_a.delay("HA", True)
        wait_for(lambda: client.llen(order) == 2)
        u = only_a.delay("U")  # parks at ta, after T's turn
        wait_for(lambda: parked_count(app, "s", "ta") == 1)
        client.rpush(f"{prefix}:go:HB", 1)
        # T is re-sent for tb, finds ta full and parks there with its first turn
        wait_for(lambda: parked_count(app, "s", "ta") == 2)
        assert [e["task_id"] for e in parked_tasks(app) if e["resource"] == "ta"] == \
            [t.id, u.id]
        client.rpush(f"{prefix}:go:HA", 1)
        for r in (hb, ha, t, u):
            r.get(timeout=WAIT)
    assert [x.decode() for x in client.lrange(order, 0, -1)] == ["HB", "HA", "T", "U"]


def test_locks_command_shows_parked_counts(app, worker, client, prefix) -> None:
    """``celery rediskit locks`` prints the parked count under the resource (table), and
    ``parked`` in its JSON."""
    @app.task(shared=False, concurrency_limit="cli:1", on_limited="park")
    def job(hold: bool) -> None:
        if hold:
            hold_until(client, prefix + ":go")

    class Obj:
        pass

    obj = Obj()
    obj.app = app  # type: ignore[attr-defined]
    with worker(app, concurrency=4):
        first = job.delay(True)
        wait_for(lambda: RedisKit.of(app).runtime().semaphore_storage
                 .get_semaphore_info("cli").acquired == 1)
        rest = [job.delay(False) for _ in range(3)]
        wait_for(lambda: parked_count(app, "s", "cli") == 3)
        out = CliRunner().invoke(rediskit, ["locks", "--no-ping"], obj=obj)
        assert out.exit_code == 0, out.output
        assert "parked" in out.output and "3 task(s) waiting" in out.output
        client.rpush(prefix + ":go", 1)
        first.get(timeout=WAIT)
        for r in rest:
            r.get(timeout=WAIT)


def test_a_resent_task_is_described_and_released_by_task_id(app, worker, client,
                                                             prefix) -> None:
    """The re-sent run records its claims (the adopted reservation) like any run: the lock
    report names it, and a release by task id (revoke, kill) finds it."""
    @app.task(shared=False, bind=True, concurrency_limit="rec:1", on_limited="park")
    def job(self: Any, tag: str) -> str:
        client.rpush(prefix + ":started", tag)
        hold_until(client, f"{prefix}:go:{tag}")
        return tag

    with worker(app, concurrency=4):
        first = job.delay("first")
        wait_for(lambda: client.llen(prefix + ":started") == 1)
        second = job.delay("second")
        wait_for(lambda: parked_count(app, "s", "rec") == 1)
        client.rpush(f"{prefix}:go:first", 1)
        wait_for(lambda: client.llen(prefix + ":started") == 2)
        (res,) = [r for r in lock_report(app, ping=False).resources if r.key == "rec"]
        assert [h.task_id for h in res.holders] == [second.id]
        assert res.holders[0].owner.startswith("park:")
        assert RedisKit.of(app).runtime().claims.held(second.id)
        client.rpush(f"{prefix}:go:second", 1)
        assert (first.get(timeout=WAIT), second.get(timeout=WAIT)) == ("first", "second")


def test_parks_are_counted_in_the_metrics(app, worker, client, prefix) -> None:
    """``rediskit_tasks_parked_total{reason, name}`` counts the ``task_parked`` signal."""
    registry = CollectorRegistry()
    metrics.enable(registry)
    try:
        @app.task(shared=False, concurrency_limit="met:1", on_limited="park")
        def job(hold: bool) -> None:
            if hold:
                hold_until(client, prefix + ":go")

        with worker(app, concurrency=4):
            first = job.delay(True)
            wait_for(lambda: RedisKit.of(app).runtime().semaphore_storage
                     .get_semaphore_info("met").acquired == 1)
            rest = [job.delay(False) for _ in range(2)]
            wait_for(lambda: parked_count(app, "s", "met") == 2)
            client.rpush(prefix + ":go", 1)
            for r in (first, *rest):
                r.get(timeout=WAIT)
        assert registry.get_sample_value(
            "rediskit_tasks_parked_total", {"reason": "limited", "name": "met"}) == 2
    finally:
        metrics.disable()


def test_a_resent_message_goes_to_the_front_of_its_redis_queue(app, client, prefix) -> None:
    """A re-sent parked message was sent before everything queued since, and its lock or
    permit is reserved while it travels: it is consumed next, not after the queue."""

    @app.task(shared=False, name="front", concurrency_limit="front:1", on_limited="park")
    def front(i: int) -> int:
        return i

    queue = app.conf.task_default_queue
    for i in range(5):  # sent since it parked; no worker consumes this queue
        front.delay(i)
    message = front.signature((99,), task_id="parked-1", queue=queue)
    d = Dispatch(kind="s", name="front", id="parked-1", payload=dumps(dict(message)).encode(),
                 dispatch_id="d-" + prefix, turn=1)
    publish(app, d)
    assert client.llen(queue) == 6
    following = client.lindex(queue, -1)  # kombu consumes from the right end (BRPOP)
    assert b"parked-1" in following and ("d-" + prefix).encode() in following


def test_resent_messages_are_consumed_oldest_turn_first(app, client, prefix) -> None:
    """One release re-sends several messages (reserved ones, then ones sent ahead): each goes
    to the front, and they are consumed in turn order, the reserved ones first (their
    permits idle until they arrive)."""

    @app.task(shared=False, name="order", concurrency_limit="order:2", on_limited="park")
    def order(i: int) -> int:
        return i

    queue = app.conf.task_default_queue
    for i in range(3):  # sent since they parked; no worker consumes this queue
        order.delay(i)
    taken = []
    for i in range(4):  # turns 1..4: two reserved (freed permits), then two sent ahead
        message = order.signature((i,), task_id=f"parked-{i}", queue=queue)
        taken.append(Dispatch(kind="s", name="order", id=f"parked-{i}",
                              payload=dumps(dict(message)).encode(),
                              dispatch_id=f"d{i}-{prefix}", turn=i + 1))
    publish_all(app, store_of(RedisKit.of(app).runtime()), taken)
    assert client.llen(queue) == 7
    consumed = [client.lindex(queue, -1 - k) for k in range(4)]  # BRPOP: the right end first
    assert [f"parked-{i}".encode() in m for i, m in enumerate(consumed)] == [True] * 4


def test_short_runs_send_the_next_parked_task_ahead(app, worker, client, prefix) -> None:
    """A run of <= AHEAD_HOLD seconds sends the next parked task ahead at its release: it
    waits in a worker (state "ahead") and takes the permit the moment the next release frees
    it. Every task still runs once, one at a time, in the order they parked."""
    probe = Probe(client, prefix + ":p")
    key = prefix + ":runs"
    job = probed_job(app, client, probe, key, "x:1")

    states: set[str] = set()
    order: list[str] = []
    with worker(app, concurrency=6):
        results = [job.delay(i) for i in range(12)]
        wait_for(lambda: parked_count(app, "s", "x") >= 5)
        order = [t["task_id"] for t in sorted(parked_tasks(app), key=lambda t: t["turn"])]
        deadline = time.monotonic() + WAIT
        while not all(r.ready() for r in results):
            assert time.monotonic() < deadline
            tasks = parked_tasks(app)
            states |= {t["state"] for t in tasks}
            assert sum(t["state"] == "ahead" for t in tasks) <= 1  # one per permit
            time.sleep(0.005)
        assert sorted(r.get(timeout=WAIT) for r in results) == list(range(12))
    assert "ahead" in states
    assert probe.peak == 1 and probe.runs == 12
    assert set(runs(client, key).values()) == {1}
    ran = [x.decode() for x in client.lrange(key, 0, -1)]
    assert [t for t in ran if t in order] == order  # the parked ones ran in their turn
    assert parked_count(app, "s", "x") == 0
    assert RedisKit.of(app).runtime().semaphore_storage.get_semaphore_info("x").acquired == 0


def test_a_blocked_message_parks_on_receipt_without_a_pool_process(app, worker, client,
                                                                   prefix) -> None:
    """The worker's main process parks a fresh message whose limit is full as it receives
    it: with the only pool process busy (running the holder of the only permit), the
    waiters park at once, PARKED, with the task_parked signal; then each runs once, in the
    order they parked."""
    key = prefix + ":runs"
    job = holding_job(app, client, prefix, concurrency_limit="x:1", on_limited="park")

    seen: list[str] = []

    def on_parked(task_id: str = "", **_: Any) -> None:
        seen.append(task_id)

    task_parked.connect(on_parked, weak=False)
    try:
        with worker(app, concurrency=1):
            first = job.delay(True)
            wait_for(lambda: client.llen(key) == 1)
            waiting = [job.delay(False) for _ in range(3)]
            # the pool's one process runs the holder: only the main process can park them
            wait_for(lambda: parked_count(app, "s", "x") == 3, timeout=10)
            assert [AsyncResult(r.id, app=app).state for r in waiting] == [PARKED] * 3
            assert sorted(seen) == sorted(r.id for r in waiting)
            order = [t["task_id"] for t in sorted(parked_tasks(app), key=lambda t: t["turn"])]
            client.rpush(prefix + ":go", 1)
            assert first.get(timeout=WAIT) == first.id
            assert [r.get(timeout=WAIT) for r in waiting] == [r.id for r in waiting]
    finally:
        task_parked.disconnect(on_parked)
    assert [x.decode() for x in client.lrange(key, 0, -1)] == [first.id, *order]
    assert parked_count(app, "s", "x") == 0


def test_ahead_settings_are_validated_naming_the_setting(redis_url: str, prefix: str) -> None:
    app = make_app(redis_url, prefix, park_ahead_hold="2s", park_ahead_wait="1m")
    settings = RedisKit.of(app).settings
    assert (settings.park_ahead_hold, settings.park_ahead_wait) == (2.0, 60.0)
    app.close()
    off = make_app(redis_url, prefix, park_ahead_hold="0")  # as an environment variable
    assert RedisKit.of(off).settings.park_ahead_hold == 0.0
    off.close()
    with pytest.raises(ConfigurationError,
                       match=r"^rediskit_park_ahead_hold must be .*got 'soon' \(or 0: nothing"):
        make_app(redis_url, prefix, park_ahead_hold="soon")
    with pytest.raises(ConfigurationError, match=r"^rediskit_park_ahead_wait must be .*got 0"):
        make_app(redis_url, prefix, park_ahead_wait=0)


@pytest.mark.parametrize(("hold", "wait", "held"), [(600, 0.5, 1.3), (0, 5, 0.05)])
def test_ahead_settings_reach_the_workers(redis_url, worker, client, prefix, hold, wait,
                                          held) -> None:
    """``rediskit_park_ahead_hold``: a run held 0.3 s longer than the default 1 s sends ahead
    with the setting at 600 s; ``rediskit_park_ahead_wait``: the message sent ahead then
    gives its wait up after 0.5 s (the default is 5 s), its entry parked at its turn again;
    every task still runs once, in turn. With ``park_ahead_hold=0`` nothing is sent ahead,
    even after a run of 0.05 s."""
    app = make_app(redis_url, prefix, park_ahead_hold=hold, park_ahead_wait=wait)
    key = f"{prefix}:runs"

    @app.task(shared=False, bind=True, concurrency_limit="x:1", on_limited="park")
    def job(self: Any, tag: str, hold_for: float) -> str:
        client.rpush(key, tag)
        if hold_for < 0:
            hold_until(client, f"{prefix}:go:{tag}")
        time.sleep(max(0.0, hold_for))
        return tag

    states: list[str] = []
    with worker(app, concurrency=4):
        first = job.delay("a", held)
        wait_for(lambda: client.llen(key) == 1)
        second = job.delay("b", -1)
        third = job.delay("c", 0)
        wait_for(lambda: parked_count(app, "s", "x") == 2)
        if hold:
            # a's release re-sends b and sends c ahead, which waits, then gives up
            wait_for(lambda: any(t["state"] == "ahead" for t in parked_tasks(app)))
            wait_for(lambda: [t["state"] for t in parked_tasks(app)] == ["parked"], timeout=3)
        else:
            first.get(timeout=WAIT)
            wait_for(lambda: client.llen(key) == 2)
            states = [t["state"] for t in parked_tasks(app)]
        client.rpush(f"{prefix}:go:b", 1)
        assert [r.get(timeout=WAIT) for r in (first, second, third)] == ["a", "b", "c"]
    if not hold:
        assert states == ["parked"]  # c: nothing sent ahead at a's release
    assert [x.decode() for x in client.lrange(key, 0, -1)] == ["a", "b", "c"]
    app.close()


def test_a_message_with_bad_arguments_goes_to_its_run(app, worker, client, prefix) -> None:
    """Arguments that do not fit the task are the run's to report (it fails, as before);
    parking on receipt goes on for the next messages (it is not a Redis failure, which would
    pause it)."""
    key = prefix + ":runs"
    job = holding_job(app, client, prefix, concurrency_limit="x:1", on_limited="park")

    app.conf.worker_prefetch_multiplier = 4  # the bad one waits for the pool, not in front
    with worker(app, concurrency=1):
        first = job.delay(True)
        wait_for(lambda: client.llen(key) == 1)
        bad = app.send_task(job.name, args=(1, 2, 3))
        good = job.delay(False)
        wait_for(lambda: parked_count(app, "s", "x") == 1, timeout=10)  # parked on receipt
        assert parked_tasks(app)[0]["task_id"] == good.id
        client.rpush(prefix + ":go", 1)
        assert first.get(timeout=WAIT) == first.id
        with pytest.raises(TypeError):
            bad.get(timeout=WAIT)
        assert good.get(timeout=WAIT) == good.id


@pytest.mark.parametrize("options", [
    {"singleton": True, "singleton_key": (), "on_locked": "park"},
    {"concurrency_limit": "x:1", "on_limited": "park"},
], ids=["lock", "permit"])
def test_a_runs_lease_counts_from_the_request_that_granted_it(redis_url, prefix,
                                                              options) -> None:
    """The lock or permit a run takes counts its lease from when the try's request was
    sent (the storage's ``Grant``), not from when its late reply arrived: the body sees a
    lease renewed last before the reply came."""
    late = late_replies_client(redis_url)
    app = make_app(redis_url, prefix, client=late)

    @app.task(shared=False, bind=True, **options)
    def job(self: Any) -> tuple[float, float]:
        lease = self.lease
        assert lease is not None
        return lease.last_renewed, time.monotonic()

    try:
        job.apply().get()  # scripts loaded, connection made
        LateReplies.late = 0.3
        sent = time.monotonic()
        renewed, ran = job.apply().get()
    finally:
        LateReplies.late = 0.0
        app.close()
        late.close()
    assert ran - sent >= 0.3  # the reply came late
    assert sent <= renewed <= sent + 0.1, "counted from the request, not the reply"
