"""The cache provider contract (:class:`CacheProvider`) and what every provider shares.

A provider stores values under string keys with an optional lifetime (seconds) and tags:
``get``/``set``/``delete``/``exists``/``expire``/``clear``, ``revalidate_tag``, and the
single-flight protocol used by memoised functions:
``claim(key)`` returns a hit, or makes the caller the one who computes (then ``fill`` or
``abandon``), or tells it to compute without the cache (``bypass``).
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, Final

from ..errors import CacheError, ConfigurationError
from ..lease import ABORT_CHECK

__all__ = [
    "MISSING",
    "CacheProvider",
    "CacheUnavailable",
    "Claim",
    "check_tags",
]


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Final[Any] = _Missing()
"""Pass as ``get(key, MISSING)`` to tell a miss from a cached ``None``."""


class CacheUnavailable(CacheError):
    """The cache's backend (Redis) is unreachable; callers should carry on without it."""


def check_tags(tags: Iterable[str]) -> tuple[str, ...]:
    """Validate tags: non-empty strings without braces, newlines or ``\\x1f``."""
    if isinstance(tags, str):
        tags = (tags,)
    out: list[str] = []
    for tag in tags:
        if (
            not isinstance(tag, str) or not tag
            or any(c in tag for c in "{}\n\x1f")
        ):
            raise ConfigurationError(
                f"a cache tag must be a non-empty string without '{{', '}}', newlines or "
                f"\\x1f, got {tag!r}"
            )
        if tag not in out:
            out.append(tag)
    return tuple(out)


class Claim:
    """The answer of :meth:`CacheProvider.claim`.

    ``state`` is ``"hit"`` (``value`` holds the cached value), ``"owner"`` (the caller computes,
    then calls ``fill`` or ``abandon`` exactly once), ``"busy"`` (only with ``wait=0``: another
    caller computes it now) or ``"bypass"`` (compute without the cache's coordination: the
    wait ran out or the backend is unavailable; ``store`` tells whether storing the result is
    still worth trying).
    """

    __slots__ = ("key", "state", "value", "handle", "store")

    def __init__(
        self, key: str, state: str, value: Any = None, handle: Any = None, store: bool = True
    ) -> None:
        self.key = key
        self.state = state
        self.value = value
        self.handle = handle
        self.store = store

    def __repr__(self) -> str:
        return f"<Claim {self.key!r} {self.state}>"


class _Flights:
    """Per-process single-flight: one lock per key being computed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.keys: dict[str, list[Any]] = {}  # key -> [lock, users]

    def enter(self, key: str) -> list[Any]:
        with self.lock:
            slot = self.keys.get(key)
            if slot is None:
                slot = self.keys[key] = [threading.Lock(), 0]
            slot[1] += 1
            return slot

    def leave(self, key: str, slot: list[Any]) -> None:
        with self.lock:
            slot[1] -= 1
            if slot[1] == 0 and self.keys.get(key) is slot:
                del self.keys[key]


def _take(lock: threading.Lock, wait: float, abort: threading.Event | None) -> bool:
    """Acquire ``lock`` within ``wait`` seconds (0: one try), unless ``abort`` is set first."""
    if wait <= 0:
        return lock.acquire(False)
    if abort is None:
        return lock.acquire(timeout=wait)
    deadline = time.monotonic() + wait
    while not abort.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if lock.acquire(timeout=min(left, ABORT_CHECK)):
            return True
    return False


class CacheProvider(ABC):
    """Where cached values live. Keys are non-empty strings without braces; times in seconds.

    ``ttl`` arguments take seconds (float) or a duration string (``"30s"``, ``"5m"``, ``"1h"``,
    ``"2d"``); ``None`` means no expiry (``RedisCacheProvider``: its ``idle_ttl``, a week by
    default, since every key it writes expires).
    """

    @abstractmethod
    def get(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default`` when absent or expired.

        A stored ``None`` is returned as ``None``: pass ``default=MISSING`` to tell them apart.
        """

    @abstractmethod
    def set(
        self, key: str, value: Any, ttl: float | str | None = None, *, tags: Iterable[str] = ()
    ) -> None:
        """Store ``value`` under ``key`` for ``ttl`` seconds (None: see above), with ``tags``."""

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove ``key``; True if it existed."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """True when ``key`` holds a live (unexpired) entry."""

    @abstractmethod
    def expire(self, key: str, ttl: float | str | None) -> bool:
        """Set the remaining lifetime of ``key`` to ``ttl`` seconds (None: see above).

        Returns False when ``key`` does not exist.
        """

    @abstractmethod
    def clear(self) -> int:
        """Remove every entry of this provider (and nothing else); return how many."""

    @abstractmethod
    def revalidate_tag(self, tag: str) -> int:
        """Remove every entry carrying ``tag``; return how many were removed."""

    # -- single flight: the default serialises computations within this process --------------

    def claim(
        self,
        key: str,
        *,
        lease: float = 30.0,
        wait: float = 30.0,
        abort: threading.Event | None = None,
    ) -> Claim:
        """Look ``key`` up; on a miss, become its computer or wait (up to ``wait`` seconds,
        0 for not at all) for the one computing it. ``lease`` (seconds) bounds how long a
        crashed computer can hold others back (the default implementation, per process,
        ignores it). ``abort`` set while waiting ends the wait within ``ABORT_CHECK`` seconds
        with ``bypass`` (``store`` False), leaving nothing queued (a cancelled async caller).
        """
        value = self.get(key, MISSING)
        if value is not MISSING:
            return Claim(key, "hit", value)
        flights: _Flights = self.__dict__.setdefault("_rediskit_flights", _Flights())
        slot = flights.enter(key)
        if not _take(slot[0], wait, abort):
            flights.leave(key, slot)
            if abort is not None and abort.is_set():
                return Claim(key, "bypass", store=False)
            return Claim(key, "busy" if wait <= 0 else "bypass")
        value = self.get(key, MISSING)
        if value is not MISSING:
            slot[0].release()
            flights.leave(key, slot)
            return Claim(key, "hit", value)
        return Claim(key, "owner", handle=(flights, slot))

    def fill(
        self, claim: Claim, value: Any, ttl: float | str | None, tags: Iterable[str] = ()
    ) -> None:
        """Store the computed ``value`` for an ``owner`` claim and let waiters see it."""
        try:
            self.set(claim.key, value, ttl, tags=tags)
        finally:
            self.abandon(claim)

    def abandon(self, claim: Claim) -> None:
        """Give up an ``owner`` claim without storing (the computation failed)."""
        if claim.handle is not None:
            flights, slot = claim.handle
            claim.handle = None
            slot[0].release()
            flights.leave(claim.key, slot)
