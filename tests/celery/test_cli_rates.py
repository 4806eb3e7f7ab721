"""``celery -A app rediskit rates``: the rate limiters from a shell (real ``celery`` processes,
no worker needed), and the limiters in ``lock_report``."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
import redis

from celery_rediskit import RedisRateLimitStorage, create_rate_limiter
from celery_rediskit.devserver import free_port
from celery_rediskit.integration.control import lock_report

from .test_cli import LEASE, Env, fails
from .workerapp import build


@pytest.fixture
def env(redis_url: str, client: redis.Redis) -> Iterator[Env]:
    prefix = f"rkr-{uuid.uuid4().hex[:8]}"
    app = build(redis_url, prefix, LEASE)
    storage = RedisRateLimitStorage(client, prefix=prefix)
    api = create_rate_limiter("10/m", burst=5, storage=storage)
    for _ in range(3):
        api.try_acquire("api")
    create_rate_limiter("2/m", storage=storage).try_acquire("tenant:7")
    yield Env(redis_url, prefix, app, client, "none")
    app.close()


def test_rates_lists_each_limiter_with_its_budget_and_next_slot(env: Env) -> None:
    out = env.ok("rates")
    lines = out.splitlines()
    assert lines[0].split() == ["KEY", "RATE", "BURST", "BUDGET", "LEFT", "NEXT", "FREE",
                                "SLOT", "FULL", "AGAIN", "IN"]
    api = next(line.split() for line in lines if line.startswith("api "))
    assert api[:4] == ["api", "10/m", "5", "2/5"] and api[4] == "now"
    tenant = next(line.split() for line in lines if line.startswith("tenant:7"))
    assert tenant[:4] == ["tenant:7", "2/m", "1", "0/1"] and tenant[4] == "in"
    data = env.json("rates")
    assert [d["key"] for d in data] == ["api", "tenant:7"]
    assert data[0]["remaining"] == 2 and 0 < data[0]["full_in"] <= 18
    assert 0 < data[1]["next_free"] <= 30
    assert [d["key"] for d in env.json("rates", "--pattern", "tenant:*")] == ["tenant:7"]


def test_rates_key_shows_one_and_reset_frees_its_burst(env: Env) -> None:
    assert env.json("rates", "api")["remaining"] == 2
    redis_key = f"{env.prefix}:rate:{{api}}"
    assert env.json("rates", redis_key)["key"] == "api"  # the Redis key works too
    assert "reset rate limiter 'api' (10/m): its burst of 5 is free" in env.ok("rates", "api",
                                                                              "--reset")
    fails(env.rediskit("rates", "api"), 1, "no active rate limiter named 'api'")
    assert "had no state" in env.ok("rates", "api", "--reset")
    fails(env.rediskit("rates", "--reset"), 2, "--reset needs the KEY")
    empty = env.ok("rates", "--pattern", "nothing*")
    assert empty.strip() == f"no active rate limiter under prefix {env.prefix!r} matching " \
                            f"'nothing*'"


def test_rates_unreachable_redis_is_one_line(env: Env) -> None:
    result = env.rediskit("rates", RK_URL=f"redis://127.0.0.1:{free_port()}/0")
    fails(result, 1, "cannot reach Redis")


def test_lock_report_includes_the_limiters(env: Env) -> None:
    report = lock_report(env.app, ping=False)
    assert [(r.key, r.rate, r.remaining) for r in report.rate_limiters] == [
        ("api", "10/m", 2), ("tenant:7", "2/m", 0)]
    data = report.to_dict()
    assert data["rate_limiters"][0]["key"] == "api"
    json.dumps(data)
    assert lock_report(env.app, "tenant:*", ping=False, rates=True).rate_limiters[0].key \
        == "tenant:7"
    assert lock_report(env.app, ping=False, rates=False).rate_limiters == []
