"""The app run by real ``celery worker -P prefork`` subprocesses in the crash tests.

``build(url, prefix, lease)`` defines the app and its tasks; the worker imports this module
with ``RK_URL``/``RK_PREFIX``/``RK_LEASE`` in its environment, the test builds the same app
to send tasks and read results. Task bodies report to Redis (``Probe``), since they run in
other processes.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery

from celery_rediskit.integration import RedisKit

try:
    from .probe import Probe
except ImportError:  # imported by the worker as a top-level module
    from probe import Probe  # type: ignore[no-redef]


def build(url: str, prefix: str, lease: float, reports_limit: int = 5) -> Celery:
    """The app; ``reports_limit`` is the permits task ``report`` declares (``RK_REPORTS_LIMIT``
    for the worker), so that two builds are two deployments of one task with another limit."""
    app = Celery(f"prefork-{prefix}", broker=url, backend=url, set_as_current=False)
    app.conf.update(
        task_default_queue=f"q-{prefix}",
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=1,
        result_expires=600,
    )
    RedisKit(app, prefix=prefix, lease=lease, retry_delay=0.1)
    client = redis.Redis.from_url(url)

    def probe(name: str) -> Probe:
        return Probe(client, f"{prefix}:probe:{name}")

    def pause(run: str, seconds: float) -> None:
        """Work for ``seconds``, or until a test pushes to ``{prefix}:go:{run}`` (so a test
        that inspects running tasks can hold them as long as it needs, then let them end)."""
        if seconds < 1:
            time.sleep(seconds)
            return
        deadline = time.monotonic() + seconds
        # in waits of at most 1 s: the client's socket timeout (5 s in redis-py 8) would
        # cut a longer BLPOP
        while (left := deadline - time.monotonic()) > 0:
            if client.blpop([f"{prefix}:go:{run}"], timeout=min(1.0, left)):
                return

    @app.task(shared=False, name="single", singleton=True, singleton_key=("run",))
    def single(run: str, seconds: float = 0.0) -> int:
        p = probe(run)
        p.enter()
        client.set(f"{prefix}:pid:{run}", os.getpid())
        pause(run, seconds)
        p.exit()
        return os.getpid()

    @app.task(shared=False, name="single_queued", singleton=True, singleton_scope="queued",
              singleton_key=("run",))
    def single_queued(run: str, seconds: float = 0.0) -> int:
        p = probe(run)
        p.enter()
        time.sleep(seconds)
        p.exit()
        return os.getpid()

    @app.task(shared=False, name="limited", concurrency_limit="db-{run}:3")
    def limited(run: str, i: int, seconds: float = 0.0) -> int:
        p = probe(run)
        p.enter()
        client.set(f"{prefix}:pid:{run}", os.getpid())
        pause(run, seconds)
        p.exit()
        return i

    @app.task(shared=False, name="report", bind=True, on_limited="wait", limit_timeout=60,
              concurrency_limit=f"reports:{reports_limit}")
    def report(self: Any, run: str, i: int, hold: bool = False) -> bool:
        """Appends "<i>:<bodies running, this one included>" to ``<prefix>:started:<run>``;
        with ``hold``, runs until ``<prefix>:go:<run>:<i>`` is pushed."""
        p = probe("reports")
        client.rpush(f"{prefix}:started:{run}", f"{i}:{p.enter()}")
        if hold:
            client.blpop([f"{prefix}:go:{run}:{i}"], timeout=60)
        else:
            time.sleep(0.05)  # work, so that bodies would overlap if the limit let them
        p.exit()
        return not self.lease.lost

    @app.task(shared=False, name="plain")
    def plain(x: Any) -> Any:
        return x

    @app.task(shared=False, name="hard_limited", singleton=True, singleton_key=("run",),
              time_limit=1)
    def hard_limited(run: str) -> None:
        probe(run).enter()
        time.sleep(30)

    @app.task(shared=False, name="soft_limited", singleton=True, singleton_key=("run",),
              soft_time_limit=0.5)
    def soft_limited(run: str) -> None:
        probe(run).enter()
        time.sleep(30)

    return app


if os.environ.get("RK_URL"):
    app = build(os.environ["RK_URL"], os.environ["RK_PREFIX"], float(os.environ["RK_LEASE"]),
                int(os.environ.get("RK_REPORTS_LIMIT", "5")))
