"""The cache: providers (memory, Redis) and memoised functions. Knows nothing of Celery."""

from __future__ import annotations

from ..durations import parse_duration
from .base import MISSING, CacheProvider, CacheUnavailable, Claim
from .breaker import CircuitBreaker
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
    get_cache_provider,
    revalidate_tag,
    set_cache_provider,
)
from .memory import MemoryCacheProvider
from .redis import RedisCacheProvider
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
