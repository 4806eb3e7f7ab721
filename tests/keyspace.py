"""The keyspace events a server publishes while something runs, in the order it ran them."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis


def keyspace_events(client: redis.Redis, act: Callable[[], Any], until: bytes,
                    timeout: float = 20.0) -> list[tuple[bytes, bytes]]:
    """The (key, event) pairs the server publishes while ``act()`` runs, in the order it ran
    them, up to the first ``until`` event of a result key (``celery-task-meta-*``)."""
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.psubscribe("__keyspace@*__:*")
        pubsub.get_message(timeout=1.0)  # the subscription's confirmation
        act()
        events: list[tuple[bytes, bytes]] = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = pubsub.get_message(timeout=left)
            if message is None:
                continue
            key = message["channel"].split(b":", 1)[1]
            events.append((key, message["data"]))
            if key.startswith(b"celery-task-meta-") and message["data"] == until:
                return events
        raise AssertionError(f"no {until!r} of a result key in {events}")
    finally:
        pubsub.close()
