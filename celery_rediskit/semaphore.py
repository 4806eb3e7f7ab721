"""The distributed counting semaphore: ``create_semaphore`` / ``Semaphore``.

CommandKit's semaphore API in Python, done right: every holder has its own lease (so a holder
that dies gives its permit back when its lease ends), permits can change while held, and
waiters are served in arrival order, woken as soon as a permit is freed.
"""

from __future__ import annotations

import threading
from abc import abstractmethod
from dataclasses import dataclass, field

from ._validate import positive_int, resource_key
from .granting import Granter
from .lease import Lease, LeaseStorage, LostCallback

__all__ = ["Permit", "Semaphore", "SemaphoreInfo", "SemaphoreStorage", "create_semaphore"]


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

    kind = "permit"


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


class Semaphore(Granter[Permit]):
    """A semaphore over ``storage``: ``with_permit``, ``permit`` (context manager), ``acquire``.

    ``permits`` is the total a key starts with when first used. ``timeout`` (seconds, None for
    no limit) bounds each wait; ``lease`` (seconds) is how long a permit lives without renewal.
    """

    lease_class = Permit

    def __init__(
        self,
        *,
        permits: int,
        timeout: float | None = 30.0,
        lease: float = 30.0,
        storage: SemaphoreStorage | None = None,
        on_lost: LostCallback | None = None,
    ) -> None:
        super().__init__(timeout=timeout, lease=lease, on_lost=on_lost)
        self.permits = positive_int("permits", permits)
        if storage is None:
            from .semaphore_memory import MemorySemaphoreStorage

            storage = MemorySemaphoreStorage()
        self.storage = storage

    def _grant(
        self, key: str, owner: str, lease: float, timeout: float | None,
        abort: threading.Event | None,
    ) -> tuple[SemaphoreStorage, int]:
        return self.storage, self.storage.acquire(key, owner, self.permits, lease, timeout, abort)

    permit = Granter.hold
    """``with sem.permit(key) as permit:`` holds a permit for the block (see ``acquire``)."""

    with_permit = Granter.run_holding
    """``sem.with_permit(key, fn, *args, **kwargs)`` runs ``fn`` holding a permit."""

    def get_semaphore_info(self, key: str) -> SemaphoreInfo:
        return self.storage.get_semaphore_info(resource_key(key))


def create_semaphore(
    *,
    permits: int,
    timeout: float | None = 30.0,
    lease: float = 30.0,
    storage: SemaphoreStorage | None = None,
    on_lost: LostCallback | None = None,
) -> Semaphore:
    """Create a :class:`Semaphore` (CommandKit's ``createSemaphore``). Times are seconds."""
    return Semaphore(permits=permits, timeout=timeout, lease=lease, storage=storage,
                     on_lost=on_lost)
