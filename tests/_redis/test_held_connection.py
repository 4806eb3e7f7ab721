"""The lean command path keeps one connection per thread checked out of the client's pool:
consecutive calls of a thread cost no pool checkout (the pool's lock, bookkeeping and a poll
of the socket), a thread that ends gives its connection back, another client's call swaps it,
and a forked child never uses its parent's connection."""

from __future__ import annotations

import multiprocessing
import threading
from typing import Any

import redis

from celery_rediskit._redis.scripts import call, call_many


class CountingPool(redis.ConnectionPool):
    """A real pool that counts checkouts."""

    checkouts = 0

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        self.checkouts += 1
        return super().get_connection(*args, **kwargs)


def _client(url: str) -> tuple[redis.Redis, CountingPool]:
    pool = CountingPool.from_url(url)
    return redis.Redis(connection_pool=pool), pool


def test_a_threads_calls_reuse_one_connection_without_a_checkout(redis_url: str,
                                                                 prefix: str) -> None:
    client, pool = _client(redis_url)
    call(client, "SET", f"{prefix}:k", "v")
    before = pool.checkouts
    for _ in range(50):
        assert call(client, "GET", f"{prefix}:k") == b"v"
        assert call_many(client, ("GET", f"{prefix}:k"), ("EXISTS", f"{prefix}:k")) == [b"v", 1]
    assert pool.checkouts == before, "no checkout after the first call"
    client.delete(f"{prefix}:k")
    client.close()


def test_a_thread_that_ends_gives_its_connection_back(redis_url: str) -> None:
    client, pool = _client(redis_url)

    def work() -> None:
        for _ in range(3):
            call(client, "PING")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert pool.checkouts >= 4
    assert not pool._in_use_connections, "every ended thread's connection is back in the pool"
    assert len(pool._available_connections) >= 1
    client.close()


def test_another_clients_call_gives_the_first_connection_back(redis_url: str) -> None:
    first, first_pool = _client(redis_url)
    second, _ = _client(redis_url)
    call(first, "PING")
    assert len(first_pool._in_use_connections) == 1  # kept for this thread's next call
    call(second, "PING")
    assert not first_pool._in_use_connections  # swapped: the first one is back
    first.close()
    second.close()


def test_a_forked_child_never_uses_its_parents_connection(redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    key = f"{prefix}:n"
    assert call(client, "INCR", key) == 1  # this thread now holds a connection
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    # The child uses the same client object (as a prefork pool child does): its own socket.
    child = ctx.Process(target=lambda: out.put(call(client, "INCR", key)))
    child.start()
    assert out.get(timeout=30) == 2
    child.join(30)
    assert child.exitcode == 0
    assert call(client, "INCR", key) == 3, "the parent's connection still works"
    client.delete(key)
    client.close()


def test_the_first_calls_after_a_server_restart_succeed(private_server: Any) -> None:
    """A kept connection that the server closed (a restart) is not used as it is: the next
    call of the thread, one command or several, reconnects instead of failing once."""
    client = redis.Redis.from_url(private_server.url)
    assert call_many(client, ("SET", "k", "v"), ("GET", "k")) == [b"OK", b"v"]
    private_server.restart()
    assert call_many(client, ("SET", "k", "w"), ("GET", "k")) == [b"OK", b"w"]
    private_server.restart()
    assert call(client, "GET", "k") is None  # no persistence: the key went with the restart
    client.close()
