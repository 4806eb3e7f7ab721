"""What ``delay()``/``apply_async()`` do before anything reaches a worker: a cache hit served
at send time, and the queued-scope claim taken before publishing. No worker is needed."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery, states

from celery_rediskit.errors import LockTimeout
from celery_rediskit.integration import RedisKit, TaskDuplicated, TaskLocked
from celery_rediskit.integration import task as task_module
from celery_rediskit.mutex.redis import RedisMutexStorage
from tests.roundtrips import round_trip_client

from .conftest import make_app
from .probe import Probe

WAIT = 20


@pytest.fixture
def other_client(redis_url: str) -> Iterator[Celery]:
    """Another client of the same result backend, as a web process polling by id would be:
    a plain Celery app (no RedisKit) with its own connections."""
    other = Celery("poller", broker=redis_url, backend=redis_url, set_as_current=False)
    yield other
    other.close()


def test_cache_hit_at_delay_resolves_for_another_client(app: Celery, client: redis.Redis,
                                                        prefix: str,
                                                        other_client: Celery) -> None:
    probe = Probe(client, prefix + ":c")

    @app.task(shared=False, cache_ttl="5m")
    def square(x: int) -> int:
        probe.enter()
        probe.exit()
        return x * x

    assert square.apply((7,)).get() == 49  # runs the body here and fills the cache
    hit = square.delay(7)                  # served from the cache at send time
    assert hit.get(timeout=WAIT) == 49 and probe.runs == 1
    assert client.llen(app.conf.task_default_queue) == 0  # nothing was published
    # a client that only knows the id (say, a web request polling it) finds the result
    polled = other_client.AsyncResult(hit.id)
    assert polled.get(timeout=WAIT) == 49
    assert polled.state == states.SUCCESS

    # a caller-chosen id resolves too
    chosen = square.apply_async((7,), task_id=f"{prefix}-chosen")
    assert chosen.id == f"{prefix}-chosen"
    assert other_client.AsyncResult(chosen.id).get(timeout=WAIT) == 49


def _hammer(url: str, prefix: str, qname: str, stop: threading.Event) -> None:
    """Take and release the queued claim ``qname`` as fast as possible, as another producer
    sending the same task and its worker finishing it at once would."""
    client = redis.Redis.from_url(url)
    storage = RedisMutexStorage(client, prefix=prefix)
    owner = "q:hammer-" + threading.current_thread().name
    try:
        while not stop.is_set():
            try:
                storage.acquire(qname, owner, 5.0, 0)
            except LockTimeout:
                continue
            storage.release(qname, owner)
    finally:
        client.close()


def _queued_task(app: Celery) -> Any:
    @app.task(shared=False, singleton=True, singleton_scope="queued", singleton_key=())
    def job() -> None:
        return None

    return app.tasks[job.name]


def test_queued_claim_is_never_published_unclaimed(redis_url: str, prefix: str,
                                                   client: redis.Redis) -> None:
    """The claim is held by others, released meanwhile, taken again...: apply_async must end
    with its own claim or a duplicate's id, never with a message published without a claim."""
    app = make_app(redis_url, prefix)
    job = _queued_task(app)
    rt = RedisKit.of(app).runtime()
    policy = job._rk_policy
    qname = "queued:" + policy.singleton_name(job.name, {}, (), {})
    stop = threading.Event()
    hammers = [threading.Thread(target=_hammer, args=(redis_url, prefix, qname, stop),
                                name=f"h{i}", daemon=True) for i in range(2)]
    for t in hammers:
        t.start()
    sent = duplicates = 0
    unclaimed: list[str] = []
    try:
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline and not unclaimed and sent < 400:
            result = job.delay()
            if getattr(result, "rediskit_duplicate", False):
                duplicates += 1
                continue
            owner = "q:" + result.id
            if rt.mutex_storage.get_lock_info(qname).holder != owner:
                unclaimed.append(result.id)  # published, but the claim is not its own
                continue
            sent += 1
            rt.mutex_storage.release(qname, owner)  # as if its worker had finished it
    finally:
        stop.set()
        for t in hammers:
            t.join(10)
        app.close()
    assert not unclaimed, f"published without its claim: {unclaimed[:3]} ({sent} claimed)"
    assert sent > 0 and duplicates > 0  # both outcomes happened: the race was exercised


def test_queued_claim_that_keeps_changing_hands_is_an_error(
        redis_url: str, prefix: str, client: redis.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """When the claim never settles within the bounded attempts, apply_async raises (naming
    the claim) and publishes nothing."""
    monkeypatch.setattr(task_module, "CLAIM_ATTEMPTS", 1, raising=False)
    app = make_app(redis_url, prefix)
    job = _queued_task(app)
    rt = RedisKit.of(app).runtime()
    qname = "queued:" + job._rk_policy.singleton_name(job.name, {}, (), {})
    queue = app.conf.task_default_queue
    stop = threading.Event()
    hammers = [threading.Thread(target=_hammer, args=(redis_url, prefix, qname, stop),
                                name=f"h{i}", daemon=True) for i in range(2)]
    for t in hammers:
        t.start()
    error: TaskLocked | None = None
    published = 0
    try:
        deadline = time.monotonic() + 10
        while error is None and time.monotonic() < deadline:
            before = client.llen(queue)
            try:
                result = job.delay()
            except TaskLocked as exc:
                error = exc
                assert client.llen(queue) == before  # nothing was published
                break
            if not getattr(result, "rediskit_duplicate", False):
                published += 1
                rt.mutex_storage.release(qname, "q:" + result.id)
    finally:
        stop.set()
        for t in hammers:
            t.join(10)
        app.close()
    assert error is not None, "apply_async never gave up on a claim that changed hands"
    assert error.key == qname and "was not sent" in str(error)
    assert client.llen(queue) == published


def test_a_queued_scope_send_claims_and_records_in_one_round_trip(
        redis_url: str, prefix: str, client: redis.Redis) -> None:
    """On one server ``delay()`` takes the claim and writes the task's claims record in one
    round trip (before: the claim, then the record); a duplicate writes no record, and one
    whose id the caller chose leaves that id's record as it was."""
    counted, trips = round_trip_client(redis_url)
    app = make_app(redis_url, prefix, client=counted)

    @app.task(shared=False, singleton=True, singleton_scope="queued")
    def job(x: int) -> int:
        return x

    rt = RedisKit.of(app).runtime()
    qname = "queued:" + job._rk_policy.singleton_name(job.name, {"x": 1}, (1,), {})
    try:
        job.delay(0)  # warm up: the scripts loaded
        trips.clear()
        first = job.delay(1)
        assert trips == [["EVALSHA"]], "the claim with the record"
        assert rt.claims.held(first.id) == [("m", qname, "q:" + first.id)]
        records = sorted(client.scan_iter(match=f"{prefix}:claims:*"))
        trips.clear()
        again = job.delay(1)
        assert again.id == first.id and trips == [["EVALSHA"], ["EVALSHA"]]  # try, holder
        assert sorted(client.scan_iter(match=f"{prefix}:claims:*")) == records
        client.set(rt.claims.key("chosen"), "another run's record")
        with pytest.raises(TaskDuplicated):
            job.apply_async((1,), task_id="chosen")
        assert client.get(rt.claims.key("chosen")) == b"another run's record"
    finally:
        app.close()
        counted.close()
