"""Round trips of hits and misses, and the cache stepping aside during a Redis outage."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
import redis

from celery_rediskit.cache import CacheUnavailable, RedisCacheProvider, cached
from celery_rediskit.devserver import PrivateServer
from tests.roundtrips import counting_client


def test_round_trips(private_server: PrivateServer) -> None:
    client, sent = counting_client(private_server.url)
    provider = RedisCacheProvider(client, prefix="rt")

    @cached(ttl=60, provider=provider)
    def value(x: int) -> dict[str, int]:
        return {"x": x}

    value(0)  # loads the scripts
    sent.clear()
    value(1)  # a miss: GET, claim (entry re-check + lock), fill (store + release)
    assert sent == ["GET", "EVALSHA", "EVALSHA"]
    sent.clear()
    value(1)  # a hit: one GET
    assert sent == ["GET"]


def test_outage_bypasses_the_cache_quickly(
    private_server: PrivateServer, caplog: pytest.LogCaptureFixture
) -> None:
    client = redis.Redis.from_url(private_server.url)  # redis-py's default retry policy
    provider = RedisCacheProvider(client, prefix="out", cooldown=0.5)
    calls: list[int] = []

    @cached(ttl=60, provider=provider)
    def compute(x: int) -> dict[str, Any]:
        calls.append(x)
        return {"x": x}

    assert compute(1) == {"x": 1} and compute(1) == {"x": 1} and calls == [1]
    with caplog.at_level(logging.WARNING, logger="celery_rediskit.cache"):
        private_server.stop()
        assert compute(2) == {"x": 2}  # the call that finds the outage (slow: redis-py retries)
        for i in range(3, 8):  # while it lasts, calls skip Redis at once
            t0 = time.monotonic()
            assert compute(i) == {"x": i}
            assert time.monotonic() - t0 < 1.0
        with pytest.raises(CacheUnavailable):
            provider.get("anything")
    warnings = [r for r in caplog.records if "Redis unavailable" in r.getMessage()]
    assert len(warnings) == 1  # once per outage, not per call
    assert calls == [1, 2, 3, 4, 5, 6, 7]
    private_server.start()
    assert provider.breaker.wait_closed(timeout=15)
    compute(2)
    compute(2)
    assert calls.count(2) == 2  # the second compute(2) after the outage was a hit
