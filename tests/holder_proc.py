"""A child process for the primitives' tests: it holds a lock or permit, or contends for one.

URL may be ``cluster+redis://host:port`` for a Redis Cluster client.

    python holder_proc.py hold KIND URL PREFIX KEY LEASE PERMITS
        acquires, prints "HELD <token>", then obeys stdin lines: "release" (prints
        "RELEASED <True|False> lost=<True|False>"), "exit".
    python holder_proc.py wait KIND URL PREFIX KEY LEASE PERMITS HOLDUP OTHER
        through a client that hands every wake-up message to its reader HOLDUP seconds after
        it arrived: first a thread waits for OTHER (so that thread reads the wake-up
        connection); at the stdin line "go" the main thread acquires KEY (waiting up to 30 s),
        prints "GOT <time.monotonic()>" once granted, then obeys stdin like ``hold``.
    python holder_proc.py contend KIND URL PREFIX KEY PERMITS ROUNDS
        acquires ROUNDS times; inside each hold it INCRs a Redis counter and records the
        value it saw (the number of holders at once) and the fencing token; prints JSON.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import redis
from redis.cluster import RedisCluster

from celery_rediskit import (
    RedisMutexStorage,
    RedisSemaphoreStorage,
    create_mutex,
    create_semaphore,
)


def connect(url: str) -> redis.Redis | RedisCluster:
    """A client of ``url``; ``cluster+redis://host:port`` is a Redis Cluster (tests only)."""
    if url.startswith("cluster+"):
        return RedisCluster.from_url(url[len("cluster+"):])
    return redis.Redis.from_url(url)


def make(kind: str, url: str, prefix: str, lease: float, permits: int):  # type: ignore[no-untyped-def]
    client = connect(url)
    if kind == "mutex":
        storage = RedisMutexStorage(client, prefix)
        return client, create_mutex(timeout=30, lease=lease, storage=storage)
    return client, create_semaphore(
        permits=permits, timeout=30, lease=lease, storage=RedisSemaphoreStorage(client, prefix)
    )


def hold(kind: str, url: str, prefix: str, key: str, lease: str, permits: str) -> None:
    _, granter = make(kind, url, prefix, float(lease), int(permits))
    held = granter.acquire(key)
    print(f"HELD {held.fencing_token}", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "release":
            ok = held.release()
            print(f"RELEASED {ok} lost={held.lost}", flush=True)
        elif command == "exit":
            return


class _HeldUpConnection(redis.Connection):
    """A real connection that hands each pub/sub message to its reader ``holdup`` seconds
    after it arrived: a wake-up link slower than the command link."""

    holdup = 0.0

    def read_response(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        reply = super().read_response(*args, **kwargs)
        if isinstance(reply, list) and reply and reply[0] in (b"message", b"smessage"):
            time.sleep(self.holdup)
        return reply


def wait(kind: str, url: str, prefix: str, key: str, lease: str, permits: str,
         holdup: str, other: str) -> None:
    _HeldUpConnection.holdup = float(holdup)
    client = redis.Redis(connection_pool=redis.ConnectionPool.from_url(
        url, connection_class=_HeldUpConnection))
    if kind == "mutex":
        granter = create_mutex(timeout=30, lease=float(lease),
                               storage=RedisMutexStorage(client, prefix))
    else:
        granter = create_semaphore(permits=int(permits), timeout=30, lease=float(lease),
                                   storage=RedisSemaphoreStorage(client, prefix))
    threading.Thread(target=lambda: granter.acquire(other, timeout=60), daemon=True).start()
    sys.stdin.readline()  # "go"
    held = granter.acquire(key)
    print(f"GOT {time.monotonic()}", flush=True)
    for line in sys.stdin:
        if line.strip() == "release":
            print(f"RELEASED {held.release()} lost={held.lost}", flush=True)
        elif line.strip() == "exit":
            return


def contend(kind: str, url: str, prefix: str, key: str, permits: str, rounds: str) -> None:
    client, granter = make(kind, url, prefix, 10.0, int(permits))
    counter = f"{prefix}:test:inside"
    seen, tokens, waits = [], [], []
    for _ in range(int(rounds)):
        started = time.monotonic()
        held = granter.acquire(key)
        try:
            waits.append(time.monotonic() - started)
            seen.append(int(client.incr(counter)))
            tokens.append(held.fencing_token)
            time.sleep(0.001)  # the work being protected
            client.decr(counter)
        finally:
            held.release()
    print(json.dumps({"seen": seen, "tokens": tokens, "waits": waits}), flush=True)


if __name__ == "__main__":
    {"hold": hold, "wait": wait, "contend": contend}[sys.argv[1]](*sys.argv[2:])
