"""The outage circuit breaker: while Redis is unreachable, the cache steps aside at once.

redis-py 8's default retry policy makes each command against a dead server take seconds. The
cache is an optimisation, so after one failure the breaker *opens*: callers skip Redis
immediately (their function just runs) while one background thread probes the server every
``cooldown`` seconds. The first successful probe closes the breaker. One warning is logged per
outage, and one info line when it ends.
"""

from __future__ import annotations

import logging
import threading
import time
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
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._closed.set()
        self.outages = 0  # number of outages seen (observable in tests)
        self.opened_at: float | None = None

    @property
    def is_open(self) -> bool:
        return self._open

    def allow(self) -> bool:
        """True when callers should use Redis (no known outage)."""
        return not self._open

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
                self._closed.set()
            took = time.monotonic() - (self.opened_at or time.monotonic())
            log.info("rediskit cache%s: Redis reachable again after %.1f s",
                     f" {self.name}" if self.name else "", took)
            return

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Block until no outage is known (or ``timeout`` seconds pass); True if closed."""
        return self._closed.wait(timeout)

    def probe_now(self) -> None:
        """Have the probing thread try at once (no effect when closed)."""
        self._wake.set()
