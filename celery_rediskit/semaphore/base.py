"""The semaphore contract: what a semaphore storage does (:class:`SemaphoreStorage`), the
lease a holder gets (:class:`Permit`) and a semaphore's snapshot (:class:`SemaphoreInfo`).

Where a semaphore's total comes from: by default, the ``permits`` of its first acquire (later
acquires' ``permits`` are ignored) or an admin call. An acquire with ``declared=True`` says its
``permits`` is the total the caller's code declares: it replaces a different stored total at
that acquire (holders keep their permits; nobody new gets in while they exceed it), except a
total set by ``initialize``, ``increase_permits`` or ``decrease_permits`` (an operator's),
which stays until ``reset``. :func:`note_declared` logs a difference once per process.
"""

from __future__ import annotations

import logging
import threading
from abc import abstractmethod
from dataclasses import dataclass, field

from ..lease import Lease, LeaseKind, LeaseStorage

__all__ = ["Permit", "SemaphoreInfo", "SemaphoreStorage", "note_declared"]

log = logging.getLogger("celery_rediskit.semaphore")

_noted: set[tuple[str, str]] = set()
_noted_lock = threading.Lock()


def note_declared(where: str, key: str, declared: int, stored: int, pinned: bool) -> None:
    """Log that semaphore ``key`` (in storage ``where``) had a total of ``stored`` where an
    acquire declared ``declared``: once per process and semaphore.

    INFO when the declared total replaced it: a redeploy changed the limit, which is what the
    code asks for and needs no action. WARNING when an operator's total stays in its place:
    the limit written in the code is not the one enforced until someone resets it.
    """
    with _noted_lock:
        if (where, key) in _noted:
            return
        if len(_noted) >= 4096:
            _noted.clear()  # bounded (templated names); a semaphore may then be noted again
        _noted.add((where, key))
    if pinned:
        log.warning(
            "rediskit: semaphore %r keeps the total of %d permits an operator set; the %d "
            "declared by this process apply after a reset ('celery -A <app> rediskit permits "
            "%s --reset', or the storage's reset())",
            key, stored, declared, key,
        )
    else:
        log.info(
            "rediskit: semaphore %r now has the %d permits declared by this process (its total "
            "was %d); holders keep their permits, and nobody new gets in while they exceed it",
            key, declared, stored,
        )


@dataclass(frozen=True)
class SemaphoreInfo:
    """A snapshot of one semaphore.

    ``total`` permits now (0 if never initialised), ``acquired`` held, ``available`` =
    ``max(0, total - acquired)`` (``acquired`` can exceed ``total`` right after a decrease);
    ``holders`` maps each holder's owner id to its remaining lease in seconds. ``pinned``: the
    total was set by an operator (``initialize``, ``increase_permits``, ``decrease_permits``),
    so acquires with declared permits leave it alone until ``reset``.
    """

    key: str
    total: int
    available: int
    acquired: int
    initialized: bool = True
    holders: dict[str, float] = field(default_factory=dict)
    pinned: bool = False


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
        *,
        declared: bool = False,
    ) -> int:
        """Block until ``owner`` holds a permit of ``key`` (initialised with ``permits`` on
        first use) for ``lease`` seconds. Returns 1. ``timeout`` None: no limit; 0: try once.

        ``declared``: ``permits`` is the total the caller's code declares, applied at this
        acquire unless an operator set the total (see the module docstring)."""

    @abstractmethod
    def get_semaphore_info(self, key: str) -> SemaphoreInfo:
        """Total, available, acquired and the holders with their remaining leases."""

    @abstractmethod
    def initialize(self, key: str, permits: int) -> None:
        """Set the total (and the total ``reset`` returns to) to ``permits``. Holders are
        kept; while they exceed the total, nobody new gets in. Declared permits leave this
        total alone until ``reset``."""

    @abstractmethod
    def increase_permits(self, key: str, n: int) -> int:
        """Add ``n`` permits; waiters are served at once. Returns the new total (which
        declared permits leave alone until ``reset``)."""

    @abstractmethod
    def decrease_permits(self, key: str, n: int) -> int:
        """Remove ``n`` permits (never below 0); holders keep theirs. Returns the new total
        (which declared permits leave alone until ``reset``)."""

    @abstractmethod
    def reset(self, key: str) -> None:
        """Set the total back to its initialised value (for declared permits: the last
        declared total), and let declared permits apply again; holders are kept."""

    @abstractmethod
    def clear(self, key: str) -> None:
        """Delete the semaphore; current holders find their permits lost."""

    def get_available_permits(self, key: str) -> int:
        return self.get_semaphore_info(key).available

    def get_total_permits(self, key: str) -> int:
        return self.get_semaphore_info(key).total
