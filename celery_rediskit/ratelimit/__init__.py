"""The distributed rate limiter: ``create_rate_limiter`` / ``RateLimiter``.

A budget of ``rate`` checks per period shared by every process using the same storage and key,
smooth (GCRA: one slot every ``period / limit``, up to ``burst`` at once after an idle period;
see ``base.py``). ``try_acquire`` answers at once with the exact time to the next slot;
``acquire`` reserves the next slot and sleeps until it starts, so waiters are served in the
order they asked, each with one round trip and no polling.
"""

from __future__ import annotations

import math
import threading
from typing import Any

from .._validate import positive_int, resource_key
from ..errors import AcquireAborted, ConfigurationError, RateLimited
from .base import (
    RATE_FORM,
    Rate,
    RateDecision,
    RateInfo,
    RateLimitStorage,
    RateSpec,
    parse_burst,
    parse_rate,
)
from .memory import MemoryRateLimitStorage

__all__ = [
    "RATE_FORM",
    "MemoryRateLimitStorage",
    "Rate",
    "RateDecision",
    "RateInfo",
    "RateLimitStorage",
    "RateLimiter",
    "RateSpec",
    "create_rate_limiter",
    "parse_rate",
]


def _wait_limit(timeout: Any) -> float | None:
    if timeout is None:
        return None
    if type(timeout) is float and timeout == 0.0:
        return 0.0  # the hot path (try_acquire)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
            or not math.isfinite(timeout) or timeout < 0:
        raise ConfigurationError(
            f"timeout must be a number of seconds >= 0 (0: only a free slot) or None (no "
            f"limit), got {timeout!r}"
        )
    return float(timeout)


class RateLimiter:
    """``rate`` checks per period for each key, over ``storage``.

    ``rate``: ``"10/s"``, ``"100/m"``, ``"1000/h"`` or a number per second (Celery's
    syntax). ``burst``: how many checks may pass at once after an idle period (default 1:
    evenly spaced, like Celery's own ``rate_limit``); over any window of ``w`` seconds at most
    ``burst + w * limit / period`` checks pass. ``storage`` defaults to a new
    :class:`MemoryRateLimitStorage` (this process only).
    """

    def __init__(self, rate: RateSpec = "100/m", burst: int | None = None,
                 storage: RateLimitStorage | None = None) -> None:
        self.rate: Rate = parse_rate(rate, "rate")
        self.burst: int = parse_burst(burst, "burst")
        self.storage: RateLimitStorage = (
            MemoryRateLimitStorage() if storage is None else storage
        )

    def __repr__(self) -> str:
        return f"RateLimiter(rate={self.rate.text!r}, burst={self.burst})"

    def _cost(self, cost: Any) -> int:
        if cost == 1 and cost is not True:
            return 1  # the hot path
        cost = positive_int("cost", cost)
        if cost > self.burst:
            raise ConfigurationError(
                f"cost must be at most the burst ({self.burst}): a check of {cost} slots "
                f"could never pass, got {cost!r}"
            )
        return int(cost)

    def check(self, key: str, cost: int = 1, *, max_wait: float | None = 0.0) -> RateDecision:
        """One check of ``key`` (see :meth:`RateLimitStorage.check`): takes ``cost`` slots if
        free now, or with ``max_wait`` (seconds; None: however far) reserves slots that come
        free within that time. The decision carries the storage's clock (``now``)."""
        return self.storage.check(resource_key(key), self.rate, self.burst, self._cost(cost),
                                  _wait_limit(max_wait))

    def try_acquire(self, key: str, cost: int = 1) -> tuple[bool, float]:
        """Take ``cost`` slots of ``key`` if they are free now. Returns ``(allowed,
        retry_after)``: ``(True, 0.0)``, or ``(False, seconds until a check of this cost
        would pass)``; a refused check takes nothing."""
        decision = self.check(key, cost)
        return decision.allowed, decision.retry_after

    def acquire(self, key: str, timeout: float | None = None,
                abort: threading.Event | None = None, cost: int = 1) -> float:
        """Block until ``cost`` slots of ``key`` are ours; return the seconds waited.

        The next free slots are reserved in one round trip, then the call sleeps exactly until
        they start (a wait on ``abort``, or on an event of its own: no polling). Waiters are
        thus served in the order they asked. ``timeout`` (seconds; None: no limit; 0: only
        free slots) bounds the wait: when the next slots start later than that, ``RateLimited``
        (a ``LockTimeout``, with ``retry_after``) is raised at once, with nothing taken.
        Setting ``abort`` while waiting raises ``AcquireAborted`` at once and gives the slots
        back if no later ones were taken since (else they stay unused).
        """
        key = resource_key(key)
        cost = self._cost(cost)
        limit = _wait_limit(timeout)
        if abort is not None and abort.is_set():
            raise AcquireAborted(f"waiting for rate limit {key!r} was aborted", key)
        decision = self.storage.check(key, self.rate, self.burst, cost, limit)
        if not decision.allowed:
            raise RateLimited(
                f"rate limit {key!r} ({self.rate.text}): the next slot is "
                f"{decision.retry_after:.3f} s away, beyond the timeout of {timeout} s",
                key, decision.retry_after,
            )
        if decision.retry_after > 0:
            event = abort if abort is not None else threading.Event()
            if event.wait(decision.retry_after):
                self.storage.cancel(key, decision, self.rate, cost)
                raise AcquireAborted(f"waiting for rate limit {key!r} was aborted", key)
        return decision.retry_after

    def get_rate_info(self, key: str) -> RateInfo:
        """``key``'s budget now, under this limiter's rate and burst."""
        return self.storage.get_rate_info(resource_key(key), self.rate, self.burst)

    def reset(self, key: str) -> bool:
        """Forget ``key``'s state (its whole burst is free at once); True if it had any."""
        return self.storage.reset(resource_key(key))


def create_rate_limiter(rate: RateSpec = "100/m", burst: int | None = None,
                        storage: RateLimitStorage | None = None) -> RateLimiter:
    """Create a :class:`RateLimiter` of ``rate`` (``"10/s"``, ``"100/m"``, ``"1000/h"``, or
    a number per second) with ``burst`` checks at once after an idle period (default 1);
    ``storage`` defaults to a new :class:`MemoryRateLimitStorage`. A bad ``rate`` or
    ``burst`` raises ``ConfigurationError`` (a ``ValueError``) naming it."""
    return RateLimiter(rate, burst, storage)
