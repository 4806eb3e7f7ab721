"""Parked entries of locks and semaphores: the contract (no Celery here).

A caller that finds a lock held or a semaphore full can *park* an opaque payload (bytes, under
an id) in the resource's FIFO instead of waiting or retrying, and go away. Whoever frees the
resource later *dispatches*: it takes the oldest parked entries, one per free permit, with the
lock or a permit **reserved** for each (owner ``"park:<dispatch id>"``, for one lease), and
hands the payloads back to be re-sent. The re-sent caller **adopts** its reservation (it holds
the lock or permit from then on, renewing it like any lease), or learns that it is a copy that
must not run.

- **Turns.** Entries are ordered by their *turn*: the server's clock (µs) when the entry
  first parked. An entry that parks again (say on another resource) passes its turn along, so
  it keeps its place. A free permit goes to parked entries with an older turn than the caller
  asking for it.
- **Claims.** A taken entry is kept (``sent``) with its dispatch id and a deadline until it is
  adopted: taken entries whose publisher died, or whose message was lost, are re-sent by a
  sweep once the deadline passes. A second copy of a re-sent message finds its entry gone (or
  under another dispatch id) when it arrives, and is dropped.
- **Ids** are unique among the entries of one resource: an id parked or sent already is not
  parked twice (the caller is a copy).
- **Sent ahead.** A dispatch may also send the next parked entries *ahead*, before a permit
  frees, at most one per permit: each stays parked at its turn, and its re-sent caller waits
  (:meth:`ParkingStore.adopt` with ``wait``) until its turn comes with a free permit, which
  is then reserved for it as for any dispatch, and it is woken at once. A waiter that gives
  up (or dies: it checks in every second) leaves the entry parked at its turn, to be re-sent
  the usual way.

Times are seconds in this API; kinds are ``"m"`` (a lock) and ``"s"`` (a semaphore).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "AHEAD_LEFT",
    "AHEAD_WAITING",
    "DUPLICATE",
    "EXPIRED",
    "FREE",
    "GRANTED",
    "NEED_PAYLOAD",
    "PARKED",
    "Dispatch",
    "ParkOutcome",
    "ParkedEntry",
    "ParkingStore",
    "reservation_owner",
]

GRANTED = "granted"
PARKED = "parked"
DUPLICATE = "duplicate"
NEED_PAYLOAD = "need_payload"
EXPIRED = "expired"
FREE = "free"

AHEAD_WAITING = -2
"""What the adoption script answers a caller sent ahead whose turn has not come (internal:
:meth:`ParkingStore.adopt` waits on it)."""

AHEAD_LEFT = -3
""":meth:`ParkingStore.adopt`: the caller was sent ahead and stopped waiting (``wait``
seconds passed): its entry stays parked at its turn and is re-sent later; this message ends."""


def reservation_owner(dispatch_id: str) -> str:
    """The owner id of the lock or permit reserved for dispatch ``dispatch_id``."""
    return "park:" + dispatch_id


@dataclass(frozen=True)
class Dispatch:
    """An entry taken for re-sending: publish ``payload`` (marking the message with
    ``dispatch_id`` and ``turn``), then :meth:`ParkingStore.mark_sent`."""

    kind: str
    name: str
    id: str
    payload: bytes
    dispatch_id: str
    turn: int

    @property
    def owner(self) -> str:
        return reservation_owner(self.dispatch_id)


@dataclass(frozen=True)
class ParkOutcome:
    """What :meth:`ParkingStore.acquire_or_park` did. ``status``: :data:`GRANTED` (the
    caller holds the lock, ``token`` its fencing token, or a permit, ``token`` 1; either a
    :class:`~celery_rediskit.lease.Grant` dated from when the request was sent),
    :data:`PARKED`, :data:`DUPLICATE` (the id is parked or sent already; nothing changed) or
    :data:`NEED_PAYLOAD` (it would park, but no payload was given) or, asked with
    ``only_if_full``, :data:`FREE` (a permit is free: nothing changed). ``dispatched``: older
    entries taken meanwhile, for the caller to publish."""

    status: str
    token: int = 0
    dispatched: tuple[Dispatch, ...] = ()


@dataclass(frozen=True)
class ParkedEntry:
    """One entry of a resource: ``state`` is ``"parked"``, ``"taken"`` (reserved, not yet
    known published) or ``"sent"`` (published, not yet adopted); ``turn`` in µs since the
    epoch (server clock); ``payload`` as parked."""

    kind: str
    name: str
    id: str
    state: str
    turn: int
    payload: bytes | None


class ParkingStore(ABC):
    """Parked entries of locks (``kind="m"``) and semaphores (``"s"``), by resource name."""

    @abstractmethod
    def acquire_or_park(self, kind: str, name: str, id: str, owner: str, lease: float, *,
                        permits: int = 1, payload: bytes | None = None,
                        turn: int | None = None, message_id: str | None = None,
                        only_if_full: bool = False) -> ParkOutcome:
        """In one atomic step: take the lock or a permit of ``name`` for ``owner`` (``lease``
        seconds) if one is free and no older entry waits for it, else park ``payload`` under
        ``id`` with ``turn`` (default: now). ``permits``: a semaphore's total when none is
        stored. ``message_id`` is remembered as parked here (see :meth:`seen`).

        With ``only_if_full``: park only when no permit is free (the lock is held, every
        permit taken); when one is, change nothing and return :data:`FREE` (the caller takes
        it the ordinary way, first try before older entries, as any newcomer)."""

    @abstractmethod
    def dispatch(self, kind: str, name: str, lease: float, *, permits: int = 1,
                 sweep: bool = False, ahead: bool = False) -> tuple[int, list[Dispatch]]:
        """Take parked entries for the free permits of ``name``, oldest turn first, each with
        a reservation of ``lease`` seconds (an entry sent ahead gets its reservation and is
        woken, with nothing to publish); with ``sweep`` also entries sent earlier whose
        deadline passed; with ``ahead`` also the next parked entries, to be sent ahead (up
        to one per permit). Returns (entries left: parked and sent, the entries to
        publish)."""

    @abstractmethod
    def mark_sent(self, dispatches: Sequence[Dispatch]) -> None:
        """The messages of ``dispatches`` are published: their entries wait for them."""

    @abstractmethod
    def adopt(self, kind: str, name: str, id: str, dispatch_id: str, lease: float, *,
              wait: float = 0.0) -> int:
        """The re-sent ``id`` takes over its reservation for ``lease`` seconds: its fencing
        token (a lock) or 1 (a permit), as a :class:`~celery_rediskit.lease.Grant` dated from
        the call that adopted; 0 when the reservation ended meanwhile (ask again,
        keeping the turn); -1 when this message is a copy that must not run. Sent ahead, it
        first waits for its turn, up to ``wait`` seconds: :data:`AHEAD_LEFT` when it did not
        come (the entry stays parked)."""

    @abstractmethod
    def remove(self, kind: str, name: str, ids: Iterable[str]) -> list[str]:
        """Remove the entries ``ids`` (parked or sent, not yet adopted); the ids removed."""

    @abstractmethod
    def entries(self, kind: str, name: str) -> list[ParkedEntry]:
        """The entries of ``name``: parked ones oldest turn first, then the sent ones."""

    @abstractmethod
    def counts(self, resources: Sequence[tuple[str, str]]) -> list[tuple[int, int]]:
        """(parked, sent) of each (kind, name)."""

    @abstractmethod
    def resources(self) -> list[tuple[str, str]]:
        """Every (kind, name) that has (or recently had) entries."""

    @abstractmethod
    def seen(self, kind: str, name: str, message_id: str) -> bool:
        """True when ``message_id`` parked at ``name`` recently (a redelivered copy)."""

    @abstractmethod
    def sweep(self, lease: float, publish: Callable[[Dispatch], bool],
              permits: int = 1) -> int:
        """For every resource with entries: re-send what is free or overdue (``publish``
        returns True when published); drop resources left empty from the index. Returns how
        many entries were published."""
