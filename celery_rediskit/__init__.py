"""celery-rediskit: distributed concurrency control for Celery on Redis.

The primitives here (mutex, semaphore, rate limiter, cache, lease renewal, wake-ups) know
nothing of Celery; ``celery_rediskit.integration`` composes them for Celery apps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._redis.keys import KeySpace
from ._redis.scripts import trace_commands
from .errors import (
    AcquireAborted,
    CacheError,
    ConfigurationError,
    LeaseLost,
    LockError,
    LockTimeout,
    RateLimited,
    RedisKitError,
    SerializationError,
)
from .lease import Lease, LeaseKind
from .mutex import (
    LockInfo,
    MemoryMutexStorage,
    Mutex,
    MutexLease,
    MutexStorage,
    create_mutex,
)
from .mutex.redis import RedisMutexStorage
from .ratelimit import (
    MemoryRateLimitStorage,
    RateInfo,
    RateLimiter,
    RateLimitStorage,
    create_rate_limiter,
)
from .ratelimit.redis import RedisRateLimitStorage
from .semaphore import (
    MemorySemaphoreStorage,
    Permit,
    Semaphore,
    SemaphoreInfo,
    SemaphoreStorage,
    create_semaphore,
)
from .semaphore.redis import RedisSemaphoreStorage

if TYPE_CHECKING:
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

# The cache (its serializers, encoders and providers) is imported at the first use of one of
# its names here, not with the package: a process that only takes locks never loads it.
_FROM_CACHE = frozenset({
    "MISSING", "CachedFunction", "CacheProvider", "CacheUnavailable", "MemoryCacheProvider",
    "RedisCacheProvider", "cache_key_for", "cache_life", "cache_tag", "cached",
    "compute_cached", "get_cache_provider", "revalidate_tag", "set_cache_provider",
})


def __getattr__(name: str) -> Any:
    if name in _FROM_CACHE:
        from . import cache

        value = getattr(cache, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_FROM_CACHE})

__version__ = "0.1.0"

__all__ = [
    "AcquireAborted",
    "CacheError",
    "ConfigurationError",
    "KeySpace",
    "Lease",
    "LeaseKind",
    "LeaseLost",
    "LockError",
    "LockInfo",
    "LockTimeout",
    "MemoryMutexStorage",
    "MemoryRateLimitStorage",
    "MemorySemaphoreStorage",
    "Mutex",
    "MutexLease",
    "MutexStorage",
    "Permit",
    "RateInfo",
    "RateLimitStorage",
    "RateLimited",
    "RateLimiter",
    "RedisKitError",
    "RedisMutexStorage",
    "RedisRateLimitStorage",
    "RedisSemaphoreStorage",
    "Semaphore",
    "SemaphoreInfo",
    "SemaphoreStorage",
    "SerializationError",
    "create_mutex",
    "create_rate_limiter",
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
    "trace_commands",
]
