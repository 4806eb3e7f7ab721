from __future__ import annotations

from celery_rediskit import MemoryMutexStorage, RedisMutexStorage
from tests.conftest import storage_fixtures

storage, redis_storage = storage_fixtures(MemoryMutexStorage, RedisMutexStorage)
