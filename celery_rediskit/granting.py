"""What a mutex and a semaphore have in common: acquire a lease, hold it for a block or a call.

Subclasses say how a grant is made (``_grant``) and which lease class wraps it.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Generic, ParamSpec, TypeVar

from ._validate import optional_seconds, positive_seconds, resource_key
from .lease import Lease, LeaseStorage, LostCallback, new_owner_id

__all__ = ["UNSET", "Granter"]

P = ParamSpec("P")
R = TypeVar("R")
L = TypeVar("L", bound=Lease)

UNSET: Any = object()  # "use the default of the mutex/semaphore" (None means "no limit")


class Granter(ABC, Generic[L]):
    """Acquires leases of type ``L`` from a storage, with defaults for timeout and lease.

    ``timeout`` (seconds, None for no limit) bounds each wait; ``lease`` (seconds) is how long
    a grant lives without renewal: with ``auto_renew`` (the default) the process's renewer
    keeps it alive until release, so a crashed holder frees it within one lease.
    """

    lease_class: type[L]

    def __init__(
        self, *, timeout: float | None, lease: float, on_lost: LostCallback | None
    ) -> None:
        self.timeout = optional_seconds("timeout", timeout)
        self.lease = positive_seconds("lease", lease)
        self.on_lost = on_lost

    @abstractmethod
    def _grant(
        self, key: str, owner: str, lease: float, timeout: float | None,
        abort: threading.Event | None,
    ) -> tuple[LeaseStorage, int]:
        """Block until granted; return the storage holding the grant and its token."""

    def acquire(
        self,
        key: str,
        *,
        timeout: float | None = UNSET,
        abort: threading.Event | None = None,
        lease: float | None = None,
        auto_renew: bool = True,
        blocking: bool = True,
        owner: str | None = None,
        companion_keys: Sequence[str] = (),
    ) -> L:
        """Acquire ``key`` and return the lease; the caller must ``release()`` it.

        ``timeout`` seconds (None: no limit) bound the wait, then ``LockTimeout``; setting
        ``abort`` raises ``AcquireAborted`` within ``ABORT_CHECK``
        (0.02 s) plus one round trip. With ``blocking=False`` it tries once
        without queueing and raises ``LockTimeout`` at once if nothing is free.
        ``owner`` (default: a fresh id from :func:`new_owner_id`) lets a caller that records
        its claims elsewhere know the owner id before the grant; it must come from
        ``new_owner_id()`` (grants are delivered to the process it names).
        ``companion_keys`` become the lease's (:class:`~celery_rediskit.lease.Lease`): kept
        alive by its renewals.
        """
        key = resource_key(key)
        if not blocking:
            wait: float | None = 0.0
        elif timeout is UNSET:
            wait = self.timeout
        else:
            wait = optional_seconds("timeout", timeout)
        seconds = self.lease if lease is None else positive_seconds("lease", lease)
        if owner is None:
            owner = new_owner_id()
        storage, token = self._grant(key, owner, seconds, wait, abort)
        held = self.lease_class(
            storage, key, owner, seconds, fencing_token=token, on_lost=self.on_lost,
            companion_keys=companion_keys,
        )
        if auto_renew:
            held.start_renewal()
        return held

    @contextmanager
    def _hold(
        self,
        key: str,
        *,
        timeout: float | None = UNSET,
        abort: threading.Event | None = None,
        lease: float | None = None,
        auto_renew: bool = True,
    ) -> Iterator[L]:
        """Hold ``key`` for a ``with`` block; released on exit, whatever happens."""
        held = self.acquire(key, timeout=timeout, abort=abort, lease=lease, auto_renew=auto_renew)
        try:
            yield held
        finally:
            held.release()

    def _run_holding(
        self, key: str, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """Run ``fn(*args, **kwargs)`` holding ``key``; return its result.

        ``timeout=`` and ``abort=`` are taken by the mutex/semaphore, not given to ``fn``
        (wrap ``fn`` in ``functools.partial`` if it needs arguments of those names).
        """
        timeout = kwargs.pop("timeout", UNSET)
        abort = kwargs.pop("abort", None)
        with self._hold(key, timeout=timeout, abort=abort):  # type: ignore[arg-type]
            return fn(*args, **kwargs)
