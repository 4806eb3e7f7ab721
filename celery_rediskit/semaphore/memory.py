"""``MemorySemaphoreStorage``: semaphores for one process, with per-holder leases.

Same semantics as Redis: holders expire on ``time.monotonic()``, waiters are served in arrival
order, permits can change while held.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from .._validate import positive_int, resource_key
from ..errors import AcquireAborted, LockTimeout
from ..lease import ABORT_CHECK, Lease
from .base import SemaphoreInfo, SemaphoreStorage, note_declared

__all__ = ["MemorySemaphoreStorage"]

_storage_ids = itertools.count(1)


@dataclass
class _State:
    total: int
    initial: int
    holders: dict[str, float] = field(default_factory=dict)  # owner -> lease end (monotonic)
    queue: deque[str] = field(default_factory=deque)
    pinned: bool = False  # the total was set by an admin call (see base.py)

    def reap(self, now: float) -> None:
        for owner in [o for o, end in self.holders.items() if end <= now]:
            del self.holders[owner]


class MemorySemaphoreStorage(SemaphoreStorage):
    """Thread-safe in-process semaphore storage (the default when a semaphore has none).

    ``permits`` is the total used when an admin call meets a semaphore not yet initialised.
    """

    def __init__(self, *, permits: int = 1) -> None:
        self.default_permits = positive_int("permits", permits)
        self._cond = threading.Condition()
        self._sems: dict[str, _State] = {}
        self._where = f"memory:{next(_storage_ids)}"  # names this storage in note_declared

    def _state(self, key: str, permits: int | None = None) -> _State:
        state = self._sems.get(key)
        if state is None:
            n = self.default_permits if permits is None else permits
            state = self._sems[key] = _State(total=n, initial=n)
        state.reap(time.monotonic())
        return state

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
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            state = self._state(key, permits)
            if declared:
                self._declare(key, state, permits)
            state.queue.append(owner)
            try:
                while True:
                    now = time.monotonic()
                    state.reap(now)
                    free = state.total - len(state.holders)
                    if free > 0 and owner in list(state.queue)[:free]:
                        state.holders[owner] = now + lease
                        return 1
                    if abort is not None and abort.is_set():
                        raise AcquireAborted(f"waiting for permit {key!r} was aborted", key)
                    if deadline is not None and now >= deadline:
                        raise LockTimeout(
                            f"could not acquire permit {key!r} within {timeout} s", key
                        )
                    waits = [min(state.holders.values()) - now] if state.holders else []
                    if deadline is not None:
                        waits.append(deadline - now)
                    if abort is not None:
                        waits.append(ABORT_CHECK)
                    self._cond.wait(min(waits) if waits else None)
            finally:
                state.queue.remove(owner)
                self._cond.notify_all()

    def _declare(self, key: str, state: _State, permits: int) -> None:
        # As sem_acquire.lua with declared permits: they replace a different total unless an
        # admin call set it (then they are what reset returns to).
        if state.pinned:
            state.initial = permits
        if state.total != permits:
            note_declared(self._where, key, permits, state.total, state.pinned)
            if not state.pinned:
                state.total = state.initial = permits
                self._cond.notify_all()

    def release(self, key: str, owner: str) -> bool:
        with self._cond:
            state = self._state(key)
            if state.holders.pop(owner, None) is None:
                return False
            self._cond.notify_all()
            return True

    def extend(self, key: str, owner: str, seconds: float, *, add: bool) -> bool:
        with self._cond:
            state = self._state(key)
            end = state.holders.get(owner)
            if end is None:
                return False
            state.holders[owner] = (end if add else time.monotonic()) + seconds
            return True

    def holder_ttl(self, key: str, owner: str) -> float:
        with self._cond:
            end = self._state(key).holders.get(owner)
            return 0.0 if end is None else max(0.0, end - time.monotonic())

    def renew_leases(self, leases: Sequence[Lease]) -> list[bool]:
        return [
            self.extend(lease.key, lease.owner, lease.lease_seconds, add=False) for lease in leases
        ]

    def get_semaphore_info(self, key: str) -> SemaphoreInfo:
        key = resource_key(key)
        with self._cond:
            state = self._sems.get(key)
            if state is None:
                return SemaphoreInfo(key, 0, 0, 0, initialized=False)
            now = time.monotonic()
            state.reap(now)
            held = len(state.holders)
            return SemaphoreInfo(
                key, state.total, max(0, state.total - held), held,
                holders={o: end - now for o, end in state.holders.items()},
                pinned=state.pinned,
            )

    def _change(self, key: str, total: int | None = None, initial: int | None = None,
                *, pinned: bool = True) -> int:
        # An admin call: its total is pinned (declared permits leave it alone), but reset's.
        state = self._state(resource_key(key))
        if total is not None:
            state.total = max(0, total)
            state.pinned = pinned
        if initial is not None:
            state.initial = initial
        self._cond.notify_all()
        return state.total

    def initialize(self, key: str, permits: int) -> None:
        permits = positive_int("permits", permits)
        with self._cond:
            self._change(key, permits, permits)

    def increase_permits(self, key: str, n: int) -> int:
        n = positive_int("n", n)
        with self._cond:
            return self._change(key, self._state(key).total + n)

    def decrease_permits(self, key: str, n: int) -> int:
        n = positive_int("n", n)
        with self._cond:
            return self._change(key, self._state(key).total - n)

    def reset(self, key: str) -> None:
        with self._cond:
            self._change(key, self._state(key).initial, pinned=False)

    def clear(self, key: str) -> None:
        with self._cond:
            self._sems.pop(resource_key(key), None)
            self._cond.notify_all()
