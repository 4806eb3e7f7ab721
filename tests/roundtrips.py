"""Counting round trips on a real connection: every command a client sends is recorded
(:func:`counting_client`), or every write to the server with the commands it carried
(:func:`round_trip_client`; with the thread that sent each, :func:`thread_round_trip_client`,
or :func:`record_round_trips` for a client made elsewhere)."""

from __future__ import annotations

import threading
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


class RoundTripConnection(redis.Connection):
    """A real connection that records each write to the server (one round trip for a
    request-reply client) as the list of command names it carried."""

    trips: list[list[str]] = []  # replaced per client by round_trip_client()

    def send_command(self, *args: Any, **kwargs: Any) -> None:
        self._names = [str(args[0]).upper()]
        super().send_command(*args, **kwargs)

    def pack_commands(self, commands: Any) -> Any:
        self._names = [str(c[0]).upper() for c in commands]
        return super().pack_commands(commands)

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        names, self._names = getattr(self, "_names", []), []
        super().send_packed_command(command, check_health)  # a connect's own trips go first
        self.trips.append(names)


def round_trip_client(url: str) -> tuple[redis.Redis, list[list[str]]]:
    """A client on ``url`` (every connection made from its pool, the renewal's own one too)
    and the live list of its round trips."""
    trips: list[list[str]] = []
    connection_class = type("Trips", (RoundTripConnection,), {"trips": trips})
    pool = redis.ConnectionPool.from_url(url, connection_class=connection_class)
    return redis.Redis(connection_pool=pool), trips


class ThreadRoundTripConnection(RoundTripConnection):
    """As :class:`RoundTripConnection`, each round trip noted with the thread that made it:
    ``thread_trips`` holds (thread ident, command names)."""

    thread_trips: list[tuple[int, list[str]]] = []  # replaced per client

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        names, self._names = getattr(self, "_names", []), []
        redis.Connection.send_packed_command(self, command, check_health)
        self.thread_trips.append((threading.get_ident(), names))


def thread_round_trip_client(url: str) -> tuple[redis.Redis, list[tuple[int, list[str]]]]:
    """A client on ``url`` and the live list of its round trips, each with its thread."""
    trips: list[tuple[int, list[str]]] = []
    connection_class = type("ThreadTrips", (ThreadRoundTripConnection,),
                            {"thread_trips": trips})
    pool = redis.ConnectionPool.from_url(url, connection_class=connection_class)
    return redis.Redis(connection_pool=pool), trips


def record_round_trips(client: redis.Redis, trips: list[tuple[int, list[str]]]) -> None:
    """From now on, append each round trip of ``client`` (a plain client: its pool) to
    ``trips`` as (thread ident, command names), as :func:`thread_round_trip_client` does: its
    pooled connections are closed and its new ones record. For a client made by another
    library (a Celery result backend's), when no connection of its pool is in use."""
    pool = client.connection_pool
    pool.disconnect()
    pool.reset()
    pool.connection_class = type("ThreadTrips", (ThreadRoundTripConnection,),
                                 {"thread_trips": trips})
