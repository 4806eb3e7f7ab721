"""The app run by real ``celery worker -P prefork`` subprocesses in the parking crash tests.

The worker imports this module with ``RK_URL`` / ``RK_PREFIX`` (and ``RK_BROKER`` for a
broker of its own) in its environment; the test builds the same app to send tasks. Each body
records its run in Redis (``RPUSH <prefix>:runs:<run> <task id>``), so a test can check that
every task ran exactly once whichever process ran it.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery

from celery_rediskit.integration import RedisKit

LEASE = 10.0
VISIBILITY = 2  # seconds: an unacknowledged message (acks_late) comes back this soon


def build(url: str, prefix: str, broker: str | None = None) -> Celery:
    app = Celery(f"park-{prefix}", broker=broker or url, backend=url, set_as_current=False)
    app.conf.update(
        task_default_queue=f"q-{prefix}",
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=1,
        result_expires=600,
        broker_transport_options={"visibility_timeout": VISIBILITY,
                                  "unacked_restore_interval": 1, "unacked_restore_throttle": 1},
    )
    # a test makes every release send the next task ahead (RK_AHEAD_HOLD, RK_AHEAD_WAIT)
    RedisKit(app, url=url, prefix=prefix, lease=LEASE,
             park_ahead_hold=os.environ.get("RK_AHEAD_HOLD"),
             park_ahead_wait=os.environ.get("RK_AHEAD_WAIT"))
    client = redis.Redis.from_url(url)

    def body(task: Any, run: str, hold: bool) -> str:
        client.rpush(f"{prefix}:runs:{run}", task.request.id)
        deadline = time.monotonic() + 120
        while hold and time.monotonic() < deadline:  # short waits: the socket timeout
            try:
                if client.blpop([f"{prefix}:go:{run}"], timeout=1):
                    break
            except redis.ConnectionError:  # Redis restarts (a test does that): wait on
                time.sleep(0.1)
        return str(task.request.id)

    # Two tasks on one limit: the holder is acknowledged early (a short visibility timeout
    # would re-deliver a long acks_late body while it runs: Celery's own pitfall), the
    # waiters late (so a crash before the acknowledgement re-delivers them).
    @app.task(shared=False, name="holder", bind=True, concurrency_limit="pk-{run}:1",
              on_limited="park")
    def holder(self: Any, run: str, hold: bool = False) -> str:
        return body(self, run, hold)

    @app.task(shared=False, name="waiter", bind=True, concurrency_limit="pk-{run}:1",
              on_limited="park", acks_late=True)
    def waiter(self: Any, run: str, hold: bool = False) -> str:
        return body(self, run, hold)

    @app.task(shared=False, name="early", bind=True, concurrency_limit="pk-{run}:1",
              on_limited="park")
    def early(self: Any, run: str, hold: bool = False) -> str:
        return body(self, run, hold)

    # Two limits, the first ("pa-", sorting first) free: the worker's main process does not
    # park it on receipt (it parks only at a first full limit), so its run meets "pk-" full
    # and parks there, in the pool process.
    @app.task(shared=False, name="waiter2", bind=True,
              concurrency_limit=["pa-{run}:1", "pk-{run}:1"], on_limited="park",
              acks_late=True)
    def waiter2(self: Any, run: str, hold: bool = False) -> str:
        return body(self, run, hold)

    return app


if os.environ.get("RK_URL"):
    app = build(os.environ["RK_URL"], os.environ["RK_PREFIX"], os.environ.get("RK_BROKER"))
