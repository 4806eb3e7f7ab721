"""The worker side of the integration's tasks, in the worker's main process: the request
class (``RedisKitTask.Request``) and the message strategy (``RedisKitTask.Strategy``).

:class:`TrackedRequest` tells the app's :class:`.children.ChildWatch` which pool child
started which task, so that a terminated or timed-out task's leases are released once that
child has stopped or moved on. :func:`strategy` is Celery's default strategy with one step
added before a message goes to the pool: a task that parks (``"park"``) whose first lock or
limit is full is parked there and then (:func:`.parking.park_received`), without taking a
pool process. Imported by the worker only (by name).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery.worker.request import Request
from celery.worker.state import task_ready
from celery.worker.strategy import default

from .children import child_watch_of
from .parking import ParkUnknown, park_received

__all__ = ["PAUSE", "TrackedRequest", "strategy"]

log = logging.getLogger("celery_rediskit")

PAUSE = 5.0
"""Seconds the main process of a worker leaves parking to the runs after parking on receipt
failed (Redis unreachable, say): its event loop, which serves every message and control
command, waits on a failing Redis at most once per pause, not once per message."""


class TrackedRequest(Request):  # type: ignore[misc]
    """``Request`` that reports ``on_accepted(pid)`` (the child started this task)."""

    def on_accepted(self, pid: int, time_accepted: float) -> None:
        # before Celery's handler: a terminate waiting for this acknowledgement fires
        # task_revoked from it, and that handler looks the child up
        watch = child_watch_of(self.task.app)
        if watch is not None and pid:
            watch.accepted(pid, self.id)
        super().on_accepted(pid, time_accepted)


class _Consumer:
    """The worker's consumer as Celery's default strategy reads it, with the hand-off of a
    message to the pool (``on_task_request``) replaced."""

    def __init__(self, consumer: Any, on_task_request: Any) -> None:
        self._consumer = consumer
        self.on_task_request = on_task_request

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


def strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Any:
    """Celery's default strategy; for a task that parks, a message whose first lock or
    limit is full is parked on receipt (``park_received``) instead of going to the pool.

    The default strategy reserves the request (``task_reserved``), then hands it to
    ``consumer.on_task_request``: the hand-off here tries the park first and, when the
    message parked, ends the request (``task_ready``) as the pool would. A message delayed
    by an ETA or a rate limit reaches the pool through the consumer directly, as before:
    its run parks if it must. When parking on receipt fails before the park is sent, the
    message goes to the pool (its run decides); after, it goes back to the broker
    (:class:`.parking.ParkUnknown`); either way parking on receipt pauses for
    :data:`PAUSE` seconds."""
    policy = getattr(task, "_rk_policy", None)
    if policy is None or not policy.parks:
        return default(task, app, consumer, **kwargs)
    hand_off = consumer.on_task_request
    paused_until = 0.0

    def on_task_request(req: Any) -> None:
        nonlocal paused_until
        parked = False
        if time.monotonic() >= paused_until:
            try:
                parked = park_received(task, req)
            except ParkUnknown:
                log.warning("rediskit: parking %s[%s] on receipt failed after the park was "
                            "sent: the message goes back to the broker", task.name, req.id,
                            exc_info=True)
                paused_until = time.monotonic() + PAUSE
                req.reject(requeue=True)
                task_ready(req)
                return
            except Exception:
                log.warning("rediskit: parking %s[%s] on receipt failed: its run decides",
                            task.name, req.id, exc_info=True)
                paused_until = time.monotonic() + PAUSE
        if parked:
            task_ready(req)
            return
        hand_off(req)

    return default(task, app, _Consumer(consumer, on_task_request), **kwargs)
