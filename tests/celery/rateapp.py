"""The app run by real ``celery worker -P prefork`` subprocesses in the global rate limit test.

``build(broker, url, prefix)`` defines the app: its broker on ``broker`` (a private server,
whose publishes the test counts), results and the kit on ``url``. The worker imports this
module with ``RK_BROKER``/``RK_URL``/``RK_PREFIX`` in its environment. Task ``rated`` records
its start on the Redis server's clock (the clock the limiter runs on) in ``<prefix>:starts``,
with the time of the slot it was re-queued for (0 for a run that started at its first check).
"""

from __future__ import annotations

import os
from typing import Any

import redis
from celery import Celery

from celery_rediskit.integration import RedisKit

RATE = "20/s"


def build(broker: str, url: str, prefix: str) -> Celery:
    app = Celery(f"rate-{prefix}", broker=broker, backend=url, set_as_current=False)
    app.conf.update(
        task_default_queue=f"q-{prefix}",
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=1,
        result_expires=600,
    )
    RedisKit(app, url=url, prefix=prefix)
    client = redis.Redis.from_url(url)
    starts = f"{prefix}:starts"

    @app.task(shared=False, name="rated", bind=True, global_rate_limit=f"x:{RATE}")
    def rated(self: Any, i: int) -> int:
        seconds, micros = client.time()
        paid = (self.request.headers or {}).get("rediskit_rate_paid") or {}
        client.rpush(starts, f"{seconds * 1_000_000 + micros} {paid.get('at', 0)}")
        return i

    return app


if os.environ.get("RK_BROKER"):
    app = build(os.environ["RK_BROKER"], os.environ["RK_URL"], os.environ["RK_PREFIX"])
