"""The distributed counting semaphore: ``create_semaphore`` / ``Semaphore``.

Every holder has its own lease (so a holder that dies gives its permit back when its lease
ends), permits can change while held, and waiters are served in arrival order, woken as soon
as a permit is freed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import ParamSpec, TypeVar

from .._validate import positive_int, resource_key
from ..granting import UNSET, Granter
from ..lease import LostCallback
from .base import Permit, SemaphoreInfo, SemaphoreStorage
from .memory import MemorySemaphoreStorage

__all__ = [
    "MemorySemaphoreStorage",
    "Permit",
    "Semaphore",
    "SemaphoreInfo",
    "SemaphoreStorage",
    "create_semaphore",
]

P = ParamSpec("P")
R = TypeVar("R")


class Semaphore(Granter[Permit]):
    """A semaphore over ``storage``: ``with_permit``, ``permit`` (context manager), ``acquire``.

    ``permits`` is the total a key starts with when first used. ``timeout`` (seconds, None for
    no limit) bounds each wait; ``lease`` (seconds) is how long a permit lives without renewal.
    ``declared=True``: ``permits`` is the total this code declares, applied at every acquire
    (a changed value takes effect at the next one) unless an operator set the key's total
    with ``initialize``/``increase_permits``/``decrease_permits``, until ``reset``.
    """

    lease_class = Permit

    def __init__(
        self,
        *,
        permits: int,
        timeout: float | None = 30.0,
        lease: float = 30.0,
        storage: SemaphoreStorage | None = None,
        on_lost: LostCallback | None = None,
        declared: bool = False,
    ) -> None:
        super().__init__(timeout=timeout, lease=lease, on_lost=on_lost)
        self.permits = positive_int("permits", permits)
        self.declared = bool(declared)
        self.storage: SemaphoreStorage = (
            MemorySemaphoreStorage() if storage is None else storage
        )

    def _grant(
        self, key: str, owner: str, lease: float, timeout: float | None,
        abort: threading.Event | None,
    ) -> tuple[SemaphoreStorage, int]:
        return self.storage, self.storage.acquire(
            key, owner, self.permits, lease, timeout, abort, declared=self.declared
        )

    def permit(
        self,
        key: str,
        *,
        timeout: float | None = UNSET,
        abort: threading.Event | None = None,
        lease: float | None = None,
        auto_renew: bool = True,
    ) -> AbstractContextManager[Permit]:
        """``with sem.permit(key) as permit:`` holds a permit of ``key`` for the block,
        released on exit. ``timeout`` and ``lease`` are seconds (defaults: the semaphore's);
        see :meth:`acquire`."""
        return self._hold(key, timeout=timeout, abort=abort, lease=lease, auto_renew=auto_renew)

    def with_permit(
        self, key: str, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """Run ``fn(*args, **kwargs)`` holding a permit of ``key``; return its result.

        ``timeout=`` (seconds) and ``abort=`` keywords are taken by the semaphore, not given
        to ``fn``. Raises ``LockTimeout`` or ``AcquireAborted`` without calling ``fn``.
        """
        return self._run_holding(key, fn, *args, **kwargs)

    def get_semaphore_info(self, key: str) -> SemaphoreInfo:
        return self.storage.get_semaphore_info(resource_key(key))


def create_semaphore(
    *,
    permits: int,
    timeout: float | None = 30.0,
    lease: float = 30.0,
    storage: SemaphoreStorage | None = None,
    on_lost: LostCallback | None = None,
    declared: bool = False,
) -> Semaphore:
    """Create a :class:`Semaphore` of ``permits`` per key. ``timeout`` and ``lease`` are
    seconds (``timeout`` None: wait without limit); ``storage`` defaults to a new
    :class:`MemorySemaphoreStorage`. ``declared``: see :class:`Semaphore`."""
    return Semaphore(permits=permits, timeout=timeout, lease=lease, storage=storage,
                     on_lost=on_lost, declared=declared)
