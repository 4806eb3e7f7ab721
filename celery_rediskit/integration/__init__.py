"""The Celery integration: the only part of celery-rediskit that imports Celery.

``RedisKit(app)`` installs it; then every task of the app accepts ``singleton=``,
``concurrency_limit=``, ``cache_ttl=`` and their companions. ``SingletonTask`` is the
spelled-out base class for singleton tasks.
"""

from __future__ import annotations

from .extension import RedisKit
from .settings import Settings
from .signals import lease_lost
from .task import RedisKitTask, SingletonTask, TaskDuplicated, TaskLocked

__all__ = [
    "RedisKit",
    "RedisKitTask",
    "Settings",
    "SingletonTask",
    "TaskDuplicated",
    "TaskLocked",
    "lease_lost",
]
