"""How long a blocked task waits before its next attempt: bounded exponential backoff.

A task that meets its singleton lock held or its concurrency limit full is re-queued with a
countdown that doubles with each re-queue of that message (counted in its
``rediskit_requeues`` header), up to a ceiling, with jitter so that tasks blocked together
do not come back together. A task with Celery's own retry options set (``retry_backoff``,
``retry_backoff_max``, ``retry_jitter``) is re-queued by those; others by the app's
``rediskit_retry_delay`` (the first countdown) and ``rediskit_retry_delay_max``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

__all__ = ["requeue_countdown"]

_CELERY_BACKOFF_MAX = 600.0  # Celery's default retry_backoff_max, seconds


def requeue_countdown(
    task: Any,
    requeues: int,
    *,
    first: float,
    ceiling: float,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds before the next attempt of ``task``, already re-queued ``requeues`` times.

    Without the task's own ``retry_backoff``: ``min(ceiling, first * 2**requeues)``, the
    upper half of it jittered (so a countdown is never below half its step). With
    ``retry_backoff`` (True = 1 s, or a number of seconds): Celery's steps
    ``retry_backoff * 2**requeues`` up to ``retry_backoff_max`` (default 600 s), jittered the
    same way unless ``retry_jitter`` is False.
    """
    backoff = getattr(task, "retry_backoff", None)
    jitter = True
    if backoff:
        first = 1.0 if backoff is True else float(backoff)
        ceiling = float(getattr(task, "retry_backoff_max", None) or _CELERY_BACKOFF_MAX)
        jitter = bool(getattr(task, "retry_jitter", True))
    step = min(ceiling, first * 2.0 ** min(max(requeues, 0), 40))
    if not jitter:
        return step
    return step / 2 + rand() * step / 2
