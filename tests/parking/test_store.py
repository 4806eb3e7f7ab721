"""The parking primitive on a real Redis: FIFO by turn, atomic acquire-or-park, reservations,
adoption, copies, sweeps and the index (no Celery)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from celery_rediskit import RedisMutexStorage, RedisSemaphoreStorage
from celery_rediskit._redis.slots import key_slot
from celery_rediskit.lease import Grant
from celery_rediskit.mutex import MutexLease
from celery_rediskit.parking import (
    AHEAD_LEFT,
    DUPLICATE,
    GRANTED,
    NEED_PAYLOAD,
    PARKED,
    Dispatch,
    RedisParkingStore,
    reservation_owner,
)
from celery_rediskit.semaphore import Permit
from tests.late_replies import AnyLateReply, LateReplies, late_replies_client

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


@pytest.fixture
def late_store(redis_server: Any, redis_url: str, prefix: str) -> Iterator[RedisParkingStore]:
    client = late_replies_client(redis_url, AnyLateReply)  # acquire_or_park's reply is a list
    yield RedisParkingStore(client, prefix)
    LateReplies.late = 0.0
    client.close()


@pytest.mark.parametrize("kind", ["m", "s"])
@pytest.mark.parametrize("payload", [None, b"payload"])
def test_a_grant_counts_from_its_request(late_store: RedisParkingStore, kind: str,
                                         payload: bytes | None) -> None:
    """What acquire-or-park grants is a ``Grant`` dated from when its request was sent, not
    from its reply (the lease a run takes from a park counts from there): with or without a
    payload (one round trip, or the script and the index in one)."""
    late_store.acquire_or_park(kind, "warm", "w", "own-w", LEASE, payload=payload)
    LateReplies.late = 0.3
    sent = time.monotonic()
    out = late_store.acquire_or_park(kind, "r", "a", "own-a", LEASE, payload=payload)
    returned = time.monotonic()
    LateReplies.late = 0.0
    assert out.status == GRANTED and isinstance(out.token, Grant)
    assert out.token == 1 or kind == "m"
    assert returned - sent >= 0.3
    assert sent <= out.token.since <= sent + 0.05, "since is when the request was sent"
    lease = (MutexLease if kind == "m" else Permit)(
        RedisMutexStorage(late_store.client) if kind == "m"
        else RedisSemaphoreStorage(late_store.client), "r", "own-a", LEASE,
        fencing_token=out.token)
    assert lease.last_renewed == out.token.since  # what a run's lease counts from


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
    store.dispatch("m", "r", LEASE, ahead=True)  # b is sent ahead: the ahead key exists
    for k in keys[2:4] + keys[5:]:
        assert client.pttl(k) > 0, k
    skeys = store.key_list("s", "r")
    assert len({key_slot(k) for k in skeys}) == 1


class Waiting(threading.Thread):
    """``store.adopt(..., wait=...)`` in a thread (a message sent ahead, waiting in a worker):
    ``result`` and when it returned."""

    def __init__(self, store: RedisParkingStore, kind: str, name: str, d: Dispatch,
                 wait: float = 10.0) -> None:
        super().__init__(daemon=True)
        self.args_ = (store, kind, name, d, wait)
        self.result: int | None = None
        self.returned = 0.0

    def run(self) -> None:
        store, kind, name, d, wait = self.args_
        self.result = store.adopt(kind, name, d.id, d.dispatch_id, LEASE, wait=wait)
        self.returned = time.monotonic()


def wait_until(what: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def ahead_waiter(store: RedisParkingStore, kind: str, name: str, id: str) -> str:
    raw = store.client.hget(store.key_list(kind, name)[6], id)
    return raw.decode().split("|")[4] if raw else ""


def send_ahead(store: RedisParkingStore, parked: str) -> list[Dispatch]:
    """``a`` holds the lock ``r``, each of ``parked`` (one id a letter) parks behind it in
    turn, and the first of them is sent ahead (taken, marked sent): its dispatch."""
    assert park(store, "m", "r", "a").status == GRANTED
    for i in parked:
        assert park(store, "m", "r", i).status == PARKED
    _, taken = store.dispatch("m", "r", LEASE, ahead=True)
    assert [d.id for d in taken] == [parked[0]]
    store.mark_sent(taken)
    return taken


def start_waiting(store: RedisParkingStore, d: Dispatch) -> Waiting:
    """``d``'s message, sent ahead, waiting in a worker (its mark set when this returns)."""
    waiting = Waiting(store, "m", "r", d)
    waiting.start()
    wait_until(lambda: ahead_waiter(store, "m", "r", d.id) != "")
    return waiting


def test_sent_ahead_waits_and_is_woken_by_the_release(store: RedisParkingStore,
                                                      mutexes: RedisMutexStorage) -> None:
    assert park(store, "m", "r", "a").status == GRANTED
    for i in "bcd":
        assert park(store, "m", "r", i).status == PARKED
    # the lock is held: b goes ahead (no reservation), once: one per permit
    left, taken = store.dispatch("m", "r", LEASE, ahead=True)
    assert left == 3 and [d.id for d in taken] == ["b"]
    assert mutexes.get_lock_info("r").holder == "own-a"
    assert store.dispatch("m", "r", LEASE, ahead=True) == (3, [])
    assert [(e.id, e.state) for e in store.entries("m", "r")] == [
        ("b", "ahead"), ("c", "parked"), ("d", "parked")]
    store.mark_sent(taken)
    waiting = start_waiting(store, taken[0])
    assert waiting.result is None
    # the release: the lock goes to b's dispatch id, b is woken (nothing published for b),
    # and c goes ahead in its place
    assert mutexes.release("r", "own-a")
    released = time.monotonic()
    left, taken2 = store.dispatch("m", "r", LEASE, ahead=True)
    assert [d.id for d in taken2] == ["c"]
    waiting.join(5)
    assert waiting.result is not None and waiting.result >= 1
    assert waiting.returned - released < 0.5  # woken, not found at its next check-in (1 s)
    info = mutexes.get_lock_info("r")
    assert info.holder == reservation_owner(taken[0].dispatch_id)
    assert info.fencing_token == waiting.result
    # a copy of b's message is refused
    assert store.adopt("m", "r", "b", taken[0].dispatch_id, LEASE, wait=1) == -1
    assert [(e.id, e.state) for e in store.entries("m", "r")] == [
        ("c", "ahead"), ("d", "parked")]


def test_sent_ahead_one_per_permit_and_turns_kept(store: RedisParkingStore,
                                                  sems: RedisSemaphoreStorage) -> None:
    for i in range(2):
        assert park(store, "s", "db", f"h{i}", permits=2).status == GRANTED
    for i in range(4):
        assert park(store, "s", "db", f"p{i}", permits=2).status == PARKED
    _, taken = store.dispatch("s", "db", LEASE, permits=2, ahead=True)
    assert [d.id for d in taken] == ["p0", "p1"]
    store.mark_sent(taken)
    assert store.dispatch("s", "db", LEASE, permits=2, ahead=True)[1] == []
    # an older turn parks after them: it goes first when a permit frees, sent the usual way
    turn = store.entries("s", "db")[0].turn
    assert park(store, "s", "db", "old", permits=2, turn=turn - 1000).status == PARKED
    assert sems.release("db", "own-h0")
    _, taken2 = store.dispatch("s", "db", LEASE, permits=2, ahead=True)
    assert [d.id for d in taken2] == ["old"]
    assert reservation_owner(taken2[0].dispatch_id) in sems.get_semaphore_info("db").holders
    # the next release goes to p0, which was sent ahead: it is not sent again (p2 goes
    # ahead in its place)
    assert sems.release("db", "own-h1")
    left, taken3 = store.dispatch("s", "db", LEASE, permits=2, ahead=True)
    assert [d.id for d in taken3] == ["p2"] and left == 5
    assert store.adopt("s", "db", "p0", taken[0].dispatch_id, LEASE, wait=1) == 1


def test_sent_ahead_gives_up_and_keeps_its_turn(store: RedisParkingStore,
                                                mutexes: RedisMutexStorage) -> None:
    taken = send_ahead(store, "bc")
    assert store.adopt("m", "r", "b", taken[0].dispatch_id, LEASE, wait=0.2) == AHEAD_LEFT
    assert [(e.id, e.state) for e in store.entries("m", "r")] == [
        ("b", "parked"), ("c", "parked")]
    # its turn comes: it is sent again the usual way, and the old message is a copy
    mutexes.release("r", "own-a")
    _, again = store.dispatch("m", "r", LEASE)
    assert [d.id for d in again] == ["b"] and again[0].dispatch_id != taken[0].dispatch_id
    assert store.adopt("m", "r", "b", taken[0].dispatch_id, LEASE, wait=1) == -1
    assert store.adopt("m", "r", "b", again[0].dispatch_id, LEASE) >= 1


def test_sweep_drops_the_mark_of_a_dead_waiter(store: RedisParkingStore,
                                               mutexes: RedisMutexStorage) -> None:
    """A waiter that stops checking in (its process died) loses its mark; one that died after
    the release reserved the lock for it has its message re-sent by a sweep."""
    taken = send_ahead(store, "bc")
    keys = store.key_list("m", "r")
    did = taken[0].dispatch_id

    def register(gone_ms: int) -> int:  # what a waiter's check-in does, then it "dies"
        return int(store._adopt.run(store.client, keys, ["m", "b", did, 5000, "wait",
                                                         "proc:park:" + did, gone_ms]))

    assert register(100) == -2
    time.sleep(0.2)
    store.dispatch("m", "r", LEASE, sweep=True)
    assert store.entries("m", "r")[0].state == "parked"
    assert store.adopt("m", "r", "b", did, LEASE, wait=1) == -1  # a late copy
    # sent ahead again; the waiter registers, the release reserves the lock for it, and it dies
    _, taken = store.dispatch("m", "r", LEASE, ahead=True)
    store.mark_sent(taken)
    did = taken[0].dispatch_id
    assert register(60_000) == -2
    mutexes.release("r", "own-a")
    assert store.dispatch("m", "r", LEASE)[1] == []
    assert mutexes.get_lock_info("r").holder == reservation_owner(did)
    # the sweep re-sends it (same dispatch id) once its waiter had its time to adopt
    wait_until(lambda: [d.id for d in store.dispatch("m", "r", LEASE, sweep=True)[1]] == ["b"])
    assert store.adopt("m", "r", "b", did, LEASE) >= 1


def test_remove_ends_a_wait_ahead(store: RedisParkingStore) -> None:
    waiting = start_waiting(store, send_ahead(store, "b")[0])
    assert store.remove("m", "r", ["b"]) == ["b"]
    waiting.join(5)
    assert waiting.result == -1 and store.entries("m", "r") == []
