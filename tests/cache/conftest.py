"""Fixtures of the cache tests: a Redis provider under the test's prefix."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from celery_rediskit.cache import (
    CacheProvider,
    RedisCacheProvider,
    get_cache_provider,
    set_cache_provider,
)


@pytest.fixture
def provider(client: redis.Redis, prefix: str) -> RedisCacheProvider:
    return RedisCacheProvider(client, prefix=prefix)


@pytest.fixture
def global_provider(provider: RedisCacheProvider) -> Iterator[RedisCacheProvider]:
    """``provider`` installed as the process-wide provider for the test."""
    before: CacheProvider = get_cache_provider()
    set_cache_provider(provider)
    yield provider
    set_cache_provider(before)
