"""The distributed mutex: ``create_mutex`` / ``Mutex`` over a ``MutexStorage``.

CommandKit's mutex API in Python, with leases that renew, fencing tokens, owner-checked release
and waiters woken on release. The storage decides where locks live: ``MemoryMutexStorage`` for
one process, ``RedisMutexStorage`` for many hosts.
"""

from __future__ import annotations

import threading
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any

from ._validate import resource_key
from .granting import Granter
from .lease import Lease, LeaseStorage, LostCallback

__all__ = ["LockInfo", "Mutex", "MutexLease", "MutexStorage", "create_mutex"]

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

    kind = "lock"


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


class Mutex(Granter[MutexLease]):
    """A mutex over ``storage``: ``with_lock``, ``lock`` (context manager) and ``acquire``.

    ``timeout`` (seconds, None for no limit) bounds each wait; ``lease`` (seconds) is how long
    a grant lives without renewal: with ``auto_renew`` (the default) the process's renewer
    keeps it alive until release, so a crashed holder frees the lock within one lease.
    """

    lease_class = MutexLease

    def __init__(
        self,
        *,
        timeout: float | None = 30.0,
        lease: float = 30.0,
        storage: MutexStorage | None = None,
        on_lost: LostCallback | None = None,
    ) -> None:
        super().__init__(timeout=timeout, lease=lease, on_lost=on_lost)
        if storage is None:
            from .mutex_memory import MemoryMutexStorage

            storage = MemoryMutexStorage()
        self.storage = storage

    def _grant(
        self, key: str, owner: str, lease: float, timeout: float | None,
        abort: threading.Event | None,
    ) -> tuple[MutexStorage, int]:
        return self.storage, self.storage.acquire(key, owner, lease, timeout, abort)

    lock = Granter.hold
    """``with mutex.lock(key) as lease:`` holds ``key`` for the block (see ``acquire``)."""

    with_lock = Granter.run_holding
    """``mutex.with_lock(key, fn, *args, **kwargs)`` runs ``fn`` holding ``key``."""

    def is_locked(self, key: str) -> bool:
        return self.storage.is_locked(resource_key(key))

    def get_lock_info(self, key: str) -> LockInfo:
        return self.storage.get_lock_info(resource_key(key))


def create_mutex(
    *,
    timeout: float | None = 30.0,
    lease: float = 30.0,
    storage: MutexStorage | None = None,
    on_lost: LostCallback | None = None,
) -> Mutex:
    """Create a :class:`Mutex` (CommandKit's ``createMutex``). Times are seconds."""
    return Mutex(timeout=timeout, lease=lease, storage=storage, on_lost=on_lost)
