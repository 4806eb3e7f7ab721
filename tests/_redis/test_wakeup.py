"""Wake-ups: a release wakes a queued waiter at once, across processes, and a lost wake-up
message never loses the grant."""

from __future__ import annotations

import gc
import os
import threading
import time
from typing import Any

import pytest
import redis

from celery_rediskit import (
    RedisMutexStorage,
    RedisSemaphoreStorage,
    create_mutex,
    create_semaphore,
)
from celery_rediskit._redis import wakeup
from celery_rediskit._redis.keys import KeySpace
from celery_rediskit._redis.release import RECORD_MS, record_key, release_id
from celery_rediskit._redis.scripts import load_script
from celery_rediskit._redis.waiting import WAITER_GRACE_MS
from celery_rediskit.lease import process_id
from tests.interrupts import Background, wait_until


@pytest.fixture
def redis_storage(client: redis.Redis, prefix: str) -> RedisMutexStorage:
    return RedisMutexStorage(client, prefix=prefix)


pytestmark = pytest.mark.usefixtures("no_stray_leases")


def test_release_wakes_a_waiter_at_once_not_at_lease_end(redis_storage: RedisMutexStorage,
                                                         spawn_holder: type, redis_url: str,
                                                         prefix: str) -> None:
    holder = spawn_holder("mutex", redis_url, prefix, "res", "30", "1")
    mutex = create_mutex(timeout=10, storage=redis_storage)
    got: dict[str, float] = {}

    def waiter() -> None:
        with mutex.lock("res"):
            got["at"] = time.monotonic()

    thread = threading.Thread(target=waiter)
    thread.start()
    while not redis_storage.client.llen(redis_storage.keys.lock("res").queue):
        time.sleep(0.005)  # wait until the waiter is queued in Redis
    released_at = time.monotonic()
    assert holder.command("release").startswith("RELEASED True")
    thread.join(5)
    assert got["at"] - released_at < 0.5, "the waiter was not woken by the release"


def test_a_waiter_reading_its_own_grant_does_not_nudge_itself(spawn_holder: type,
                                                             redis_url: str,
                                                             prefix: str) -> None:
    """A single waiter (a prefork child's case) reads the grant of a release in another process
    off the socket itself: it is not also nudged through the hub's pipe (a write on the hand-over
    path, and a spurious wake-up of its next wait)."""
    client = redis.Redis.from_url(redis_url)  # its own hub: the pipe starts empty
    holder = spawn_holder("mutex", redis_url, prefix, "res", "30", "1")
    storage = RedisMutexStorage(client, prefix=prefix)
    mutex = create_mutex(timeout=10, storage=storage)
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.append(mutex.acquire("res")))
    thread.start()
    wait_until(lambda: client.llen(storage.keys.lock("res").queue) == 1)
    assert holder.command("release").startswith("RELEASED True")
    thread.join(5)
    assert got, "the waiter was not granted"
    got[0].release()
    with pytest.raises(BlockingIOError):
        os.read(wakeup.hub_for(client)._nudge_r, 1)


def test_lost_wakeup_costs_at_most_one_bounded_wait(
    redis_storage: RedisMutexStorage, spawn_holder: type, redis_url: str, prefix: str
) -> None:
    """Drop every pub/sub connection while a waiter waits: it still gets the lock."""
    holder = spawn_holder("mutex", redis_url, prefix, "res", "2.0", "1")
    mutex = create_mutex(timeout=15, storage=redis_storage)
    got = threading.Event()

    def waiter() -> None:
        with mutex.lock("res"):
            got.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    while not redis_storage.client.llen(redis_storage.keys.lock("res").queue):
        time.sleep(0.005)
    redis_storage.client.client_kill_filter(_type="pubsub")
    holder.command("release")
    assert got.wait(2.0 + 2.5)
    thread.join()


def test_the_reader_hands_over_to_a_waiter_still_waiting(client: redis.Redis,
                                                         prefix: str) -> None:
    """The thread reading the wake-up connection, once its own grant is read, hands the
    reading to a waiter that still waits: not to one already granted (by the same read, or a
    local hand-over) that is on its way out and would not read. Otherwise the grant of a
    waiter still asleep lies unread until its re-check interval."""
    hub = wakeup.hub_for(client)
    channel_prefix = KeySpace(prefix).wake_channel_prefix
    hub.ensure(channel_prefix)
    channel = channel_prefix + process_id()
    reader_id, waiter_id = f"{process_id()}:handover-1", f"{process_id()}:handover-2"
    reader_slot, waiter_slot = wakeup.register_slot(reader_id), wakeup.register_slot(waiter_id)
    generation = hub.generation
    reader = Background(lambda: hub.wait(reader_slot, 5.0, None, generation))
    reader.start()
    wait_until(lambda: reader_slot.reading is hub)
    waiter = Background(lambda: hub.wait(waiter_slot, 5.0, None, generation))
    waiter.start()
    wait_until(lambda: waiter_slot in hub._waiting)  # it sleeps: the reading is taken
    # Waiters granted and not yet out of hub.wait, at least one met before the sleeping one
    # by the hand-over (a set's order, fixed once they are all in).
    leaving: list[wakeup.WaitSlot] = []
    try:
        while not leaving or min(map(list(hub._waiting).index, leaving)) > list(
                hub._waiting).index(waiter_slot):
            assert len(leaving) < 100
            slot = wakeup.WaitSlot()
            slot.token = 1
            leaving.append(slot)
            hub._waiting.add(slot)
        client.publish(channel, f"{reader_id} 1")
        reader.join(5)
        assert reader_slot.token == 1
        published_at = time.monotonic()
        client.publish(channel, f"{waiter_id} 1")
        waiter.join(10)
        assert waiter_slot.token == 1, "the grant was not read within the wait"
        took = waiter.finished_at - published_at
        assert took < 0.5, f"the grant was read after {took:.2f} s: nobody took over reading"
    finally:
        for slot in leaving:
            hub._waiting.discard(slot)
        wakeup.drop_slot(reader_id)
        wakeup.drop_slot(waiter_id)


def test_a_discarded_client_leaves_no_wakeup_connection_or_pipe(redis_url: str,
                                                                 prefix: str) -> None:
    hubs: list[wakeup.WakeupHub] = []

    def contend_once() -> None:
        c = redis.Redis.from_url(redis_url)
        mutex = create_mutex(timeout=5, storage=RedisMutexStorage(c, prefix))
        held = mutex.acquire("res")
        waiter = threading.Thread(target=lambda: mutex.acquire("res").release())
        waiter.start()
        while not c.llen(f"{prefix}:lock:{{res}}:queue"):
            time.sleep(0.001)  # until the waiter is queued: it opens the pub/sub connection
        held.release()
        waiter.join(5)
        hubs.append(wakeup.hub_for(c))  # the hub holds the client only weakly

    for _ in range(5):
        contend_once()
    gc.collect()
    assert all(hub.closed for hub in hubs), "a hub outlived its client"
    assert not any(hub in (entry[1] for entry in wakeup._state.hubs.values()) for hub in hubs)



# -- a grant learned late still comes with its full lease -------------------------------------

ELSEWHERE = "elsewhere/1/abc"  # a process id nobody listens for: its grants are published


def _queue_as(storage: Any, kind: str, owner: str, lease_ms: int) -> int:
    """Run the acquire script as ``owner`` with "join the queue" set; its reply."""
    if kind == "mutex":
        keys = storage.keys.lock_list("res")
        argv = [owner, lease_ms, "1", WAITER_GRACE_MS, storage.keys.wake_channel_prefix,
                storage.keys.idle_ms]
        return int(load_script("mutex_acquire").run(storage.client, keys, argv))
    keys = storage.keys.semaphore_list("res")
    argv = [owner, lease_ms, "1", WAITER_GRACE_MS, storage.keys.wake_channel_prefix, 1,
            storage.keys.idle_ms]
    return int(load_script("sem_acquire").run(storage.client, keys, argv))


def _remaining_ms(storage: Any, kind: str, owner: str) -> int:
    client = storage.client
    if kind == "mutex":
        lock = storage.keys.lock("res").lock
        assert client.get(lock) == owner.encode()
        return int(client.pttl(lock))
    ends = client.zscore(storage.keys.semaphore("res").holders, owner)
    seconds, micros = client.time()
    return int(ends - (seconds * 1000 + micros // 1000))


def _age_the_grant(storage: Any, kind: str, owner: str, left_ms: int) -> None:
    """Leave ``owner`` only ``left_ms`` of its lease, as if it learned of the grant late."""
    client = storage.client
    if kind == "mutex":
        client.pexpire(storage.keys.lock("res").lock, left_ms)
        return
    seconds, micros = client.time()
    client.zadd(storage.keys.semaphore("res").holders,
                {owner: seconds * 1000 + micros // 1000 + left_ms}, xx=True)


def _storage(kind: str, client: redis.Redis, prefix: str) -> Any:
    if kind == "mutex":
        return RedisMutexStorage(client, prefix=prefix)
    return RedisSemaphoreStorage(client, prefix=prefix)


def _try(storage: Any, kind: str, owner: str, lease: float) -> int:
    if kind == "mutex":
        return int(storage.try_acquire("res", owner, lease))
    return int(storage.try_acquire("res", owner, 1, lease))


@pytest.mark.parametrize("kind", ["mutex", "semaphore"])
def test_asking_again_after_a_grant_renews_it_to_the_full_lease(
    kind: str, client: redis.Redis, prefix: str
) -> None:
    """A waiter that learns of its grant only when it asks Redis again (its message was lost)
    gets the full lease it asked for, not what is left of it."""
    storage = _storage(kind, client, prefix)
    holder, waiter = f"{ELSEWHERE}:1", f"{ELSEWHERE}:2"
    assert _try(storage, kind, holder, 30.0) >= 1
    assert _queue_as(storage, kind, waiter, 6000) <= -1
    assert storage.release("res", holder)  # handed to the waiter; the message goes nowhere
    _age_the_grant(storage, kind, waiter, 60)
    assert _try(storage, kind, waiter, 6.0) >= 1  # "granted earlier by a release"
    left = _remaining_ms(storage, kind, waiter)
    assert left > 5500, f"the already granted path left the lease at {left} ms of 6000"


@pytest.mark.parametrize("kind", ["mutex", "semaphore"])
def test_a_lost_grant_is_learned_within_the_recheck_interval(
    kind: str, client: redis.Redis, prefix: str
) -> None:
    """A wait sleeps at most min(2 s, lease / 3) between looks at Redis, whatever its bound:
    a grant whose message is lost is learned then, not when the holder's lease (30 s) or the
    caller's timeout would have ended, and comes with its full lease."""
    storage = _storage(kind, client, prefix)
    holder = f"{ELSEWHERE}:1"
    assert _try(storage, kind, holder, 30.0) >= 1
    granter = (create_mutex(timeout=8, lease=4.5, storage=storage) if kind == "mutex" else
               create_semaphore(permits=1, timeout=8, lease=4.5, storage=storage))
    waiter = Background(lambda: granter.acquire("res"))
    waiter.start()
    keys = storage.keys.lock("res") if kind == "mutex" else storage.keys.semaphore("res")
    wait_until(lambda: client.hlen(keys.waiters) == 1)
    # The holder's release hands over as usual but publishes where nobody listens.
    if kind == "mutex":
        args = storage.release_argv(holder, "res")
        args[1:3] = ["nowhere:", ELSEWHERE]
        load_script("mutex_release").run(client, storage.release_keys("res"), args)
    else:
        args = [holder, "nowhere:", ELSEWHERE, "drop", release_id(), RECORD_MS]
        keys = storage.keys.semaphore_list("res")
        record = record_key(keys[0].removesuffix(":holders"))
        load_script("sem_release").run(client, [*keys, record], args)
    released_at = time.monotonic()
    waiter.join(15)
    assert waiter.error is None, f"the grant was never learned: {waiter.error!r}"
    took = waiter.finished_at - released_at
    assert took < 1.5 + 1.0, f"the lost grant was learned after {took:.2f} s"
    lease = waiter.result
    try:
        assert lease.ttl() > 4.0
    finally:
        lease.release()


@pytest.mark.parametrize("kind", ["mutex", "semaphore"])
def test_a_release_without_a_record_wakes_a_waiter_of_its_own_process_by_message(
    kind: str, client: redis.Redis, prefix: str
) -> None:
    """``release_call(witness=False)`` (the last release of a worker run, sent inside the
    script storing its result) writes no release record and hands over to a waiter of the
    very process that releases by message, not in its reply: a lost reply cannot lose that
    grant. The waiter gets it at once, well before its bounded wait (the holder's 30 s
    lease) would end; a re-send of the call changes nothing."""
    storage: Any
    if kind == "mutex":
        storage = RedisMutexStorage(client, prefix=prefix)
        granter: Any = create_mutex(timeout=10, lease=30, storage=storage)
    else:
        storage = RedisSemaphoreStorage(client, prefix=prefix)
        granter = create_semaphore(permits=1, timeout=10, lease=30, storage=storage)
    held = granter.acquire("res", auto_renew=False)
    got: dict[str, Any] = {}

    def waiter() -> None:
        lease = granter.acquire("res", auto_renew=False)
        got["at"], got["owner"] = time.monotonic(), lease.owner
        lease.release()

    thread = threading.Thread(target=waiter)
    thread.start()
    keys = storage.keys.lock("res") if kind == "mutex" else storage.keys.semaphore("res")
    wait_until(lambda: client.llen(keys.queue) == 1)  # queued in Redis
    script, call_keys, args = storage.release_call(held.key, held.owner, witness=False)
    released_at = time.monotonic()
    reply = script.run(client, call_keys, args)
    thread.join(5)
    assert "at" in got and got["at"] - released_at < 1.0, "the waiter was not woken at once"
    assert reply == (2 if kind == "mutex" else 1), "handed over by message, not in the reply"
    record = call_keys[4 if kind == "mutex" else 5]  # this thread's (the waiter wrote its own)
    assert record.endswith(f"/{threading.get_ident()}") and not client.exists(record), \
        "no release record"
    assert script.run(client, call_keys, args) == 0, "a re-send: not held, nothing changed"
