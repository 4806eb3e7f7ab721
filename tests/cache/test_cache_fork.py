"""The cache's circuit breaker works per process: a child forked during an outage re-probes
Redis on its own and uses the cache again once Redis is back (issue 10, item 11).

The breaker's probe thread does not survive ``fork``: a child that inherits an open breaker
must start its own, or it skips the cache for good (what Celery prefork children did).
"""

from __future__ import annotations

import multiprocessing
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from celery_rediskit.cache import CacheUnavailable, RedisCacheProvider, cached
from celery_rediskit.devserver import PrivateServer

FORK = multiprocessing.get_context("fork")
BOUND = 20.0  # seconds: how long the child may take to see Redis back (cooldown is 0.2 s)


@pytest.mark.parametrize("lock_held", [False, True],
                         ids=["plain", "forked-while-the-breaker-lock-is-held"])
def test_child_forked_while_open_closes_its_own_breaker(
    private_server: PrivateServer, lock_held: bool
) -> None:
    # No retries: the call that finds the outage fails at once.
    client = redis.Redis.from_url(private_server.url, retry=Retry(NoBackoff(), 0),
                                  socket_timeout=2, socket_connect_timeout=2)
    provider = RedisCacheProvider(client, prefix="fork", cooldown=0.2)

    @cached(ttl=60, provider=provider, name="fork-value")
    def value(x: int) -> dict[str, int]:
        return {"x": x}

    private_server.stop()
    assert value(1) == {"x": 1}  # computed without the cache: the breaker opens
    assert provider.breaker.is_open

    ready, results = FORK.Event(), FORK.Queue()

    def child() -> None:
        report: dict[str, Any] = {"open_at_start": provider.breaker.is_open}
        ready.set()  # the server comes back only now: closing needs this process's own probe
        report["closed"] = provider.breaker.wait_closed(timeout=BOUND)
        report["value"] = value(7)
        try:
            report["stored"] = provider.get(value.key_for(7))
        except CacheUnavailable as exc:
            report["stored"] = repr(exc)
        results.put(report)

    if lock_held:  # as if another thread were inside the breaker when the process forked
        with provider.breaker._lock:
            proc = FORK.Process(target=child)
            proc.start()
    else:
        proc = FORK.Process(target=child)
        proc.start()
    try:
        assert ready.wait(BOUND), "the child did not start"
        private_server.start()
        report = results.get(timeout=BOUND + 15)
    finally:
        proc.join(15)
        if proc.is_alive():
            proc.kill()
    assert report == {"open_at_start": True, "closed": True, "value": {"x": 7},
                      "stored": {"x": 7}}
    assert proc.exitcode == 0
