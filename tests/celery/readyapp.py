"""An app installed with a ready client (``RedisKit(app, client=...)``), for a real
``celery worker -P prefork``: its children run tasks on the client made before they were
forked. ``RK_URL`` and ``RK_PREFIX`` configure it."""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery

from celery_rediskit.integration import RedisKit

LEASE = 1.0


def build(url: str, prefix: str) -> Celery:
    app = Celery(f"ready-{prefix}", broker=url, backend=url, set_as_current=False)
    app.conf.update(task_default_queue=f"q-{prefix}", broker_connection_retry_on_startup=True,
                    worker_prefetch_multiplier=1, result_expires=600)
    RedisKit(app, client=redis.Redis.from_url(url), prefix=prefix, lease=LEASE)

    @app.task(shared=False, name="held", bind=True, singleton=True)
    def held(self: Any, run: str, seconds: float) -> tuple[int, bool, int]:
        time.sleep(seconds)  # longer than the lease: renewal must work in this child
        assert self.lease is not None
        return os.getpid(), bool(self.lease.lost), int(self.lease.fencing_token)

    return app


if os.environ.get("RK_URL"):
    app = build(os.environ["RK_URL"], os.environ["RK_PREFIX"])
