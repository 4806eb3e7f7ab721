"""The semaphore contract: what a semaphore storage does (:class:`SemaphoreStorage`), the
lease a holder gets (:class:`Permit`) and a semaphore's snapshot (:class:`SemaphoreInfo`)."""

from __future__ import annotations

import threading
from abc import abstractmethod
from dataclasses import dataclass, field

from ..lease import Lease, LeaseKind, LeaseStorage

__all__ = ["Permit", "SemaphoreInfo", "SemaphoreStorage"]


@dataclass(frozen=True)
class SemaphoreInfo:
    """A snapshot of one semaphore.

    ``total`` permits now (0 if never initialised), ``acquired`` held, ``available`` =
    ``max(0, total - acquired)`` (``acquired`` can exceed ``total`` right after a decrease);
    ``holders`` maps each holder's owner id to its remaining lease in seconds.
    """

    key: str
    total: int
    available: int
    acquired: int
    initialized: bool = True
    holders: dict[str, float] = field(default_factory=dict)


class Permit(Lease):
    """One held permit of a semaphore (a lease: ``ttl()``, ``extend()``, ``release()``,
    ``lost``), renewed while held."""

    kind = LeaseKind.SEMAPHORE


class SemaphoreStorage(LeaseStorage):
    """Where semaphores live. Times are seconds; permits are integers >= 1."""

    @abstractmethod
    def acquire(
        self,
        key: str,
        owner: str,
        permits: int,
        lease: float,
        timeout: float | None,
        abort: threading.Event | None = None,
    ) -> int:
        """Block until ``owner`` holds a permit of ``key`` (initialised with ``permits`` on
        first use) for ``lease`` seconds. Returns 1. ``timeout`` None: no limit; 0: try once."""

    @abstractmethod
    def get_semaphore_info(self, key: str) -> SemaphoreInfo:
        """Total, available, acquired and the holders with their remaining leases."""

    @abstractmethod
    def initialize(self, key: str, permits: int) -> None:
        """Set the total (and the total ``reset`` returns to) to ``permits``. Holders are
        kept; while they exceed the total, nobody new gets in."""

    @abstractmethod
    def increase_permits(self, key: str, n: int) -> int:
        """Add ``n`` permits; waiters are served at once. Returns the new total."""

    @abstractmethod
    def decrease_permits(self, key: str, n: int) -> int:
        """Remove ``n`` permits (never below 0); holders keep theirs. Returns the new total."""

    @abstractmethod
    def reset(self, key: str) -> None:
        """Set the total back to its initialised value; holders are kept."""

    @abstractmethod
    def clear(self, key: str) -> None:
        """Delete the semaphore; current holders find their permits lost."""

    def get_available_permits(self, key: str) -> int:
        return self.get_semaphore_info(key).available

    def get_total_permits(self, key: str) -> int:
        return self.get_semaphore_info(key).total
