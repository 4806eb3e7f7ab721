"""The app of the prefork cache test: a worker whose main process meets a cache outage.

The worker imports this module with ``RK_URL`` (broker and results), ``RK_CACHE_URL`` (the
cache's Redis, down when the worker starts) and ``RK_PREFIX`` in its environment. Its
``worker_init`` handler, run in the main process before the pool forks its children, calls a
``@cached`` function: the cache's breaker opens there, and every child inherits it open.
"""

from __future__ import annotations

import os
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_init
from redis.backoff import NoBackoff
from redis.retry import Retry

from celery_rediskit.cache import CacheUnavailable, RedisCacheProvider, cached


def build(url: str, cache_url: str, prefix: str, *, in_worker: bool = False) -> Celery:
    app = Celery(f"cache-{prefix}", broker=url, backend=url, set_as_current=False)
    app.conf.update(
        task_default_queue=f"q-{prefix}",
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=1,
        result_expires=600,
    )
    # No retries: the call that meets the outage fails at once.
    cache_client = redis.Redis.from_url(cache_url, retry=Retry(NoBackoff(), 0),
                                        socket_timeout=2, socket_connect_timeout=2)
    provider = RedisCacheProvider(cache_client, prefix=prefix, cooldown=0.2)
    broker = redis.Redis.from_url(url)

    @cached(ttl=600, provider=provider, name="prefork-value")
    def value(run: str) -> dict[str, Any]:
        return {"run": run}

    def warm_up(sender: Any = None, **kwargs: Any) -> None:
        value("warm-up")  # the cache's Redis is down: the breaker opens in the main process
        broker.set(f"{prefix}:main-breaker-open", int(provider.breaker.is_open), ex=600)

    if in_worker:  # not in the test process: its in-process workers must not run it
        worker_init.connect(warm_up, weak=False)

    @app.task(shared=False, name="cache_state")
    def cache_state(run: str, timeout: float) -> dict[str, Any]:
        """What this pool process sees of the cache once its Redis is back."""
        state: dict[str, Any] = {"pid": os.getpid()}
        state["closed"] = provider.breaker.wait_closed(timeout)
        state["value"] = value(run)
        try:
            state["stored"] = provider.get(value.key_for(run))
        except CacheUnavailable as exc:
            state["stored"] = repr(exc)
        return state

    return app


if os.environ.get("RK_CACHE_URL"):
    app = build(os.environ["RK_URL"], os.environ["RK_CACHE_URL"], os.environ["RK_PREFIX"],
                in_worker=True)
