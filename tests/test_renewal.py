"""The process-wide renewer: leases stay alive while held, one round trip renews many, and a
lease that can't be renewed is reported lost, never re-created."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from celery_rediskit import MemoryMutexStorage, MutexStorage, RedisMutexStorage, create_mutex
from celery_rediskit.renewal import renewer
from tests.conftest import storage_fixtures
from tests.roundtrips import counting_client

storage, _ = storage_fixtures(MemoryMutexStorage, RedisMutexStorage)

pytestmark = pytest.mark.usefixtures("no_stray_leases")


def test_one_round_trip_renews_every_held_lease(redis_url: str, prefix: str) -> None:
    c, sent = counting_client(redis_url)
    mutex = create_mutex(lease=30, storage=RedisMutexStorage(c, prefix=prefix))
    leases = [mutex.acquire(f"res{i}") for i in range(5)]
    renewer().renew_now(leases[:1])  # loads the script on this server
    sent.clear()
    renewer().renew_now(leases)
    assert sent == ["EVALSHA"]
    assert all(lease.ttl() > 29 and not lease.lost for lease in leases)
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

