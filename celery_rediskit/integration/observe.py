"""Sending the integration's signals (``signals.py``) from the task's code paths.

The task class calls these only after checking the signal's ``receivers`` (an empty list
when nobody listens), so an unwatched task pays one attribute test per point: no declared
name is worked out, no time is read, no keyword arguments are built.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import LockTimeout
from ..lease import Lease, LeaseKind
from .naming import declared_name
from .signals import (
    acquire_timeout,
    cache_hit,
    cache_miss,
    lease_acquired,
    lease_lost,
    lease_released,
    task_duplicate,
    task_parked,
    task_requeued,
    task_skipped,
)

__all__ = [
    "acquired",
    "cache_looked_up",
    "duplicate",
    "lost",
    "parked",
    "released",
    "requeued",
    "skipped",
    "waiting",
]


def acquired(task: Any, task_id: str, lease: Lease, wait: float) -> None:
    kind = lease.kind
    lease_acquired.send(sender=task, task_id=task_id, lease=lease, kind=kind.resource,
                        key=lease.key, name=declared_name(task, kind, lease.key), wait=wait)


def released(task: Any, task_id: str, lease: Lease) -> None:
    kind = lease.kind
    lease_released.send(sender=task, task_id=task_id, lease=lease, kind=kind.resource,
                        key=lease.key, name=declared_name(task, kind, lease.key),
                        held=max(0.0, time.time() - lease.acquired_at), lost=lease.lost)


def lost(task: Any, task_id: str | None, lease: Lease, reason: str) -> None:
    kind = lease.kind
    lease_lost.send(sender=task, task_id=task_id, lease=lease, reason=reason,
                    kind=kind.resource, key=lease.key,
                    name=declared_name(task, kind, lease.key))


@contextmanager
def waiting(task: Any, task_id: str, kind: LeaseKind, key: str) -> Iterator[None]:
    """Around a blocking acquire: sends ``acquire_timeout`` when it raises ``LockTimeout``."""
    started = time.monotonic()
    try:
        yield
    except LockTimeout:
        if acquire_timeout.receivers:
            acquire_timeout.send(sender=task, task_id=task_id, kind=kind.resource, key=key,
                                 name=declared_name(task, kind, key),
                                 wait=time.monotonic() - started)
        raise


def skipped(task: Any, task_id: str, reason: str, key: str, holder: str | None) -> None:
    task_skipped.send(sender=task, task_id=task_id, reason=reason, key=key,
                      name=declared_name(task, LeaseKind.MUTEX, key), holder=holder)


def requeued(task: Any, task_id: str, reason: str, key: str, countdown: float,
             requeues: int, kind: LeaseKind) -> None:
    task_requeued.send(sender=task, task_id=task_id, reason=reason, key=key,
                       name=declared_name(task, kind, key), countdown=countdown,
                       requeues=requeues)


def parked(task: Any, task_id: str, key: str, kind: LeaseKind, turn: int | None) -> None:
    task_parked.send(sender=task, task_id=task_id,
                     reason="locked" if kind is LeaseKind.MUTEX else "limited", key=key,
                     name=declared_name(task, kind, key),
                     turn=None if turn is None else turn / 1e6)


def duplicate(task: Any, task_id: str, existing: str | None, key: str, where: str) -> None:
    task_duplicate.send(sender=task, task_id=task_id, existing=existing or None, key=key,
                        name=declared_name(task, LeaseKind.MUTEX, key), where=where)


def cache_looked_up(task: Any, task_id: str | None, key: str, found: bool, where: str) -> None:
    signal = cache_hit if found else cache_miss
    if signal.receivers:
        signal.send(sender=task, task_id=task_id, key=key, where=where)
