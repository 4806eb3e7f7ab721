"""celery-rediskit: distributed concurrency control for Celery on Redis.

The primitives here (mutex, semaphore, cache, lease renewal, wake-ups) know nothing of Celery;
``celery_rediskit.integration`` composes them for Celery apps.
"""

from __future__ import annotations

from .cache import (
    MISSING,
    CachedFunction,
    CacheProvider,
    CacheUnavailable,
    MemoryCacheProvider,
    RedisCacheProvider,
    cache_key_for,
    cache_life,
    cache_tag,
    cached,
    compute_cached,
    get_cache_provider,
    revalidate_tag,
    set_cache_provider,
)
from .errors import (
    AcquireAborted,
    CacheError,
    ConfigurationError,
    LeaseLost,
    LockError,
    LockTimeout,
    RedisKitError,
    SerializationError,
)
from .keys import KeySpace
from .lease import Lease
from .mutex import LockInfo, Mutex, MutexLease, MutexStorage, create_mutex
from .mutex_memory import MemoryMutexStorage
from .mutex_redis import RedisMutexStorage
from .semaphore import Permit, Semaphore, SemaphoreInfo, SemaphoreStorage, create_semaphore
from .semaphore_memory import MemorySemaphoreStorage
from .semaphore_redis import RedisSemaphoreStorage

__version__ = "0.1.0"

__all__ = [
    "AcquireAborted",
    "CacheError",
    "ConfigurationError",
    "KeySpace",
    "Lease",
    "LeaseLost",
    "LockError",
    "LockInfo",
    "LockTimeout",
    "MemoryMutexStorage",
    "MemorySemaphoreStorage",
    "Mutex",
    "MutexLease",
    "MutexStorage",
    "Permit",
    "RedisKitError",
    "RedisMutexStorage",
    "RedisSemaphoreStorage",
    "Semaphore",
    "SemaphoreInfo",
    "SemaphoreStorage",
    "SerializationError",
    "create_mutex",
    "create_semaphore",
    "MISSING",
    "CacheProvider",
    "CachedFunction",
    "CacheUnavailable",
    "MemoryCacheProvider",
    "RedisCacheProvider",
    "cache_key_for",
    "cache_life",
    "cache_tag",
    "cached",
    "compute_cached",
    "get_cache_provider",
    "revalidate_tag",
    "set_cache_provider",
]
