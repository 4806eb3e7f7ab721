"""The process-wide renewer: leases stay alive while held, one round trip renews many, and a
lease that can't be renewed is reported lost, never re-created."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import redis

from celery_rediskit import (
    MemoryMutexStorage,
    MutexStorage,
    RedisMutexStorage,
    RedisSemaphoreStorage,
    create_mutex,
    create_semaphore,
)
from celery_rediskit.renewal import renewer
from tests.conftest import storage_fixtures

storage, _ = storage_fixtures(MemoryMutexStorage, RedisMutexStorage)

pytestmark = pytest.mark.usefixtures("no_stray_leases")


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


def test_one_round_trip_renews_every_held_lease_of_a_client(redis_url: str, prefix: str) -> None:
    c, trips = round_trip_client(redis_url)
    mutex = create_mutex(lease=30, storage=RedisMutexStorage(c, prefix=prefix))
    semaphore = create_semaphore(permits=2, lease=30,
                                 storage=RedisSemaphoreStorage(c, prefix=prefix))
    leases = [mutex.acquire(f"res{i}") for i in range(5)] + [semaphore.acquire("pool")]
    renewer().renew_now(leases[:1])  # opens the renewal connection, loads the script
    trips.clear()
    renewer().renew_now(leases)
    assert trips == [["EVALSHA"]], "locks and permits of one client: one script, one trip"
    assert all(lease.ttl() > 29 and not lease.lost for lease in leases)
    for lease in leases:
        lease.release()


def test_a_big_batch_is_split_into_scripts_of_a_few_hundred_sent_in_one_round_trip(
    redis_url: str, prefix: str
) -> None:
    c, trips = round_trip_client(redis_url)
    mutex = create_mutex(lease=30, storage=RedisMutexStorage(c, prefix=prefix))
    count = 1000
    leases = [mutex.acquire(f"res{i}", auto_renew=False) for i in range(count)]
    renewer().renew_now(leases[:1])
    trips.clear()
    renewer().renew_now(leases)
    # Redis runs one script at a time: one script over 1,000 keys would stall every other
    # client of the server for milliseconds. At most 300 leases a script, all in one trip.
    assert len(trips) == 1, trips
    assert set(trips[0]) == {"EVALSHA"} and len(trips[0]) >= -(-count // 300), trips
    assert not any(lease.lost for lease in leases)
    assert min(c.pttl(f"{prefix}:lock:{{res{i}}}") for i in range(0, count, 50)) > 29_000
    for lease in leases:
        lease.release()


def test_auto_renew_keeps_a_lease_alive_past_its_length(storage: MutexStorage) -> None:
    mutex = create_mutex(lease=0.4, storage=storage)
    with mutex.lock("res") as lease:
        time.sleep(1.3)  # three lease lengths: only renewal keeps it
        assert not lease.lost
        assert storage.get_lock_info("res").holder == lease.owner
    assert not storage.is_locked("res")


def test_a_lease_taken_away_is_reported_lost_and_never_recreated(storage: MutexStorage) -> None:
    lost = threading.Event()
    reasons: list[str] = []

    def on_lost(lease: object, reason: str) -> None:
        reasons.append(reason)
        lost.set()

    mutex = create_mutex(lease=5, storage=storage, on_lost=on_lost)
    lease = mutex.acquire("res")
    storage.force_release("res")
    renewer().renew_now([lease])
    assert lost.wait(5) and lease.lost and reasons
    assert not storage.is_locked("res"), "renewal must not re-create a lost lock"
    assert lease.release() is False


def test_an_outage_marks_held_leases_lost_and_new_locks_work_after_it(
    private_server: object, prefix: str
) -> None:
    server = private_server
    c = redis.Redis.from_url(server.url, socket_connect_timeout=0.2)  # type: ignore[attr-defined]
    lost = threading.Event()
    mutex = create_mutex(lease=0.6, storage=RedisMutexStorage(c, prefix=prefix),
                         on_lost=lambda lease, reason: lost.set())
    lease = mutex.acquire("res")
    server.stop()  # type: ignore[attr-defined]
    assert lost.wait(5), "a lease that can't be renewed must be reported lost"
    assert lease.lost
    server.start()  # type: ignore[attr-defined]
    with mutex.lock("res", timeout=5) as again:
        assert again.fencing_token >= 1 and not again.lost

