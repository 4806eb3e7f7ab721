"""The process-wide lease renewer: one thread renews every auto-renewed lease of the process.

Each tick (every ``lease / 3`` seconds of the shortest registered lease) it renews all leases
of one storage backend in a single call (one round trip for Redis). A lease that its storage
reports as no longer held is marked lost and its ``on_lost`` callback runs; it is never
re-created. A lease that can't be renewed because Redis is unreachable stays registered until
its lease would have run out, and is then marked lost too.

Registering a lease only touches a dict: the thread is woken only when the new lease needs an
earlier tick than the one already planned.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

__all__ = ["RenewableLease", "RenewalTarget", "Renewer", "renewer"]

log = logging.getLogger(__name__)

_IDLE_TICK = 10.0  # seconds between ticks when nothing is registered


class RenewalTarget(Protocol):
    """A storage that renews many of its leases in one call (one round trip for Redis)."""

    def renew_leases(self, leases: Sequence[Any]) -> list[bool]:
        """Renew each lease to its full ``lease_seconds``; True where it is still held."""
        ...


class RenewableLease(Protocol):
    """What the renewer needs of a lease."""

    key: str
    owner: str
    lease_seconds: float
    last_renewed: float  # time.monotonic() of the last grant or successful renewal

    @property
    def renewal_target(self) -> RenewalTarget: ...

    def _mark_lost(self, reason: str) -> None: ...


class Renewer:
    """Renews registered leases from one daemon thread until they are unregistered or lost."""

    def __init__(self) -> None:
        self._leases: dict[int, RenewableLease] = {}
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._tick = _IDLE_TICK
        self.ticks = 0  # number of ticks that renewed something (observable in tests)
        self._failing = False  # the last renewal call failed (an outage is being logged)

    def register(self, lease: RenewableLease) -> None:
        """Keep ``lease`` alive until :meth:`unregister` is called or it is lost."""
        self._leases[id(lease)] = lease
        interval = lease.lease_seconds / 3
        if interval < self._tick:
            self._tick = interval
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

    def _run(self) -> None:
        while True:
            self._wake.wait(self._tick)
            self._wake.clear()
            leases = list(self._leases.values())
            if leases:
                self._tick = min(lease.lease_seconds for lease in leases) / 3
                self.renew_now(leases)
            # With nothing registered, keep the last tick: an acquire right after a release
            # then needs no wake-up of this thread.

    def renew_now(self, leases: Sequence[RenewableLease] | None = None) -> None:
        """Renew ``leases`` (default: all registered) now, grouped by storage."""
        if leases is None:
            leases = list(self._leases.values())
        groups: dict[int, list[RenewableLease]] = {}
        for lease in leases:
            groups.setdefault(id(lease.renewal_target), []).append(lease)
        self.ticks += 1
        for group in groups.values():
            started = time.monotonic()
            try:
                results = group[0].renewal_target.renew_leases(group)
            except Exception as exc:  # Redis down or failing: retry next tick while time remains
                if not self._failing:  # once per outage, not per tick and lease
                    log.warning("rediskit: renewing %d lease(s) failed, retrying each tick "
                                "until their leases end: %s", len(group), exc)
                self._failing = True
                for lease in group:
                    if started - lease.last_renewed >= lease.lease_seconds:
                        self._lose(lease, f"could not be renewed before it ended ({exc})")
                continue
            if self._failing:
                self._failing = False
                log.warning("rediskit: renewing leases works again")
            for lease, ok in zip(group, results, strict=True):
                if id(lease) not in self._leases:
                    continue  # released while the renewal was in flight
                if ok:
                    lease.last_renewed = started
                else:
                    self._lose(lease, "it expired or was taken over before renewal")

    def _lose(self, lease: RenewableLease, reason: str) -> None:
        if self._leases.pop(id(lease), None) is not None:
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
