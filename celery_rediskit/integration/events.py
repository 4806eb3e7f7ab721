"""Custom task events for monitors (``celery events``, Flower): one way to send them.

``send_task_event(task, request, "task-<what>", **fields)`` sends a task event about the
running task (``uuid`` is its id, ``hostname`` its worker), which ``celery.events.State``
turns into the state ``<WHAT>`` with the fields on the task. Used for ``task-skipped`` and
``task-requeued``; any mode that ends a run in its own way (``task-parked``) sends its event
the same way.

The event is sent whether or not the worker was started with ``-E``: a pool process cannot
see ``celery control enable_events`` (which Flower sends), and an event nobody listens to is
dropped by the broker (no queue is bound to the event exchange). A task with
``send_events = False`` sends none. Eager runs and map/starmap items (which would name the
outer task) send none either.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["REQUEUED_EVENT", "SKIPPED_EVENT", "send_task_event"]

log = logging.getLogger("celery_rediskit")

SKIPPED_EVENT = "task-skipped"
"""Sent when a run is skipped; fields ``reason`` ("locked" or "duplicate"), ``lock`` (the
lock or claim name) and ``holder`` (its owner id, or the task id holding the claim).
A monitor shows the state ``SKIPPED`` until ``task-succeeded`` (the skipped task ends
SUCCESS with the result None)."""

REQUEUED_EVENT = "task-requeued"
"""Sent when a run met its lock held or its limit full and the task was sent again;
fields ``reason`` ("locked" or "limited"), ``key`` (the lock or semaphore), ``name`` (its
declared name), ``countdown`` (seconds until the next attempt) and ``requeues`` (earlier
re-queues of this message). A monitor shows the state ``REQUEUED``."""


def send_task_event(task: Any, request: Any, event_type: str, **fields: Any) -> bool:
    """Send task event ``event_type`` (``"task-..."``) about the task ``request`` runs, with
    ``fields``; True if sent. Never raises: a failure to publish is logged."""
    if request.is_eager or getattr(request, "rediskit_inline", False) or not task.send_events:
        return False
    try:
        task.send_event(event_type, retry=False, **fields)
    except Exception:
        log.warning("rediskit: sending the %s event of %s failed", event_type, request.id,
                    exc_info=True)
        return False
    return True
