"""The rate limiter contract: rates (:class:`Rate`, :func:`parse_rate`), what a storage does
(:class:`RateLimitStorage`), a check's outcome (:class:`RateDecision`) and a limiter's snapshot
(:class:`RateInfo`).

The algorithm is GCRA (the generic cell rate algorithm), a token bucket kept as one number:
the *theoretical arrival time* ``tat``. A rate of ``limit`` per ``period`` has one slot every
``interval = period / limit``; a check of ``cost`` slots passes when
``now >= max(tat, now) + cost * interval - burst * interval`` and then moves ``tat`` on by
``cost * interval``. So up to ``burst`` checks pass at once after an idle period, then one per
interval: no window of length ``w`` ever holds more than ``burst + w / interval`` grants, and
there is no fixed window whose boundary lets twice the rate through. When ``tat <= now`` the
bucket is full: the state is the same as no state at all, so storages drop it then (Redis: the
key expires at ``tat``).

Times are microseconds inside (integers, exact in a Lua number), seconds in the API.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any, NamedTuple

from ..errors import ConfigurationError

__all__ = [
    "RATE_FORM",
    "Rate",
    "RateDecision",
    "RateInfo",
    "RateLimitStorage",
    "RateSpec",
    "gcra",
    "parse_burst",
    "parse_rate",
    "rate_info",
]

RateSpec = str | int | float
"""A rate as Celery writes one: ``"10/s"``, ``"100/m"``, ``"1000/h"``, or a number (per second)."""

RATE_FORM = ("'N/s', 'N/m' or 'N/h' with N a number greater than 0 (e.g. '10/s', '100/m', "
             "'1000/h'), or a number per second, as Celery's rate_limit")
"""The accepted form of a rate, as error messages state it."""

_PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:/\s*([smh]))?\s*$")
_US = 1_000_000


@dataclass(frozen=True)
class Rate:
    """``limit`` checks per ``period`` seconds; ``text`` is the rate as written (``"100/m"``)."""

    limit: float
    period: float
    text: str

    @property
    def interval(self) -> float:
        """Seconds between two slots: ``period / limit``."""
        return self.period / self.limit

    @cached_property
    def interval_us(self) -> int:
        """:attr:`interval` in whole microseconds, rounded up (never faster than the rate)."""
        return max(1, math.ceil(self.period * _US / self.limit - 1e-6))


def parse_rate(value: Any, name: str = "rate") -> Rate:
    """``value`` (:data:`RateSpec`) as a :class:`Rate`, or ``ConfigurationError`` (a
    ``ValueError``) naming ``name`` and the accepted form."""
    limit: float | None = None
    unit = "s"
    if isinstance(value, str):
        match = _PATTERN.match(value)
        if match is not None:
            limit, unit = float(match.group(1)), match.group(2) or "s"
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        limit = float(value)
    if limit is None or not math.isfinite(limit) or limit <= 0:
        raise ConfigurationError(f"{name} must be {RATE_FORM}, got {value!r}")
    shown = str(int(limit)) if limit.is_integer() else repr(limit)
    return Rate(limit, _PERIODS[unit], f"{shown}/{unit}")


def parse_burst(value: Any, name: str = "burst") -> int:
    """``value`` as a burst (an int >= 1; None means 1), or ``ConfigurationError`` naming
    ``name``."""
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(
            f"{name} must be an integer of at least 1 (how many checks may pass at once after "
            f"an idle period; None for 1), got {value!r}"
        )
    return value


class RateDecision(NamedTuple):
    """The outcome of one check.

    ``allowed``: the slots are taken. Then ``retry_after`` is 0, or, for a check that may
    reserve (``max_wait``), the seconds until the reserved slots start: the caller starts then.
    Not allowed: nothing was taken, and ``retry_after`` is the seconds until a check of the
    same cost would pass. ``remaining``: checks of cost 1 that would pass right after this one.
    ``now``: the storage's clock at the check (Unix seconds; the Redis server's clock for
    Redis). ``token``: the limiter's state after the grant, which
    :meth:`RateLimitStorage.cancel` needs.
    """

    allowed: bool
    retry_after: float
    remaining: int
    now: float
    token: int = 0

    @property
    def reserved(self) -> bool:
        """Allowed for a later slot: the caller must wait ``retry_after`` seconds first."""
        return self.allowed and self.retry_after > 0


@dataclass(frozen=True)
class RateInfo:
    """A snapshot of one rate limiter.

    ``rate`` and ``burst``: the limiter's (for a storage's own snapshot, the last check's;
    ``""`` and 0 when nothing is known of the key). ``remaining``: checks of cost 1 that would
    pass now (at most ``burst``). ``next_free``: seconds until the next one passes (0: now).
    ``full_in``: seconds until the whole burst is free again, when the state expires.
    ``active``: the storage holds state for the key (it was used within its last period).
    """

    key: str
    rate: str
    burst: int
    remaining: int
    next_free: float
    full_in: float
    active: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gcra(tat: int, now: int, interval: int, burst: int, cost: int,
         max_wait: int) -> tuple[bool, int, int, int]:
    """One check in microseconds, as ``lua/rate_check.lua`` does it: (allowed, wait,
    remaining, tat after). ``max_wait``: 0 only now, > 0 reserve up to that far, -1 any."""
    new_tat = max(tat, now) + cost * interval
    wait = new_tat - burst * interval - now
    if wait > 0 and (max_wait == 0 or 0 < max_wait < wait):
        return False, wait, 0, max(tat, now)
    remaining = max(0, (now - new_tat + burst * interval) // interval)
    return True, max(0, wait), remaining, new_tat


def rate_info(key: str, stored: tuple[int, int, int, str] | None, now: int,
              rate: Rate | None = None, burst: int | None = None) -> RateInfo:
    """The :class:`RateInfo` of ``key`` from its stored state ``(tat, interval, burst, rate
    text)`` (None: none) at ``now`` (us). ``rate``/``burst`` (a limiter's own) win over the
    stored ones: they are what that limiter's next check applies."""
    if stored is not None and stored[0] <= now:
        stored = None  # the bucket is full again: as good as no state
    if rate is not None:
        text, interval, size = rate.text, rate.interval_us, burst or 1
    elif stored is not None:
        text, interval, size = stored[3], stored[1], stored[2]
    else:
        return RateInfo(key, "", 0, 0, 0.0, 0.0, False)
    if stored is None:
        return RateInfo(key, text, size, size, 0.0, 0.0, False)
    tat = stored[0]
    remaining = min(size, max(0, (now - tat + size * interval) // interval))
    next_free = max(0, tat + interval - size * interval - now) / _US
    return RateInfo(key, text, size, remaining, next_free, (tat - now) / _US, True)


def parse_stored(value: Any) -> tuple[int, int, int, str] | None:
    """A limiter's stored value ``"<tat> <interval> <burst> <rate>"`` (bytes or text) as a
    tuple; None for no value or one this version cannot read."""
    if not value:
        return None
    text = value.decode() if isinstance(value, bytes) else str(value)
    parts = text.split(" ", 3)
    try:
        return int(parts[0]), int(parts[1]), int(parts[2]), parts[3] if len(parts) > 3 else ""
    except (ValueError, IndexError):
        return None


class RateLimitStorage(ABC):
    """Where rate limiters live. Each call names the rate and burst it applies (declared by
    the caller, as the semaphore's declared permits): limiters sharing a key should declare the
    same ones. Times are seconds."""

    @abstractmethod
    def check(self, key: str, rate: Rate, burst: int, cost: int = 1,
              max_wait: float | None = 0.0) -> RateDecision:
        """Take ``cost`` slots of ``key`` if free now; with ``max_wait`` > 0 (seconds; None:
        however far), reserve slots that come free within that time instead of refusing."""

    @abstractmethod
    def cancel(self, key: str, decision: RateDecision, rate: Rate, cost: int = 1) -> bool:
        """Give back the slots of ``decision`` (a grant nobody will use) if no later grant
        was made since; True when given back."""

    @abstractmethod
    def get_rate_info(self, key: str, rate: Rate | None = None,
                      burst: int | None = None) -> RateInfo:
        """The snapshot of ``key``, computed with ``rate``/``burst`` when given, else with
        the last check's."""

    @abstractmethod
    def reset(self, key: str) -> bool:
        """Forget ``key``'s state: its whole burst is free at once. True if it had state."""
