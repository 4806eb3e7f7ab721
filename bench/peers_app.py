"""The app the ``peers`` bench section runs in a ``celery worker -P prefork -c 2`` subprocess.

One app, one worker, every kind of task the section compares (each task returns its
argument; every call gets a distinct argument, so no lock or cache entry is ever shared):

- ``plain``: no option, on the RedisKit app (the baseline every ratio is taken against);
- ``celery``: ``base=celery.Task`` (the integration out of the way entirely);
- ``single``, ``single_q``: ``singleton=True``, running and queued scope;
- ``limited``: ``concurrency_limit="bench-db:64"`` (a permit per call, never full);
- ``cached``: ``cache_ttl="10m"`` (a miss per call: looked up, run, stored);
- ``once``: celery-once's ``QueueOnce`` (lock taken at send, deleted by the worker);
- ``csingleton``: celery-singleton's ``Singleton`` (the same pattern).

Configured from ``RKB_URL`` / ``RKB_PREFIX`` when imported by the worker; the bench builds the
same app with :func:`build` to send tasks.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery import Task as CeleryTask

from celery_rediskit.integration import RedisKit

KINDS = ("plain", "celery", "single", "single_q", "limited", "cached", "once", "csingleton")
PEERS = ("once", "csingleton")


def build(url: str, prefix: str) -> Celery:
    app = Celery(f"peers-{prefix}", broker=url, backend=url, set_as_current=False)
    app.conf.update(
        task_default_queue=f"pq-{prefix}",
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=4,
        result_expires=600,
        # celery-once: its Redis backend, keys "qo_once_x-<argument>" (arguments carry the
        # run's prefix), expiring in 10 minutes if never deleted
        ONCE={"backend": "celery_once.backends.Redis",
              "settings": {"url": url, "default_timeout": 600}},
        # celery-singleton: keys "<prefix>:csl:<hash>", expiring in 10 minutes
        singleton_backend_url=url,
        singleton_key_prefix=f"{prefix}:csl:",
        singleton_lock_expiry=600,
    )
    RedisKit(app, prefix=prefix)

    @app.task(shared=False, name="plain")
    def plain(x: Any) -> Any:
        return x

    @app.task(shared=False, name="celery", base=CeleryTask)
    def celery_task(x: Any) -> Any:
        return x

    @app.task(shared=False, name="single", singleton=True)
    def single(x: Any) -> Any:
        return x

    @app.task(shared=False, name="single_q", singleton=True, singleton_scope="queued")
    def single_q(x: Any) -> Any:
        return x

    @app.task(shared=False, name="limited", concurrency_limit="bench-db:64")
    def limited(x: Any) -> Any:
        return x

    @app.task(shared=False, name="cached", cache_ttl="10m")
    def cached(x: Any) -> Any:
        return x

    try:
        from celery_once import QueueOnce

        @app.task(shared=False, name="once", base=QueueOnce)
        def once(x: Any) -> Any:
            return x
    except ImportError:  # the bench extra is not installed: the section says so
        pass
    try:
        from celery_singleton import Singleton

        @app.task(shared=False, name="csingleton", base=Singleton)
        def csingleton(x: Any) -> Any:
            return x
    except ImportError:
        pass
    return app


if os.environ.get("RKB_URL"):
    app = build(os.environ["RKB_URL"], os.environ["RKB_PREFIX"])
