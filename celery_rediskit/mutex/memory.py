"""``MemoryMutexStorage``: locks for one process, with the same lease semantics as Redis.

Leases expire on ``time.monotonic()``; fencing tokens rise per key; waiters are served in
arrival order and woken by a condition variable, each wait bounded by the holder's lease.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from .._validate import positive_seconds, resource_key
from ..errors import AcquireAborted, LockTimeout
from ..lease import ABORT_CHECK, Lease
from .base import LockInfo, MutexStorage

__all__ = ["MemoryMutexStorage"]


@dataclass
class _State:
    holder: str | None = None
    expires: float = 0.0
    fence: int = 0
    queue: deque[str] = field(default_factory=deque)

    def expire(self, now: float) -> None:
        if self.holder is not None and self.expires <= now:
            self.holder = None


class MemoryMutexStorage(MutexStorage):
    """Thread-safe in-process lock storage (the default when a mutex has no storage)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._locks: dict[str, _State] = {}

    def _state(self, key: str) -> _State:
        state = self._locks.get(key)
        if state is None:
            state = self._locks[key] = _State()
        state.expire(time.monotonic())
        return state

    def acquire(
        self,
        key: str,
        owner: str,
        lease: float,
        timeout: float | None,
        abort: threading.Event | None = None,
    ) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            state = self._state(key)
            state.queue.append(owner)
            try:
                while True:
                    now = time.monotonic()
                    state.expire(now)
                    if state.holder is None and state.queue[0] == owner:
                        state.holder, state.expires = owner, now + lease
                        state.fence += 1
                        return state.fence
                    if abort is not None and abort.is_set():
                        raise AcquireAborted(f"waiting for lock {key!r} was aborted", key)
                    if deadline is not None and now >= deadline:
                        raise LockTimeout(
                            f"could not acquire lock {key!r} within {timeout} s", key
                        )
                    waits = [state.expires - now if state.holder else None]
                    if deadline is not None:
                        waits.append(deadline - now)
                    if abort is not None:
                        waits.append(ABORT_CHECK)
                    bounded = [w for w in waits if w is not None]
                    self._cond.wait(min(bounded) if bounded else None)
            finally:
                state.queue.remove(owner)
                self._cond.notify_all()

    def release(self, key: str, owner: str) -> bool:
        with self._cond:
            state = self._state(key)
            if state.holder != owner:
                return False
            state.holder = None
            self._cond.notify_all()
            return True

    def extend(self, key: str, owner: str, seconds: float, *, add: bool) -> bool:
        with self._cond:
            state = self._state(key)
            if state.holder is None or (owner and state.holder != owner):
                return False
            now = time.monotonic()
            state.expires = (max(state.expires, now) if add else now) + seconds
            return True

    def holder_ttl(self, key: str, owner: str) -> float:
        with self._cond:
            state = self._state(key)
            if state.holder != owner:
                return 0.0
            return max(0.0, state.expires - time.monotonic())

    def renew_leases(self, leases: Sequence[Lease]) -> list[bool]:
        return [
            self.extend(lease.key, lease.owner, lease.lease_seconds, add=False) for lease in leases
        ]

    def get_lock_info(self, key: str) -> LockInfo:
        key = resource_key(key)
        with self._cond:
            state = self._state(key)
            locked = state.holder is not None
            return LockInfo(
                key=key,
                locked=locked,
                ttl=max(0.0, state.expires - time.monotonic()) if locked else 0.0,
                holder=state.holder,
                fencing_token=state.fence or None,
            )

    def extend_lock(self, key: str, seconds: float) -> bool:
        return self.extend(resource_key(key), "", positive_seconds("seconds", seconds), add=True)

    def force_release(self, key: str) -> bool:
        key = resource_key(key)
        with self._cond:
            state = self._state(key)
            if state.holder is None:
                return False
            state.holder = None
            self._cond.notify_all()
            return True
