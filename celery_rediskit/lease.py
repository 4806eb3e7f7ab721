"""A held lease on a lock or a semaphore permit, as its holder sees it.

Also what every storage shares about holders: the lease kinds (:class:`LeaseKind`), the
process and owner ids grants are addressed to, and how often a wait looks at its abort event.
Nothing here talks to Redis.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import ClassVar

from ._validate import positive_seconds
from .renewal import RenewalTarget, lease_deadline, renewer

__all__ = [
    "ABORT_CHECK",
    "Grant",
    "Lease",
    "LeaseKind",
    "LeaseStorage",
    "LostCallback",
    "new_owner_id",
    "process_id",
]

log = logging.getLogger(__name__)

ABORT_CHECK = 0.02
"""Seconds: how often a waiting acquire looks at the caller's ``abort`` event, so an abort
ends a wait within this interval plus one round trip."""


class LeaseKind(StrEnum):
    """What a lease grants. The value is the code stored in Redis records (claims)."""

    MUTEX = "m"
    SEMAPHORE = "s"

    @property
    def resource(self) -> str:
        """The name of the held resource in reports: ``"lock"`` or ``"semaphore"``."""
        return "lock" if self is LeaseKind.MUTEX else "semaphore"

    @property
    def grant(self) -> str:
        """The name of one holder's grant: ``"lock"`` or ``"permit"``."""
        return "lock" if self is LeaseKind.MUTEX else "permit"

    @classmethod
    def from_resource(cls, name: str) -> LeaseKind:
        """The kind whose :attr:`resource` is ``name``; ValueError for anything else."""
        for kind in cls:
            if kind.resource == name:
                return kind
        raise ValueError(f"kind must be 'lock' or 'semaphore', got {name!r}")


# -- who holds: process and owner ids ----------------------------------------------------

def _make_process_id() -> str:
    # Readable in reports (host and pid) and unique across restarts (random part).
    # ':' separates it from the counter in owner ids and ' ' ends it in messages: keep them out.
    host = socket.gethostname().replace(":", "_").replace(" ", "_")[:40]
    return f"{host}/{os.getpid()}/{secrets.token_hex(3)}"


class _Identity:
    def __init__(self) -> None:
        self.process_id = _make_process_id()
        self.counter = itertools.count(1)


_identity = _Identity()


def _new_identity_in_child() -> None:
    # A child's grants must go to its own channel: it gets a fresh process id.
    global _identity
    _identity = _Identity()


os.register_at_fork(after_in_child=_new_identity_in_child)


def process_id() -> str:
    """This process's id: ``"<host>/<pid>/<random>"`` (new after ``fork``)."""
    return _identity.process_id


def new_owner_id() -> str:
    """A fresh owner id for one acquisition: ``"<process id>:<n>"``."""
    identity = _identity
    return f"{identity.process_id}:{next(identity.counter)}"


class Grant(int):
    """A fencing token (>= 1) with the moment its lease began, as a storage's acquire returns it.

    ``since`` is ``time.monotonic()`` when the request that made (or last renewed) the grant
    was *sent*: the server made it no earlier, so a lease counted from ``since`` never outlives
    the server's. A reply that reaches the caller late (a slow network, a paused process) then
    costs lease time instead of letting the holder act past the server's expiry.
    """

    since: float

    def __new__(cls, token: int, since: float) -> Grant:
        grant = super().__new__(cls, token)
        grant.since = since
        return grant


_lost_lock = threading.Lock()  # on_lost runs once even if extend() and the renewer race


def _new_lost_lock_in_child() -> None:
    global _lost_lock
    _lost_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lost_lock_in_child)

LostCallback = Callable[["Lease", str], None]
"""Called as ``on_lost(lease, reason)`` once, when a lease is found lost: from a renewer thread
(at the lease's deadline at the latest), or from ``extend()``."""


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

    @property
    def renewal_target(self) -> RenewalTarget:
        """What the renewer calls to renew this storage's leases: the storage itself, unless
        leases of several storages are renewed together (the Redis storages of one client
        share one target, with a connection of its own)."""
        return self


class Lease:
    """A grant of ``key`` to ``owner`` for ``lease_seconds``, renewed while ``auto_renew``.

    Use as a context manager (released on exit) or call :meth:`release`. ``lost`` turns True
    when the renewer finds the lease gone, and, while it is auto-renewed, at its deadline (its
    last successful renewal, or its grant, plus its length, less a small margin) if no renewal
    got through by then; once True it stays True. A lost lease is never re-created behind the
    holder's back.

    ``companion_keys`` (Redis storages; may be set at any time while held) are other keys, on
    the same Redis, that must live as long as the lease: a record about the holder, say. Each
    renewal of the lease also extends their expiry to no less than ``lease_seconds``, in the
    same script and round trip (``_redis/renew_batch.py``). They are never created, never
    shortened, and not touched by ``release()``: delete them when done, or they expire one
    lease after the last renewal.

    ``granted_at`` is ``time.monotonic()`` when the request that made the grant was sent
    (default: the token's :attr:`Grant.since` if it is a :class:`Grant`, else now): the lease's
    deadline counts from there, so a grant whose reply came late has less time left.
    """

    kind: ClassVar[LeaseKind]

    def __init__(
        self,
        storage: LeaseStorage,
        key: str,
        owner: str,
        lease_seconds: float,
        *,
        fencing_token: int = 0,
        on_lost: LostCallback | None = None,
        companion_keys: Sequence[str] = (),
        granted_at: float | None = None,
    ) -> None:
        self.storage = storage
        self.key = key
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.fencing_token = int(fencing_token)
        self.on_lost = on_lost
        self.companion_keys: tuple[str, ...] = tuple(companion_keys)
        # time.monotonic() when the last successful renewal (at first: the grant) was *sent*:
        # the server's lease runs from no earlier, so the deadline never lags the server's.
        if granted_at is None:
            granted_at = getattr(fencing_token, "since", None)
        self.last_renewed = time.monotonic() if granted_at is None else granted_at
        self.acquired_at = time.time()
        self.auto_renew = False
        self.released = False
        self._lost = False  # sticky: set once the lease is known or deemed gone while held
        self._told = False  # on_lost has been called
        self.lost_reason: str | None = None

    @property
    def lost(self) -> bool:
        """True once the lease is gone while held: taken away, expired, not extendable, or
        auto-renewed but past its deadline without a successful renewal. Stays True."""
        if self._lost:
            return True
        if self.auto_renew and not self.released and (
            time.monotonic() >= lease_deadline(self.last_renewed, self.lease_seconds)
        ):
            if self.lost_reason is None:
                self.lost_reason = "its lease ended without a successful renewal"
            self._lost = True  # the renewer calls on_lost (at the deadline, if not already)
            return True
        return False

    @property
    def renewal_target(self) -> RenewalTarget:
        return self.storage.renewal_target

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
        """Mark the lease lost (for good) and call ``on_lost``, once."""
        with _lost_lock:
            if self._told:
                return
            self._told = True
        self.lost_reason = reason
        self._lost = True
        log.warning("rediskit: %s %r lost: %s", self.kind.grant, self.key, reason)
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
