"""The process-wide lease renewer: keeps every auto-renewed lease of the process alive, and
tells a holder its lease is lost no later than the lease's own deadline.

Failure model:

- **One target never delays another.** A scheduler thread (``rediskit-renewer``) ticks every
  ``lease / 3`` seconds of the shortest registered lease. Each tick it groups the leases by
  renewal target (for Redis: one target per redis-py client, shared by its mutex and semaphore
  storages) and hands each group to that target's own thread (``rediskit-renew-<n>``), which
  renews the whole group in one call (one round trip for Redis). The scheduler does no I/O. A
  target whose previous call is still running is skipped for this tick; an unreachable server
  stalls only its own thread. How long one call may take is the target's business (Redis: a
  dedicated connection with a timeout of at most ``lease / 4`` and no retries, see
  ``_redis/renew_batch.py``).
- **Lost by the deadline.** A lease's deadline is when its last successful renewal request was
  *sent* (at first: when the lease object was made, right after its grant) plus its length,
  less :func:`deadline_margin` (1 % + 2 ms, for clock-rate drift between this host and the
  server). The server keeps the lease at least until then, so nobody else can hold it
  earlier. ``Lease.lost`` reads True from the deadline on, whichever thread looks; the
  scheduler wakes at the earliest deadline and marks every lease past it lost (it is
  unregistered and ``on_lost`` runs), whether its renewal failed, is still stuck in a call, or
  was answered too late.
- A lease its storage reports as no longer held is marked lost at once. A lost lease is never
  re-created: the renewal script only extends a lease its owner still holds.
- Registering a lease only touches a dict: the scheduler is woken only when the new lease needs
  an earlier tick than the one already planned. A target's thread is started by the scheduler
  at its first tick with leases of that target, and stops after ``LANE_IDLE`` seconds without.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

__all__ = [
    "LANE_IDLE",
    "RenewableLease",
    "RenewalTarget",
    "Renewer",
    "deadline_margin",
    "lease_deadline",
    "renewer",
]

log = logging.getLogger(__name__)

_IDLE_TICK = 10.0  # seconds between ticks when nothing is registered

LANE_IDLE = 60.0
"""Seconds a target's renewal thread lives on without leases to renew."""

_DRIFT = 0.01  # fraction of the lease kept as margin for clock-rate drift
_DRIFT_MIN = 0.002  # seconds of margin on top (the grant's own reply, scheduling)


def deadline_margin(lease_seconds: float) -> float:
    """Seconds by which a lease is marked lost before the server would let it end."""
    return lease_seconds * _DRIFT + _DRIFT_MIN


def lease_deadline(last_renewed: float, lease_seconds: float) -> float:
    """``time.monotonic()`` at which a lease last renewed (request sent) at ``last_renewed``
    counts as lost."""
    return last_renewed + lease_seconds - (lease_seconds * _DRIFT + _DRIFT_MIN)


class RenewalTarget(Protocol):
    """What renews a group of leases in one call (one round trip for Redis).

    May also have ``idle()``: called when the target had nothing to renew for ``LANE_IDLE``
    seconds (to close a connection)."""

    def renew_leases(self, leases: Sequence[Any]) -> list[bool]:
        """Renew each lease to its full ``lease_seconds``; True where it is still held.
        Raises when nothing is known (the server did not answer)."""
        ...


class RenewableLease(Protocol):
    """What the renewer needs of a lease."""

    key: str
    owner: str
    lease_seconds: float
    last_renewed: float  # time.monotonic() when the last successful renewal (or grant) was sent

    @property
    def lost(self) -> bool: ...

    @property
    def renewal_target(self) -> RenewalTarget: ...

    def _mark_lost(self, reason: str) -> None: ...


class _Lane:
    """One target's renewal thread: runs one renewal call at a time, handed over by the
    scheduler."""

    _numbers = itertools.count(1)

    def __init__(self, owner: Renewer, target: RenewalTarget) -> None:
        self.owner = owner
        self.target = target
        self.busy = False  # a call is handed over or running (set by the scheduler only)
        self.failing = False  # the last call failed (an outage is being logged)
        self.last_error: Exception | None = None
        self.last_used = time.monotonic()
        self._batch: list[RenewableLease] = []
        self._go = threading.Event()
        self._stopping = False
        self.thread = threading.Thread(
            target=self._run, name=f"rediskit-renew-{next(self._numbers)}", daemon=True
        )
        self.thread.start()

    def submit(self, leases: list[RenewableLease], now: float) -> bool:
        """Hand ``leases`` over for renewal; False while the previous call still runs."""
        self.last_used = now
        if self.busy:
            return False
        self.busy = True
        self._batch = leases
        self._go.set()
        return True

    def stop(self) -> None:
        self._stopping = True
        self._go.set()

    def _run(self) -> None:
        while True:
            self._go.wait()
            self._go.clear()
            if self._stopping:
                idle = getattr(self.target, "idle", None)
                if idle is not None:
                    try:
                        idle()
                    except Exception:
                        log.debug("rediskit: closing a renewal target failed", exc_info=True)
                return
            batch, self._batch = self._batch, []
            try:
                self.owner._renew_group(self.target, batch, self)
            except Exception:  # a bug, not an outage: keep the thread alive
                log.exception("rediskit: renewing leases failed unexpectedly")
            finally:
                self.busy = False


class Renewer:
    """Renews registered leases until they are unregistered or lost (see the module doc)."""

    def __init__(self) -> None:
        self._leases: dict[int, RenewableLease] = {}
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._tick = _IDLE_TICK
        self._wake_at = 0.0  # time.monotonic() the scheduler plans to wake at next
        self._lanes: dict[int, _Lane] = {}
        self.ticks = 0  # number of ticks that renewed something (observable in tests)

    def register(self, lease: RenewableLease) -> None:
        """Keep ``lease`` alive until :meth:`unregister` is called or it is lost."""
        self._leases[id(lease)] = lease
        interval = lease.lease_seconds / 3
        if interval < self._tick:
            self._tick = interval
            self._wake.set()
        elif lease_deadline(lease.last_renewed, lease.lease_seconds) < self._wake_at:
            # A grant whose reply came late: its deadline may come before the planned wake.
            self._wake.set()
        if self._thread is None:
            self._start()

    def unregister(self, lease: RenewableLease) -> None:
        self._leases.pop(id(lease), None)

    def held(self) -> list[RenewableLease]:
        """The leases being renewed now (a snapshot)."""
        return list(self._leases.values())

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="rediskit-renewer", daemon=True
                )
                self._thread.start()

    # -- the scheduler thread ---------------------------------------------------------------

    def _run(self) -> None:
        last_tick = time.monotonic()
        while True:
            now = time.monotonic()
            leases = list(self._leases.values())
            next_deadline = self._lose_overdue(leases, now)
            if now >= last_tick + self._tick:
                last_tick = now
                live = [lease for lease in leases if self._leases.get(id(lease)) is lease]
                if live:
                    self._tick = min(lease.lease_seconds for lease in live) / 3
                    self._dispatch(live, now)
                # With nothing registered, keep the last tick: an acquire right after a
                # release then needs no wake-up of this thread.
                self._retire_lanes(now)
            self._wake_at = min(last_tick + self._tick, next_deadline)
            wait = self._wake_at - time.monotonic()
            if wait > 0:
                self._wake.wait(wait)
            self._wake.clear()

    def _lose_overdue(self, leases: list[RenewableLease], now: float) -> float:
        """Mark lost every lease past its deadline; return the earliest deadline to come."""
        earliest = float("inf")
        for lease in leases:
            deadline = lease_deadline(lease.last_renewed, lease.lease_seconds)
            if now >= deadline or lease.lost:
                self._lose(lease, self._overdue_reason(lease, now))
            elif deadline < earliest:
                earliest = deadline
        return earliest

    def _overdue_reason(self, lease: RenewableLease, now: float) -> str:
        lane = self._lanes.get(id(lease.renewal_target))
        if lane is not None and lane.last_error is not None:
            why = f"renewing failed: {lane.last_error}"
        elif lane is not None and lane.busy:
            why = "a renewal call is still waiting for Redis"
        else:
            why = "no renewal was answered"
        return (f"its lease ended {now - lease.last_renewed:.3f} s after its last renewal "
                f"({why})")

    def _dispatch(self, leases: list[RenewableLease], now: float) -> None:
        groups: dict[int, tuple[RenewalTarget, list[RenewableLease]]] = {}
        for lease in leases:
            target = lease.renewal_target
            groups.setdefault(id(target), (target, []))[1].append(lease)
        for key, (target, group) in groups.items():
            lane = self._lanes.get(key)
            if lane is None or lane.target is not target:
                lane = self._lanes[key] = _Lane(self, target)
            lane.submit(group, now)
        self.ticks += 1

    def _retire_lanes(self, now: float) -> None:
        for key, lane in list(self._lanes.items()):
            if not lane.busy and now - lane.last_used > LANE_IDLE:
                del self._lanes[key]
                lane.stop()

    # -- renewal calls (a target's thread, or the caller of renew_now) ----------------------

    def renew_now(self, leases: Sequence[RenewableLease] | None = None) -> None:
        """Renew ``leases`` (default: all registered) now, in the calling thread, one call per
        target."""
        if leases is None:
            leases = list(self._leases.values())
        groups: dict[int, tuple[RenewalTarget, list[RenewableLease]]] = {}
        for lease in leases:
            target = lease.renewal_target
            groups.setdefault(id(target), (target, []))[1].append(lease)
        self.ticks += 1
        for target, group in groups.values():
            self._renew_group(target, group, self._lanes.get(id(target)))

    def _renew_group(
        self, target: RenewalTarget, group: list[RenewableLease], lane: _Lane | None
    ) -> None:
        started = time.monotonic()
        try:
            results = target.renew_leases(group)
        except Exception as exc:  # Redis unreachable or failing: the deadline decides
            if lane is not None:
                lane.last_error = exc
                if lane.failing:
                    return
                lane.failing = True  # logged once per outage, not per tick and lease
            log.warning("rediskit: renewing %d lease(s) failed, retrying each tick; each is "
                        "lost when its lease ends without a renewal: %s", len(group), exc)
            return
        if lane is not None:
            lane.last_error = None
            if lane.failing:
                lane.failing = False
                log.warning("rediskit: renewing leases works again")
        for lease, ok in zip(group, results, strict=True):
            if self._leases.get(id(lease)) is not lease:
                continue  # released, or lost by its deadline, while the call ran
            if not ok:
                self._lose(lease, "it expired or was taken over before renewal")
                continue
            # The server extended the lease to at least ``started`` + its length. A holder
            # that already read ``lost`` (past the old deadline) keeps it: lost is for good.
            if started > lease.last_renewed:
                lease.last_renewed = started
            if lease.lost:
                self._lose(lease, "its renewal was answered only after its lease had ended")

    def _lose(self, lease: RenewableLease, reason: str) -> None:
        if self._leases.get(id(lease)) is lease and self._leases.pop(id(lease), None) is lease:
            lease._mark_lost(reason)


_renewer: Renewer | None = None
_renewer_lock = threading.Lock()


def renewer() -> Renewer:
    """This process's renewer (a new one after ``fork``: threads do not survive it)."""
    global _renewer
    current = _renewer
    if current is None:
        with _renewer_lock:
            if _renewer is None:
                _renewer = Renewer()
            current = _renewer
    return current


def _after_fork_in_child() -> None:
    global _renewer
    _renewer = None


os.register_at_fork(after_in_child=_after_fork_in_child)
