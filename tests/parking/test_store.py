"""The parking primitive on a real Redis: FIFO by turn, atomic acquire-or-park, reservations,
adoption, copies, sweeps and the index (no Celery)."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from celery_rediskit import RedisMutexStorage, RedisSemaphoreStorage
from celery_rediskit._redis.slots import key_slot
from celery_rediskit.parking import (
    DUPLICATE,
    GRANTED,
    NEED_PAYLOAD,
    PARKED,
    Dispatch,
    RedisParkingStore,
    reservation_owner,
)

LEASE = 5.0


@pytest.fixture
def store(client: redis.Redis, prefix: str) -> RedisParkingStore:
    return RedisParkingStore(client, prefix, publish_deadline=0.2, wait_ttl=0.5)


@pytest.fixture
def mutexes(client: redis.Redis, prefix: str) -> RedisMutexStorage:
    return RedisMutexStorage(client, prefix=prefix)


@pytest.fixture
def sems(client: redis.Redis, prefix: str) -> RedisSemaphoreStorage:
    return RedisSemaphoreStorage(client, prefix=prefix)


def park(store: RedisParkingStore, kind: str, name: str, id: str, **kw: Any) -> Any:
    return store.acquire_or_park(kind, name, id, f"own-{id}", LEASE,
                                 payload=f"payload-{id}".encode(), **kw)


def test_lock_free_is_granted_held_parks_fifo(store: RedisParkingStore,
                                              mutexes: RedisMutexStorage) -> None:
    first = park(store, "m", "r", "a")
    assert first.status == GRANTED and first.token >= 1
    assert mutexes.get_lock_info("r").holder == "own-a"
    for i in "bcd":
        assert park(store, "m", "r", i).status == PARKED
    assert [e.id for e in store.entries("m", "r")] == ["b", "c", "d"]
    # nothing free: nothing dispatched
    assert store.dispatch("m", "r", LEASE) == (3, [])
    assert mutexes.release("r", "own-a")
    left, taken = store.dispatch("m", "r", LEASE)
    assert left == 3 and [d.id for d in taken] == ["b"]
    d = taken[0]
    assert d.payload == b"payload-b"
    # the lock is reserved for b: nobody else gets it, not even by acquire-or-park
    assert mutexes.get_lock_info("r").holder == reservation_owner(d.dispatch_id)
    assert park(store, "m", "r", "e").status == PARKED
    token = store.adopt("m", "r", "b", d.dispatch_id, LEASE)
    assert token >= 1 and token == mutexes.get_lock_info("r").fencing_token
    # a second copy of the re-sent message is refused
    assert store.adopt("m", "r", "b", d.dispatch_id, LEASE) == -1
    assert [e.id for e in store.entries("m", "r")] == ["c", "d", "e"]


def test_ask_without_payload_parks_nothing(store: RedisParkingStore) -> None:
    assert park(store, "m", "r", "a").status == GRANTED
    out = store.acquire_or_park("m", "r", "b", "own-b", LEASE)
    assert out.status == NEED_PAYLOAD and store.entries("m", "r") == []


def test_same_id_parks_once(store: RedisParkingStore) -> None:
    assert park(store, "m", "r", "a").status == GRANTED
    assert park(store, "m", "r", "b").status == PARKED
    assert park(store, "m", "r", "b").status == DUPLICATE
    assert len(store.entries("m", "r")) == 1


def test_regrant_after_lost_reply(store: RedisParkingStore) -> None:
    first = park(store, "m", "r", "a")
    again = park(store, "m", "r", "a")
    assert (again.status, again.token) == (GRANTED, first.token)


def test_semaphore_dispatches_one_per_free_permit(store: RedisParkingStore,
                                                  sems: RedisSemaphoreStorage) -> None:
    for i in range(2):
        assert park(store, "s", "db", f"h{i}", permits=2).status == GRANTED
    for i in range(5):
        assert park(store, "s", "db", f"p{i}", permits=2).status == PARKED
    assert sems.release("db", "own-h0") and sems.release("db", "own-h1")
    left, taken = store.dispatch("s", "db", LEASE, permits=2)
    assert [d.id for d in taken] == ["p0", "p1"] and left == 5
    info = sems.get_semaphore_info("db")
    assert set(info.holders) == {d.owner for d in taken}
    assert store.adopt("s", "db", "p0", taken[0].dispatch_id, LEASE) == 1


def test_turn_is_kept_and_older_turns_go_first(store: RedisParkingStore,
                                               mutexes: RedisMutexStorage) -> None:
    assert park(store, "m", "r", "holder").status == GRANTED
    assert park(store, "m", "r", "young").status == PARKED
    young_turn = store.entries("m", "r")[0].turn
    # an entry that first parked earlier (elsewhere) goes ahead of it
    assert park(store, "m", "r", "old", turn=young_turn - 1000).status == PARKED
    assert [e.id for e in store.entries("m", "r")] == ["old", "young"]
    assert store.entries("m", "r")[0].turn == young_turn - 1000
    mutexes.release("r", "own-holder")
    # a caller younger than the parked ones does not jump them: the lock goes to "old"
    out = park(store, "m", "r", "new")
    assert out.status == PARKED and [d.id for d in out.dispatched] == ["old"]
    # a caller older than every parked entry takes a free lock at once
    store.adopt("m", "r", "old", out.dispatched[0].dispatch_id, LEASE)
    mutexes.release("r", reservation_owner(out.dispatched[0].dispatch_id))
    oldest = park(store, "m", "r", "oldest", turn=young_turn - 5000)
    assert oldest.status == GRANTED and oldest.dispatched == ()


def test_expired_reservation(store: RedisParkingStore, mutexes: RedisMutexStorage) -> None:
    park(store, "m", "r", "a")
    park(store, "m", "r", "b")
    mutexes.release("r", "own-a")
    _, (d,) = store.dispatch("m", "r", 0.05)
    time.sleep(0.1)  # the reservation's lease (50 ms) runs out: the message waited too long
    assert store.adopt("m", "r", "b", d.dispatch_id, LEASE) == 0
    assert store.entries("m", "r") == []


def test_sweep_resends_unpublished_and_lost(store: RedisParkingStore,
                                            mutexes: RedisMutexStorage) -> None:
    park(store, "m", "r", "a")
    park(store, "m", "r", "b")
    mutexes.release("r", "own-a")
    _, (d,) = store.dispatch("m", "r", LEASE)  # taken; the publisher "dies" here
    published: list[Dispatch] = []

    def publish(x: Dispatch) -> bool:
        published.append(x)
        return True

    assert store.sweep(LEASE, publish) == 0  # before the publish deadline (0.2 s)
    time.sleep(0.25)
    assert store.sweep(LEASE, publish) == 1
    assert published[0].id == "b" and published[0].dispatch_id == d.dispatch_id
    assert [e.state for e in store.entries("m", "r")] == ["sent"]
    time.sleep(0.55)  # published, never adopted past wait_ttl (0.5 s): the message was lost
    assert store.sweep(LEASE, publish) == 1
    assert store.adopt("m", "r", "b", d.dispatch_id, LEASE) >= 1
    assert store.resources() == [("m", "r")]
    mutexes.release("r", d.owner)
    store.sweep(LEASE, publish)
    assert store.resources() == []  # nothing left: unindexed


def test_failed_publish_stays_taken(store: RedisParkingStore, mutexes: RedisMutexStorage) -> None:
    park(store, "m", "r", "a")
    park(store, "m", "r", "b")
    mutexes.release("r", "own-a")

    def down(x: Dispatch) -> bool:
        raise OSError("broker down")

    assert store.sweep(LEASE, down) == 0
    assert [e.state for e in store.entries("m", "r")] == ["taken"]


def test_sweep_dispatches_after_holder_lease_expiry(store: RedisParkingStore) -> None:
    store.acquire_or_park("m", "r", "a", "own-a", 0.1, payload=b"x")  # holder dies
    park(store, "m", "r", "b")
    got: list[str] = []
    store.sweep(LEASE, lambda d: got.append(d.id) or True)
    assert got == []
    time.sleep(0.15)
    store.sweep(LEASE, lambda d: got.append(d.id) or True)
    assert got == ["b"]


def test_remove_gives_back_reservation(store: RedisParkingStore,
                                       mutexes: RedisMutexStorage) -> None:
    park(store, "m", "r", "a")
    park(store, "m", "r", "b")
    park(store, "m", "r", "c")
    assert store.remove("m", "r", ["c", "zzz"]) == ["c"]
    mutexes.release("r", "own-a")
    _, (d,) = store.dispatch("m", "r", LEASE)
    assert store.remove("m", "r", ["b"]) == ["b"]
    assert not mutexes.is_locked("r")
    assert store.adopt("m", "r", "b", d.dispatch_id, LEASE) == -1


def test_seen_and_counts(store: RedisParkingStore) -> None:
    park(store, "s", "db", "a", permits=1)
    park(store, "s", "db", "b", permits=1, message_id="b:0:0")
    assert store.seen("s", "db", "b:0:0") and not store.seen("s", "db", "a:0:0")
    assert store.counts([("s", "db"), ("m", "db")]) == [(1, 0), (0, 0)]


def test_keys_expire_and_share_the_resource_slot(store: RedisParkingStore,
                                                 client: redis.Redis) -> None:
    park(store, "m", "r", "a")
    park(store, "m", "r", "b")
    keys = store.key_list("m", "r")
    assert len({key_slot(k) for k in keys}) == 1
    for k in keys[2:4] + keys[5:]:
        assert client.pttl(k) > 0, k
    skeys = store.key_list("s", "r")
    assert len({key_slot(k) for k in skeys}) == 1
