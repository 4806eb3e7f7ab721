from __future__ import annotations

from celery_rediskit import MemoryRateLimitStorage, RedisRateLimitStorage
from tests.conftest import storage_fixtures

storage, redis_storage = storage_fixtures(MemoryRateLimitStorage, RedisRateLimitStorage)
