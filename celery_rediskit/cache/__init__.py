"""The cache: providers (memory, Redis) and memoised functions. Knows nothing of Celery."""

from __future__ import annotations

from .breaker import CircuitBreaker
from .durations import parse_duration
from .encoding import UnencodableArgument, cache_key_for, encode_value
from .memo import (
    DEFAULT_LEASE,
    DEFAULT_TTL,
    DEFAULT_WAIT,
    AsyncCachedFunction,
    CacheContextError,
    CachedFunction,
    cache_life,
    cache_tag,
    cached,
    compute_cached,
    revalidate_tag,
)
from .provider import (
    MISSING,
    CacheProvider,
    CacheUnavailable,
    Claim,
    MemoryCacheProvider,
    get_cache_provider,
    set_cache_provider,
)
from .redis_provider import RedisCacheProvider
from .serializers import Serializer

__all__ = [
    "DEFAULT_LEASE",
    "DEFAULT_TTL",
    "DEFAULT_WAIT",
    "MISSING",
    "AsyncCachedFunction",
    "CacheContextError",
    "CacheProvider",
    "CacheUnavailable",
    "CachedFunction",
    "CircuitBreaker",
    "Claim",
    "MemoryCacheProvider",
    "RedisCacheProvider",
    "Serializer",
    "UnencodableArgument",
    "cache_key_for",
    "cache_life",
    "cache_tag",
    "cached",
    "compute_cached",
    "encode_value",
    "get_cache_provider",
    "parse_duration",
    "revalidate_tag",
    "set_cache_provider",
]
