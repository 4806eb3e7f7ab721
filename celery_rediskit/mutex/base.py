"""The mutex contract: what a lock storage does (:class:`MutexStorage`), the lease a holder
gets (:class:`MutexLease`) and a lock's snapshot (:class:`LockInfo`)."""

from __future__ import annotations

import threading
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any

from ..lease import Lease, LeaseKind, LeaseStorage

__all__ = ["LockInfo", "MutexLease", "MutexStorage"]


@dataclass(frozen=True)
class LockInfo:
    """A snapshot of one lock.

    ``ttl`` is the holder's remaining lease in seconds (0.0 when free); ``holder`` the owner id
    (``"<host>/<pid>/<random>:<n>"``) or None; ``fencing_token`` the token of the latest grant
    of this key (kept after release), or None if it was never granted.
    """

    key: str
    locked: bool
    ttl: float
    holder: str | None
    fencing_token: int | None
    extra: dict[str, Any] = field(default_factory=dict)


class MutexLease(Lease):
    """A held mutex. ``fencing_token`` rises with every grant of the key: pass it to the
    resource you protect so it can refuse writes from a holder whose lease ran out."""

    kind = LeaseKind.MUTEX


class MutexStorage(LeaseStorage):
    """Where locks live. Times are seconds; every method takes the lock's ``key``."""

    @abstractmethod
    def acquire(
        self,
        key: str,
        owner: str,
        lease: float,
        timeout: float | None,
        abort: threading.Event | None = None,
    ) -> int:
        """Block until ``owner`` holds ``key`` for ``lease`` seconds; return the fencing token.

        Raises ``LockTimeout`` after ``timeout`` seconds (None: no limit; 0: try once without
        queueing) and
        ``AcquireAborted`` when ``abort`` is set while waiting.
        """

    @abstractmethod
    def get_lock_info(self, key: str) -> LockInfo:
        """A snapshot of ``key``: locked, remaining lease, holder, last fencing token."""

    def is_locked(self, key: str) -> bool:
        """True when someone holds ``key`` now."""
        return self.get_lock_info(key).locked

    @abstractmethod
    def extend_lock(self, key: str, seconds: float) -> bool:
        """Admin: add ``seconds`` to the current holder's lease, whoever it is."""

    @abstractmethod
    def force_release(self, key: str) -> bool:
        """Admin: release ``key`` whoever holds it (the next waiter gets it). True if held."""
