"""The app of the terminate / time-limit tests (``test_terminate.py``): singleton tasks whose
bodies survive or trap the signals a worker sends them (see also ``workerapp.py``).

A real ``celery worker -P prefork`` imports this module with ``RK_URL``/``RK_PREFIX``/
``RK_LEASE`` in its environment; bodies report to Redis (``Probe`` and plain keys).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import redis
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded

from celery_rediskit._redis.keys import KeySpace
from celery_rediskit.integration import RedisKit

try:
    from .probe import Probe
except ImportError:  # imported by the worker as a top-level module
    from probe import Probe  # type: ignore[no-redef]


_NOTE_LOCK = """
redis.call('SET', KEYS[2], redis.call('EXISTS', KEYS[1]) == 1 and 'held' or 'free')
"""


class Stop(Exception):
    """Raised by the body's own SIGTERM handler."""


def build_term(url: str, prefix: str, lease: float) -> Celery:
    app = Celery(f"term-{prefix}", broker=url, backend=url, set_as_current=False)
    app.conf.update(
        task_default_queue=f"q-{prefix}",
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=1,
        result_expires=600,
    )
    RedisKit(app, prefix=prefix, lease=lease, retry_delay=0.1, retry_delay_max=0.5)
    client = redis.Redis.from_url(url)

    def probe(name: str) -> Probe:
        return Probe(client, f"{prefix}:probe:{name}")

    @app.task(shared=False, name="trapping", singleton=True, singleton_key=("run",))
    def trapping(run: str, how: str, cleanup: float = 2.0) -> int:
        """``how``: ``"term"`` (a SIGTERM handler of its own stops the work), ``"usr1"``
        (billiard's SIGUSR1 handler raises ``SoftTimeLimitExceeded``), or ``"none"`` (a
        duplicate: returns at once). After the signal the body cleans up for ``cleanup``
        seconds and returns: its process survives the signal."""
        p = probe(run)
        p.enter()
        try:
            if how == "none":
                return os.getpid()
            previous: Any = None
            if how == "term":
                def on_term(signum: int, frame: Any) -> None:
                    raise Stop()
                previous = signal.signal(signal.SIGTERM, on_term)
            try:
                client.set(f"{prefix}:ready:{run}", os.getpid())
                threading.Event().wait(60)  # the work, until the signal arrives
            except (Stop, SoftTimeLimitExceeded):
                client.set(f"{prefix}:signalled:{run}", time.time())
                time.sleep(cleanup)  # cleaning up after the signal, still holding the lock
            finally:
                if previous is not None:
                    signal.signal(signal.SIGTERM, previous)
            return os.getpid()
        finally:
            p.exit()

    @app.task(shared=False, bind=True, name="hard_trapping", singleton=True,
              singleton_key=("run",), time_limit=1)
    def hard_trapping(self: Any, run: str) -> None:
        """Exceeds its hard time limit; ignores billiard's SIGTERM (noting whether its lock
        is still held at that moment), so billiard SIGKILLs it 0.1 s later."""
        lock = KeySpace(prefix).lock(self.lease.key).lock
        note = f"{prefix}:at_term:{run}"

        def on_term(signum: int, frame: Any) -> None:
            # one round trip: billiard's SIGKILL follows 0.1 s after its SIGTERM
            client.eval(_NOTE_LOCK, 2, lock, note)

        signal.signal(signal.SIGTERM, on_term)
        probe(run).enter()
        client.set(f"{prefix}:pid:{run}", os.getpid())
        time.sleep(30)

    @app.task(shared=False, name="sleeper", singleton=True, singleton_key=("run",))
    def sleeper(run: str) -> None:
        probe(run).enter()
        client.set(f"{prefix}:pid:{run}", os.getpid())
        time.sleep(30)

    return app


if os.environ.get("RK_URL"):
    app = build_term(os.environ["RK_URL"], os.environ["RK_PREFIX"], float(os.environ["RK_LEASE"]))
