"""The app the ``park`` bench section runs in ``celery worker -P prefork`` subprocesses.

Configured from ``RKB_URL`` (rediskit and results), ``RKB_BROKER`` and ``RKB_PREFIX`` when
imported by a worker; the bench builds the same app with :func:`build` to send tasks. Every
task sleeps ``seconds`` under a limit of 1 or 4 permits, parking or re-queueing when it is
full, counts itself done in ``<prefix>:done`` and records when it ran (``<prefix>:spans``,
``"<start> <end>"``, Unix seconds) for the hand-off gaps.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery

from celery_rediskit.integration import RedisKit


def build(url: str, broker: str, prefix: str) -> Celery:
    app = Celery(f"bench-park-{prefix}", broker=broker, backend=url, set_as_current=False)
    app.conf.update(
        task_default_queue=f"q-{prefix}",
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=1,
        result_expires=600,
    )
    if os.environ.get("RKB_DISABLE_PREFETCH") == "1":
        # a worker takes a message only when a process of it is free (Celery 5.6+, Redis):
        # else a worker whose processes are all busy holds a re-sent message until one frees
        app.conf.worker_disable_prefetch = True
    RedisKit(app, url=url, prefix=prefix)
    client = redis.Redis.from_url(url)
    done = f"{prefix}:done"
    spans = f"{prefix}:spans"

    def body(seconds: float) -> None:
        start = time.time()
        time.sleep(seconds)
        with client.pipeline(transaction=False) as pipe:  # one round trip, as before
            pipe.rpush(spans, f"{start:.6f} {time.time():.6f}")
            pipe.incr(done)
            pipe.execute()

    for mode in ("park", "retry"):
        for permits in (1, 4):
            name = f"{mode}{permits}"

            def run(seconds: float, _name: str = name) -> None:
                body(seconds)

            run.__name__ = name
            app.task(shared=False, name=name, concurrency_limit=f"bench-{name}:{permits}",
                     on_limited=mode)(run)
    return app


if os.environ.get("RKB_URL"):
    app: Any = build(os.environ["RKB_URL"], os.environ["RKB_BROKER"], os.environ["RKB_PREFIX"])
