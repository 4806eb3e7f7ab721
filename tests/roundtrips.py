"""Counting round trips on a real connection: every command a client sends is recorded."""

from __future__ import annotations

from typing import Any

import redis


class CountingConnection(redis.Connection):
    """A real connection that records the name of each command it sends."""

    sent: list[str] = []  # replaced per client by counting_client()

    def send_command(self, *args: Any, **kwargs: Any) -> None:
        self.sent.append(str(args[0]).upper())
        super().send_command(*args, **kwargs)


def counting_client(url: str) -> tuple[redis.Redis, list[str]]:
    """A client on ``url`` and the live list of commands sent through its pool."""
    sent: list[str] = []
    connection_class = type("Counting", (CountingConnection,), {"sent": sent})
    pool = redis.ConnectionPool.from_url(url, connection_class=connection_class)
    return redis.Redis(connection_pool=pool), sent
