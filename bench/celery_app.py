"""The app the Celery bench section runs in a ``celery worker -P prefork`` subprocess.

Configured from ``RKB_URL`` / ``RKB_PREFIX`` when imported by the worker; the bench builds the
same app with :func:`build` to send tasks.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from celery_rediskit.integration import RedisKit


def build(url: str, prefix: str) -> Celery:
    app = Celery(f"bench-{prefix}", broker=url, backend=url, set_as_current=False)
    app.conf.update(
        task_default_queue=f"q-{prefix}",
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=4,
        result_expires=600,
    )
    RedisKit(app, prefix=prefix)

    @app.task(shared=False, name="plain")
    def plain(x: Any) -> Any:
        return x

    @app.task(shared=False, name="single", singleton=True)
    def single(x: Any) -> Any:
        return x

    @app.task(shared=False, name="limited", concurrency_limit="bench-db:64")
    def limited(x: Any) -> Any:
        return x

    @app.task(shared=False, name="cached", cache_ttl="10m")
    def cached(x: Any) -> Any:
        return x

    return app


if os.environ.get("RKB_URL"):
    app = build(os.environ["RKB_URL"], os.environ["RKB_PREFIX"])
