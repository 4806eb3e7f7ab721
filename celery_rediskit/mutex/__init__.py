"""The distributed mutex: ``create_mutex`` / ``Mutex`` over a ``MutexStorage``.

Leases that renew, fencing tokens, owner-checked release and waiters woken on release. The
storage decides where locks live: ``MemoryMutexStorage`` for one process,
``RedisMutexStorage`` for many hosts.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import ParamSpec, TypeVar

from .._validate import resource_key
from ..granting import UNSET, Granter
from ..lease import LostCallback
from .base import LockInfo, MutexLease, MutexStorage
from .memory import MemoryMutexStorage

__all__ = [
    "LockInfo",
    "MemoryMutexStorage",
    "Mutex",
    "MutexLease",
    "MutexStorage",
    "create_mutex",
]

P = ParamSpec("P")
R = TypeVar("R")


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
        self.storage: MutexStorage = MemoryMutexStorage() if storage is None else storage

    def _grant(
        self, key: str, owner: str, lease: float, timeout: float | None,
        abort: threading.Event | None,
    ) -> tuple[MutexStorage, int]:
        return self.storage, self.storage.acquire(key, owner, lease, timeout, abort)

    def lock(
        self,
        key: str,
        *,
        timeout: float | None = UNSET,
        abort: threading.Event | None = None,
        lease: float | None = None,
        auto_renew: bool = True,
    ) -> AbstractContextManager[MutexLease]:
        """``with mutex.lock(key) as lease:`` holds ``key`` for the block, released on exit.

        ``timeout`` and ``lease`` are seconds (defaults: the mutex's); see :meth:`acquire`.
        """
        return self._hold(key, timeout=timeout, abort=abort, lease=lease, auto_renew=auto_renew)

    def with_lock(self, key: str, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run ``fn(*args, **kwargs)`` holding ``key``; return its result.

        ``timeout=`` (seconds) and ``abort=`` keywords are taken by the mutex, not given to
        ``fn`` (wrap ``fn`` in ``functools.partial`` if it needs arguments of those names).
        Raises ``LockTimeout`` or ``AcquireAborted`` without calling ``fn``.
        """
        return self._run_holding(key, fn, *args, **kwargs)

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
    """Create a :class:`Mutex`. ``timeout`` and ``lease`` are seconds (``timeout`` None: wait
    without limit); ``storage`` defaults to a new :class:`MemoryMutexStorage`."""
    return Mutex(timeout=timeout, lease=lease, storage=storage, on_lost=on_lost)
