"""``trace_commands``: with it, the library's commands go through ``Redis.execute_command``
and redis-py pipelines, where tracers (OpenTelemetry's redis instrumentation) wrap them;
without it they take the lean path past them. Seen by a real subclass of ``redis.Redis``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from celery_rediskit import (
    RedisCacheProvider,
    RedisMutexStorage,
    RedisSemaphoreStorage,
    create_mutex,
    create_semaphore,
    trace_commands,
)
from celery_rediskit._redis.scripts import is_traced
from celery_rediskit.report import read_resources

from ..tracing_client import Recording


@pytest.fixture
def recording(redis_url: str) -> Iterator[Recording]:
    c = Recording.from_url(redis_url)
    yield c
    c.close()


def _cycle(client: Recording, prefix: str) -> None:
    mutex = create_mutex(storage=RedisMutexStorage(client, prefix=prefix), lease=30)
    mutex.acquire("job").release()
    sem = create_semaphore(permits=2, storage=RedisSemaphoreStorage(client, prefix=prefix),
                           lease=30)
    sem.acquire("pool").release()
    cache = RedisCacheProvider(client, prefix=prefix)
    cache.set("k", 1, 60)
    assert cache.get("k") == 1


def test_lean_path_bypasses_execute_command(recording: Recording, prefix: str) -> None:
    assert not is_traced(recording)
    _cycle(recording, prefix)
    assert recording.scripts_seen() == set()
    assert not any(cmd == "GET" for _, cmd, _ in recording.seen)


def test_traced_client_sends_through_execute_command(recording: Recording,
                                                     prefix: str) -> None:
    assert trace_commands(recording) is recording and is_traced(recording)
    _cycle(recording, prefix)
    assert {("execute_command", "mutex_acquire"), ("execute_command", "mutex_release"),
            ("execute_command", "sem_acquire"),
            ("execute_command", "sem_release")} <= recording.scripts_seen()
    assert ("execute_command", "GET", f"{prefix}:cache:e:{{cache/k}}") in recording.seen
    # several commands in one round trip: a pipeline
    with create_mutex(storage=RedisMutexStorage(recording, prefix=prefix), lease=30
                      ).acquire("held"):
        assert [r.key for r in read_resources(recording, prefix)] == ["held"]
    assert ("pipeline", "mutex_info") in recording.scripts_seen()
    trace_commands(recording, False)
    recording.seen.clear()
    _cycle(recording, prefix)
    assert recording.scripts_seen() == set()
