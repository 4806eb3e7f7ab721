"""``global_rate_limit``: task starts shared by every worker, with exact re-queue times.

In-process worker (threads pool). Start times are read from the Redis server's clock, the
clock the limiter itself runs on.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
import redis
from celery import Celery

from celery_rediskit import ConfigurationError, RateLimited
from celery_rediskit.integration import RedisKit
from tests.interrupts import wait_until

WAIT = 30


def server_now(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1e6


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"global_rate_limit": "api"}, ["global_rate_limit", "'name:rate'", "'api:100/m'"]),
        ({"global_rate_limit": "api:10/d"}, ["global_rate_limit", "'N/s', 'N/m' or 'N/h'"]),
        ({"global_rate_limit": "api:0/s"}, ["global_rate_limit", "greater than 0"]),
        ({"global_rate_limit": ":10/s"}, ["global_rate_limit"]),
        ({"global_rate_limit": []}, ["global_rate_limit", "a list of them"]),
        ({"global_rate_limit": ["a:1/s", 5]}, ["global_rate_limit", "5"]),
        ({"global_rate_limit": "t:{tenant}:1/s"}, ["global_rate_limit", "'tenant'"]),
        ({"global_rate_limit": "a\nb:1/s"}, ["global_rate_limit", "control character"]),
        ({"global_rate_limit": "a}b:1/s"}, ["global_rate_limit", "bad template"]),
        ({"global_rate_limit": "a:1/s", "global_rate_burst": 0}, ["global_rate_burst",
                                                                   "at least 1"]),
        ({"global_rate_limit": "a:1/s", "global_rate_burst": "5"}, ["global_rate_burst"]),
        ({"global_rate_burst": 5}, ["global_rate_burst needs global_rate_limit"]),
        ({"global_rate_limit": "a:1/s", "on_rate_limited": "skip"}, ["on_rate_limited",
                                                                      "'retry'", "'wait'"]),
    ],
)
def test_invalid_rate_options_fail_at_decoration(redis_url: str, prefix: str,
                                                 options: dict[str, Any],
                                                 words: list[str]) -> None:
    app = Celery("rates", broker=redis_url, set_as_current=False)
    RedisKit(app, prefix=prefix)
    with pytest.raises(ConfigurationError) as info:

        @app.task(shared=False, **options)
        def job(x: int) -> int:
            return x

    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_valid_forms_are_accepted(app: Celery) -> None:
    @app.task(shared=False, global_rate_limit=["api:100/m", "tenant:{tenant_id}:10",
                                               "api:50/m"], global_rate_burst=3)
    def job(tenant_id: int) -> int:
        return tenant_id

    policy = job._rk_policy
    assert policy.rate_burst == 3 and policy.on_rate_limited == "retry"
    names = [(name, rate.text) for name, rate in policy.rate_names({"tenant_id": 7})]
    assert names == [("api", "50/m"), ("tenant:7", "10/s")]  # api listed twice: the slowest


def test_retry_spaces_starts_exactly_without_user_retries(app: Celery, worker: Any,
                                                          client: redis.Redis,
                                                          prefix: str) -> None:
    starts: list[float] = []
    retries: list[int] = []
    slots: list[float] = []
    lock = threading.Lock()

    @app.task(shared=False, bind=True, global_rate_limit="x:5/s")
    def job(self: Any, i: int) -> int:
        with lock:
            starts.append(server_now(client))
            retries.append(self.request.retries)
            paid = (self.request.headers or {}).get("rediskit_rate_paid")
            if paid:
                slots.append(paid["at"])
        return i

    with worker(app):
        first = server_now(client)
        results = [job.delay(i) for i in range(6)]
        assert sorted(r.get(timeout=WAIT) for r in results) == list(range(6))
    starts.sort()
    # One slot per 200 ms (server clock); a run starts at its slot or a little later (the
    # worker's timer), never before: the k-th start is k slots after the first, less the
    # first one's own lateness.
    assert all(t - starts[0] >= k * 0.2 - 0.03 for k, t in enumerate(starts)), starts
    assert starts[-1] - first < 1.0 + 1.0  # and no later than the slots, give or take
    assert retries == [0] * 6  # a rate re-queue is not a user retry
    # One ran at once; the other five were re-queued for the next five slots, 200 ms apart
    # (none shared, none skipped), and started without checking again.
    slots.sort()
    assert len(slots) == 5
    assert all(abs(b - a - 0.2) < 1e-5 for a, b in zip(slots, slots[1:], strict=False)), slots
    assert 0.2 - 0.01 < slots[0] - starts[0] <= 0.2 + 1e-5


def test_wait_blocks_in_the_worker_then_fails_beyond_limit_timeout(
        app: Celery, worker: Any, client: redis.Redis) -> None:
    starts: list[float] = []

    @app.task(shared=False, global_rate_limit="w:4/s", on_rate_limited="wait",
              limit_timeout=0.6)
    def job(i: int) -> int:
        starts.append(server_now(client))
        return i

    with worker(app, concurrency=6):
        results = [job.delay(i) for i in range(5)]
        outcomes = []
        for r in results:
            try:
                outcomes.append(r.get(timeout=WAIT))
            except RateLimited as exc:
                outcomes.append(exc)
    done = [o for o in outcomes if isinstance(o, int)]
    failed = [o for o in outcomes if isinstance(o, RateLimited)]
    # Slots at 0, .25, .5 are within 0.6 s; the 4th and 5th would start later: they fail.
    assert len(done) == 3 and len(failed) == 2, outcomes
    assert all("global rate limit 'w' (4/s)" in str(e) for e in failed), failed
    starts.sort()
    assert all(t - starts[0] >= k * 0.25 - 0.03 for k, t in enumerate(starts)), starts


def test_a_task_waiting_for_its_rate_holds_no_permit(app: Celery, worker: Any,
                                                     client: redis.Redis, prefix: str) -> None:
    go = threading.Event()
    run = uuid.uuid4().hex

    @app.task(shared=False, concurrency_limit=f"db-{run}:2", global_rate_limit=f"r-{run}:1/s",
              on_rate_limited="wait")
    def job(i: int) -> int:
        go.wait(WAIT)
        return i

    storage = RedisKit.of(app).runtime().semaphore_storage
    rates = RedisKit.of(app).runtime().rate_storage
    with worker(app):
        results = [job.delay(i) for i in range(2)]
        wait_until(lambda: storage.get_semaphore_info(f"db-{run}").acquired == 1)
        # The second run reserved the next slot and sleeps for it, holding nothing.
        wait_until(lambda: rates.get_rate_info(f"r-{run}").full_in > 1.0)
        assert storage.get_semaphore_info(f"db-{run}").acquired == 1
        wait_until(lambda: storage.get_semaphore_info(f"db-{run}").acquired == 2)
        go.set()
        assert sorted(r.get(timeout=WAIT) for r in results) == [0, 1]


def test_a_run_turned_away_by_a_lock_gives_its_slot_back(app: Celery, worker: Any,
                                                         client: redis.Redis) -> None:
    go, running = threading.Event(), threading.Event()
    run = uuid.uuid4().hex

    @app.task(shared=False, singleton=True, singleton_key=(), on_locked="skip",
              global_rate_limit=f"r-{run}:5/m", global_rate_burst=5)
    def job(i: int) -> int:
        running.set()
        go.wait(WAIT)
        return i

    rates = RedisKit.of(app).runtime().rate_storage
    with worker(app):
        first = job.delay(0)
        assert running.wait(WAIT)
        assert rates.get_rate_info(f"r-{run}").remaining == 4
        assert job.delay(1).get(timeout=WAIT) is None  # skipped: the lock is held
        assert rates.get_rate_info(f"r-{run}").remaining == 4  # its slot came back
        go.set()
        assert first.get(timeout=WAIT) == 0


def test_templates_make_one_limiter_per_value(app: Celery, worker: Any,
                                              client: redis.Redis, prefix: str) -> None:
    run = uuid.uuid4().hex

    @app.task(shared=False, global_rate_limit=f"t-{run}-{{tenant}}:1/m")
    def job(tenant: str) -> str:
        return tenant

    with worker(app):
        assert job.delay("a").get(timeout=WAIT) == "a"
        assert job.delay("b").get(timeout=WAIT) == "b"  # another tenant: its own budget
    rates = RedisKit.of(app).runtime().rate_storage
    assert rates.get_rate_info(f"t-{run}-a").remaining == 0
    assert rates.get_rate_info(f"t-{run}-b").remaining == 0
    assert rates.get_rate_info(f"t-{run}-c").active is False


def test_eager_runs_cannot_be_requeued(app: Celery) -> None:
    run = uuid.uuid4().hex

    @app.task(shared=False, global_rate_limit=f"e-{run}:1/m")
    def job() -> int:
        return 1

    assert job.apply().get() == 1
    with pytest.raises(Exception, match="eager tasks cannot be re-queued"):
        job.apply().get()
