"""The outage circuit breaker: while Redis is unreachable, the cache steps aside at once.

redis-py 8's default retry policy makes each command against a dead server take seconds. The
cache is an optimisation, so after one failure the breaker *opens*: callers skip Redis
immediately (their function just runs) while one background thread probes the server every
``cooldown`` seconds. The first successful probe closes the breaker. One warning is logged per
outage, and one info line when it ends.

Per process: threads do not survive ``fork``, so a child forked while the breaker was open
(a Celery prefork child of a parent that met the outage) starts a probe of its own the first
time it looks at the breaker, and closes it when *it* reaches Redis again. The breaker's lock
and events are made anew in the child, in case another thread held them at the fork.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable

import redis.exceptions as rex

from .._validate import positive_seconds

__all__ = ["CircuitBreaker", "OUTAGE_ERRORS"]

log = logging.getLogger("celery_rediskit.cache")

OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    rex.ConnectionError,  # includes BusyLoadingError
    rex.TimeoutError,
    rex.ReadOnlyError,  # a failover left us on a replica
    OSError,
)
"""Exceptions that mean "Redis is unavailable" rather than "this request was wrong"."""


class CircuitBreaker:
    """Tracks whether Redis is reachable. ``allow()`` is False while an outage is known.

    ``probe`` (called from a daemon thread, every ``cooldown`` seconds while open) returns
    normally when the server answers again. ``cooldown`` is in seconds.
    """

    def __init__(self, probe: Callable[[], object], cooldown: float = 2.0, name: str = "") -> None:
        self.cooldown = positive_seconds("cooldown", cooldown)
        self.name = name
        self._probe = probe
        self._open = False
        self._probing = False  # a probe thread of this process runs (only while open)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._closed.set()
        self.outages = 0  # number of outages seen (observable in tests)
        self.opened_at: float | None = None
        _breakers.add(self)

    @property
    def is_open(self) -> bool:
        if self._open:
            if not self._probing:  # forked while open: this process must probe on its own
                self._start_probe()
            return True
        return False

    def allow(self) -> bool:
        """True when callers should use Redis (no known outage)."""
        return not self.is_open

    def failure(self, exc: BaseException) -> None:
        """Record that a call failed with an outage error: open, warn once, start probing."""
        with self._lock:
            if self._open:
                return
            self._open = True
            self._closed.clear()
            self.outages += 1
            self.opened_at = time.monotonic()
        log.warning(
            "rediskit cache%s: Redis unavailable (%s: %s); bypassing the cache and retrying "
            "every %.1f s",
            f" {self.name}" if self.name else "", type(exc).__name__, exc, self.cooldown,
        )
        self._start_probe()

    def _start_probe(self) -> None:
        with self._lock:
            if not self._open or self._probing:
                return
            self._probing = True
        threading.Thread(target=self._probe_until_up, name="rediskit-cache-probe",
                         daemon=True).start()

    def _probe_until_up(self) -> None:
        while True:
            self._wake.wait(self.cooldown)
            self._wake.clear()
            try:
                self._probe()
            except Exception:
                continue
            with self._lock:
                self._open = False
                self._probing = False
                self._closed.set()
            took = time.monotonic() - (self.opened_at or time.monotonic())
            log.info("rediskit cache%s: Redis reachable again after %.1f s",
                     f" {self.name}" if self.name else "", took)
            return

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Block until no outage is known (or ``timeout`` seconds pass); True if closed."""
        if not self.is_open:  # also starts this process's probe after a fork
            return True
        return self._closed.wait(timeout)

    def probe_now(self) -> None:
        """Have the probing thread try at once (no effect when closed)."""
        if self.is_open:
            self._wake.set()

    def _after_fork_in_child(self) -> None:
        # The parent's probe thread is not here, and another thread may have held the lock
        # or an event's lock at the fork: start afresh. Still open: the next look probes.
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._probing = False
        if not self._open:
            self._closed.set()


_breakers: weakref.WeakSet[CircuitBreaker] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for breaker in list(_breakers):
        breaker._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
