"""``MemoryRateLimitStorage``: rate limiters for one process, with the Redis storage's semantics.

The same GCRA step (:func:`~.base.gcra`) on ``time.monotonic()``; a limiter's state is dropped
once its bucket is full again (as the Redis key expires), on the next access to it or by the
sweep that runs when many limiters were used (templated names must not pile up).
"""

from __future__ import annotations

import threading
import time

from .._validate import resource_key
from .base import Rate, RateDecision, RateInfo, RateLimitStorage, gcra, rate_info

__all__ = ["MemoryRateLimitStorage"]

_SWEEP_AT = 1024  # states kept before the expired ones are swept


def _now_us() -> int:
    return time.monotonic_ns() // 1000


class MemoryRateLimitStorage(RateLimitStorage):
    """Thread-safe in-process rate limiter storage (the default of a limiter without one)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: dict[str, tuple[int, int, int, str]] = {}
        self._sweep_at = _SWEEP_AT

    def _get(self, key: str, now: int) -> tuple[int, int, int, str] | None:
        state = self._state.get(key)
        if state is not None and state[0] <= now:
            del self._state[key]
            return None
        return state

    def _sweep(self, now: int) -> None:
        for key in [k for k, s in self._state.items() if s[0] <= now]:
            del self._state[key]
        self._sweep_at = max(_SWEEP_AT, 2 * len(self._state))

    def check(self, key: str, rate: Rate, burst: int, cost: int = 1,
              max_wait: float | None = 0.0) -> RateDecision:
        key = resource_key(key)
        interval = rate.interval_us
        limit = -1 if max_wait is None else int(max_wait * 1_000_000)
        with self._lock:
            now = _now_us()
            state = self._get(key, now)
            allowed, wait, remaining, tat = gcra(state[0] if state else now, now, interval,
                                                 burst, cost, limit)
            if allowed:
                self._state[key] = (tat, interval, burst, rate.text)
                if len(self._state) >= self._sweep_at:
                    self._sweep(now)
        return RateDecision(allowed, wait / 1_000_000, remaining, time.time(), tat)

    def cancel(self, key: str, decision: RateDecision, rate: Rate, cost: int = 1) -> bool:
        key = resource_key(key)
        with self._lock:
            now = _now_us()
            state = self._get(key, now)
            if state is None or state[0] != decision.token:
                return False
            back = state[0] - cost * rate.interval_us
            if back <= now:
                del self._state[key]
            else:
                self._state[key] = (back, *state[1:])
            return True

    def get_rate_info(self, key: str, rate: Rate | None = None,
                      burst: int | None = None) -> RateInfo:
        key = resource_key(key)
        with self._lock:
            now = _now_us()
            return rate_info(key, self._get(key, now), now, rate, burst)

    def reset(self, key: str) -> bool:
        key = resource_key(key)
        with self._lock:
            return self._get(key, _now_us()) is not None and self._state.pop(key) is not None
