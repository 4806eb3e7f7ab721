"""The worker-side request class of the integration's tasks (``RedisKitTask.Request``).

It runs in the worker's main process and only tells the app's :class:`.children.ChildWatch`
which pool child started which task, so that a terminated or timed-out task's leases are
released once that child has stopped or moved on. Imported by the worker only (by name).
"""

from __future__ import annotations

from celery.worker.request import Request

from .children import child_watch_of

__all__ = ["TrackedRequest"]


class TrackedRequest(Request):  # type: ignore[misc]
    """``Request`` that reports ``on_accepted(pid)`` (the child started this task)."""

    def on_accepted(self, pid: int, time_accepted: float) -> None:
        # before Celery's handler: a terminate waiting for this acknowledgement fires
        # task_revoked from it, and that handler looks the child up
        watch = child_watch_of(self.task.app)
        if watch is not None and pid:
            watch.accepted(pid, self.id)
        super().on_accepted(pid, time_accepted)
