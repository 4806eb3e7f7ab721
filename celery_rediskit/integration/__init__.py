"""The Celery integration: the only part of celery-rediskit that imports Celery.

``RedisKit(app)`` installs it; then every task of the app accepts ``singleton=``,
``concurrency_limit=``, ``cache_ttl=`` and their companions. ``SingletonTask`` is the
spelled-out base class for singleton tasks.
"""

from __future__ import annotations

from .extension import RedisKit
from .settings import Settings
from .signals import (
    acquire_timeout,
    cache_hit,
    cache_miss,
    lease_acquired,
    lease_lost,
    lease_released,
    task_duplicate,
    task_requeued,
    task_skipped,
)
from .task import RedisKitTask, SingletonTask, TaskDuplicated, TaskLocked

__all__ = [
    "RedisKit",
    "RedisKitTask",
    "Settings",
    "SingletonTask",
    "TaskDuplicated",
    "TaskLocked",
    "acquire_timeout",
    "cache_hit",
    "cache_miss",
    "lease_acquired",
    "lease_lost",
    "lease_released",
    "task_duplicate",
    "task_requeued",
    "task_skipped",
]
