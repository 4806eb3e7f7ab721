"""A held lease on a lock or a semaphore permit, as its holder sees it."""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from ._validate import positive_seconds
from .renewal import renewer

__all__ = ["Lease", "LeaseStorage", "LostCallback"]

log = logging.getLogger(__name__)

LostCallback = Callable[["Lease", str], None]
"""Called as ``on_lost(lease, reason)`` from the renewer thread when a lease is lost."""


class LeaseStorage(ABC):
    """What a lease needs of the storage that granted it: the part shared by the mutex and
    semaphore storages. Every operation is owner-checked; times are seconds."""

    @abstractmethod
    def release(self, key: str, owner: str) -> bool:
        """Give ``owner``'s grant of ``key`` back; False (nothing changes) if it held none.
        Idempotent."""

    @abstractmethod
    def extend(self, key: str, owner: str, seconds: float, *, add: bool) -> bool:
        """Extend ``owner``'s lease by ``seconds`` (``add``) or to ``seconds``; False if it
        no longer holds ``key`` (a lease that ended is never re-created)."""

    @abstractmethod
    def holder_ttl(self, key: str, owner: str) -> float:
        """Remaining lease of ``owner`` on ``key`` in seconds; 0.0 if it holds nothing."""

    @abstractmethod
    def renew_leases(self, leases: Sequence[Lease]) -> list[bool]:
        """Renew each lease to its full length in one call; True where still held."""


class Lease:
    """A grant of ``key`` to ``owner`` for ``lease_seconds``, renewed while ``auto_renew``.

    Use as a context manager (released on exit) or call :meth:`release`. ``lost`` turns True
    when the renewer finds the lease gone; it is never re-created behind the holder's back.
    """

    kind = "lease"

    def __init__(
        self,
        storage: LeaseStorage,
        key: str,
        owner: str,
        lease_seconds: float,
        *,
        fencing_token: int = 0,
        on_lost: LostCallback | None = None,
    ) -> None:
        self.storage = storage
        self.key = key
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.fencing_token = fencing_token
        self.on_lost = on_lost
        self.last_renewed = time.monotonic()
        self.acquired_at = time.time()
        self.auto_renew = False
        self.released = False
        self.lost = False  # True once the lease is known gone while held (see _mark_lost)
        self.lost_reason: str | None = None

    @property
    def renewal_target(self) -> LeaseStorage:
        return self.storage

    def ttl(self) -> float:
        """Remaining lease in seconds according to the server; 0.0 when no longer held."""
        return self.storage.holder_ttl(self.key, self.owner)

    def extend(self, seconds: float) -> bool:
        """Add ``seconds`` to the remaining lease. False (and ``lost``) if no longer held."""
        seconds = positive_seconds("seconds", seconds)
        ok = self.storage.extend(self.key, self.owner, seconds, add=True)
        if not ok and not self.released:
            self._mark_lost("it was not held any more when extended")
        return ok

    def start_renewal(self) -> None:
        """Have the process's renewer keep this lease alive until release."""
        self.auto_renew = True
        renewer().register(self)

    def stop_renewal(self) -> None:
        """Stop renewing (the lease then ends after its remaining time unless released)."""
        if self.auto_renew:
            self.auto_renew = False
            renewer().unregister(self)

    def release(self) -> bool:
        """Give the lease back (idempotent). True if this call released a lease still held."""
        if self.released:
            return False
        if self.auto_renew:
            renewer().unregister(self)
        # If Redis is unreachable this raises and the lease simply runs out; release() may be
        # called again.
        held = self.storage.release(self.key, self.owner)
        self.released = True
        return held

    def _mark_lost(self, reason: str) -> None:
        if self.lost:
            return
        self.lost_reason = reason
        self.lost = True
        log.warning("rediskit: %s %r lost: %s", self.kind, self.key, reason)
        if self.on_lost is not None:
            try:
                self.on_lost(self, reason)
            except Exception:  # a failing callback must not kill the renewer
                log.exception("rediskit: on_lost callback failed for %r", self.key)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "lost" if self.lost else ("released" if self.released else "held")
        return (
            f"<{type(self).__name__} {self.key!r} owner={self.owner!r} "
            f"token={self.fencing_token} {state}>"
        )
