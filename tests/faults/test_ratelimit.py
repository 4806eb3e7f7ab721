"""The rate limiter when Redis fails: a check never answers without Redis.

A check that cannot reach Redis raises redis-py's error (after the client's own retries): it
neither lets a call through unchecked nor refuses it silently. What a restart keeps: with
persistence (the AOF), the limiter's state and so its budget; without, the state is gone and
the burst is free again (a restart is an idle period).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from celery_rediskit import RedisRateLimitStorage, create_rate_limiter
from tests.celery.conftest import in_process_worker, make_app
from tests.faults.proxy import FaultProxy
from tests.faults.servers import FaultServer


@pytest.fixture
def healed(fault_proxy: FaultProxy) -> Iterator[FaultProxy]:
    yield fault_proxy
    fault_proxy.heal()


def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5,
                                retry=Retry(NoBackoff(), 0))


def test_a_blackholed_check_raises_and_the_next_one_after_healing_is_exact(
        healed: FaultProxy, prefix: str) -> None:
    client = _client(healed.url)
    limiter = create_rate_limiter("1/m", storage=RedisRateLimitStorage(client, prefix))
    assert limiter.try_acquire("api") == (True, 0.0)
    healed.blackhole()
    with pytest.raises(redis.TimeoutError):
        limiter.try_acquire("api")
    with pytest.raises(redis.TimeoutError):
        limiter.acquire("api", timeout=120)
    healed.heal()
    allowed, retry_after = limiter.try_acquire("api")
    # Nothing the failed calls sent was granted: the one slot taken is the first one.
    assert not allowed and 50 < retry_after <= 60
    client.close()


@pytest.mark.parametrize("keep_data", [True, False])
def test_checks_during_a_restart_raise_and_the_budget_follows_the_data(
        fault_server: FaultServer, prefix: str, keep_data: bool) -> None:
    client = _client(fault_server.url)
    limiter = create_rate_limiter("1/m", storage=RedisRateLimitStorage(client, prefix))
    assert limiter.try_acquire("api")[0]
    fault_server.stop()
    with pytest.raises(redis.ConnectionError):
        limiter.try_acquire("api")
    if not keep_data:
        fault_server.wipe()
    fault_server.server.start()
    allowed, retry_after = limiter.try_acquire("api")  # the script is loaded again by itself
    if keep_data:
        assert not allowed and 50 < retry_after <= 60
    else:
        assert allowed
    client.close()


def test_a_task_whose_rate_check_cannot_reach_redis_fails_loudly(
        healed: FaultProxy, redis_url: str, prefix: str) -> None:
    """The kit's Redis (behind the proxy) stops answering while a rate-limited task is
    checked: the task fails with redis-py's error in its result, its body never runs
    unchecked, and after healing the next call runs."""
    app = make_app(redis_url, prefix, url=healed.url, socket_timeout=0.5,
                   redis_options={"retry": Retry(NoBackoff(), 0)})
    ran: list[int] = []

    @app.task(shared=False, global_rate_limit="api:100/s")
    def job(i: int) -> int:
        ran.append(i)
        return i

    with in_process_worker(app):
        assert job.delay(1).get(timeout=30) == 1
        healed.blackhole()
        failed = job.delay(2)
        with pytest.raises(redis.TimeoutError):
            failed.get(timeout=30)
        assert failed.state == "FAILURE"
        healed.heal()
        assert job.delay(3).get(timeout=30) == 3
    assert ran == [1, 3]
    app.close()
