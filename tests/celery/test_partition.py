"""A running task cut off from the integration's Redis (the fault proxy's blackhole) gets the
``lease_lost`` signal and sees ``self.lease.lost`` by its lease's deadline."""

from __future__ import annotations

import threading
import time
from typing import Any

from celery_rediskit import Lease
from celery_rediskit.integration import lease_lost
from celery_rediskit.renewal import renewer
from tests.faults.proxy import FaultProxy
from tests.faults.servers import FaultServer

from .conftest import make_app

WAIT = 20
LEASE = 1.2
SLACK = 0.5  # seconds of scheduling delay allowed on a loaded machine


def test_a_task_cut_off_from_redis_is_told_its_lease_is_lost_by_the_deadline(
    redis_url: str, prefix: str, worker: Any
) -> None:
    with FaultServer(persistent=False) as server, FaultProxy(server.port) as proxy:
        # The broker stays reachable; only the integration's Redis is partitioned.
        app = make_app(redis_url, prefix, lease=LEASE, url=proxy.url)
        held: list[Lease] = []
        started, check = threading.Event(), threading.Event()
        signalled = threading.Event()
        seen: list[tuple[float, str | None, str]] = []

        @app.task(shared=False, bind=True, singleton=True)
        def job(self: Any) -> bool:
            held.append(self.lease)
            started.set()
            check.wait(WAIT)
            return bool(self.lease.lost)

        def on_lost(sender: Any = None, task_id: str | None = None, lease: Any = None,
                    reason: str = "", **_: Any) -> None:
            seen.append((time.monotonic(), task_id, reason))
            signalled.set()

        lease_lost.connect(on_lost, weak=False)
        try:
            with worker(app):
                result = job.delay()
                assert started.wait(WAIT)
                lease = held[0]
                renewer().renew_now([lease])  # a renewal that got through
                proxy.blackhole()
                deadline = lease.last_renewed + LEASE
                assert signalled.wait(LEASE + 5.0), "lease_lost was never sent"
                at, task_id, reason = seen[0]
                assert at <= deadline + SLACK, f"lease_lost came {at - deadline:.2f} s late"
                assert task_id == result.id and "ended" in reason, seen
                assert lease.lost
                proxy.heal()
                check.set()
                assert result.get(timeout=WAIT) is True
        finally:
            proxy.heal()
            check.set()
            lease_lost.disconnect(on_lost)
            app.close()
