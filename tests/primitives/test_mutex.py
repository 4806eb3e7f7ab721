"""The mutex against a real Redis (and the memory storage where the semantics are shared)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from redis.cluster import key_slot

from celery_rediskit import (
    AcquireAborted,
    LockTimeout,
    MemoryMutexStorage,
    MutexStorage,
    RedisMutexStorage,
    create_mutex,
)
from celery_rediskit.keys import KeySpace
from celery_rediskit.renewal import renewer
from tests.primitives.processes import run_contenders
from tests.roundtrips import counting_client


@pytest.fixture(params=["redis", "memory"])
def storage(request: pytest.FixtureRequest, client: redis.Redis, prefix: str) -> MutexStorage:
    if request.param == "memory":
        return MemoryMutexStorage()
    return RedisMutexStorage(client, prefix=prefix)


@pytest.fixture
def redis_storage(client: redis.Redis, prefix: str) -> RedisMutexStorage:
    return RedisMutexStorage(client, prefix=prefix)


def test_with_lock_returns_the_result_and_releases(storage: MutexStorage) -> None:
    mutex = create_mutex(timeout=5, lease=5, storage=storage)
    seen = mutex.with_lock("res", lambda a, b=0: (a, b, storage.is_locked("res")), 1, b=2)
    assert seen == (1, 2, True)
    assert not storage.is_locked("res")


def test_lock_context_manager_exposes_the_lease(storage: MutexStorage) -> None:
    mutex = create_mutex(timeout=5, lease=5, storage=storage)
    with mutex.lock("res") as lease:
        assert lease.key == "res"
        assert isinstance(lease.fencing_token, int) and lease.fencing_token >= 1
        assert 4.0 < lease.ttl() <= 5.0
        info = storage.get_lock_info("res")
        assert info.locked and info.holder == lease.owner
        assert info.fencing_token == lease.fencing_token
        assert not lease.lost
    assert not storage.get_lock_info("res").locked
    assert lease.ttl() == 0.0


def test_fencing_tokens_rise_with_every_grant_also_after_expiry(storage: MutexStorage) -> None:
    mutex = create_mutex(timeout=5, lease=0.2, storage=storage)
    first = mutex.acquire("res", auto_renew=False)
    while storage.is_locked("res"):  # let the lease run out (expiry is what is tested)
        time.sleep(0.02)
    second = mutex.acquire("res", auto_renew=False)
    assert second.fencing_token > first.fencing_token
    assert first.release() is False, "an expired holder must not release the next holder"
    assert storage.get_lock_info("res").holder == second.owner
    second.release()
    third = mutex.acquire("res")
    assert third.fencing_token > second.fencing_token
    third.release()


def test_tokens_keep_rising_across_client_restarts(redis_url: str, prefix: str) -> None:
    tokens = []
    for _ in range(3):
        c = redis.Redis.from_url(redis_url)
        mutex = create_mutex(storage=RedisMutexStorage(c, prefix=prefix))
        with mutex.lock("res") as lease:
            tokens.append(lease.fencing_token)
        c.close()
    assert tokens == sorted(tokens) and len(set(tokens)) == 3


def test_release_by_a_non_owner_is_refused(storage: MutexStorage) -> None:
    mutex = create_mutex(storage=storage)
    with mutex.lock("res") as lease:
        assert storage.release("res", "someone-else:1") is False
        assert storage.get_lock_info("res").holder == lease.owner
        assert storage.extend("res", "someone-else:1", 10, add=True) is False


def test_extend_and_admin_operations(storage: MutexStorage) -> None:
    mutex = create_mutex(lease=2, storage=storage)
    lease = mutex.acquire("res", auto_renew=False)
    assert lease.extend(5)
    assert lease.ttl() > 5.0
    assert storage.extend_lock("res", 10)
    assert storage.get_lock_info("res").ttl > 15.0
    assert storage.force_release("res")
    assert not storage.is_locked("res")
    assert storage.force_release("res") is False
    assert lease.extend(5) is False and lease.lost, "extend must never re-create a lock"
    assert not storage.is_locked("res")
    assert storage.extend_lock("res", 1) is False


def test_timeout_raises_lock_timeout(storage: MutexStorage) -> None:
    mutex = create_mutex(timeout=0.3, storage=storage)
    with mutex.lock("res"):
        started = time.monotonic()
        with pytest.raises(LockTimeout) as err:
            mutex.acquire("res")
        assert time.monotonic() - started >= 0.29
        assert isinstance(err.value, TimeoutError) and err.value.key == "res"
        with pytest.raises(LockTimeout):
            mutex.acquire("res", blocking=False)
    mutex.acquire("res", blocking=False).release()


def test_abort_stops_the_wait_within_50ms(storage: MutexStorage) -> None:
    mutex = create_mutex(timeout=30, storage=storage)
    abort = threading.Event()
    waiting = threading.Event()
    outcome: dict[str, float | BaseException] = {}

    def waiter() -> None:
        waiting.set()
        try:
            mutex.acquire("res", abort=abort)
        except AcquireAborted as exc:
            outcome["error"] = exc
            outcome["at"] = time.monotonic()

    with mutex.lock("res"):
        thread = threading.Thread(target=waiter)
        thread.start()
        waiting.wait()
        time.sleep(0.1)  # let the waiter get into its wait: abort is tested mid-wait
        set_at = time.monotonic()
        abort.set()
        thread.join(5)
    assert isinstance(outcome["error"], AcquireAborted)
    assert float(outcome["at"]) - set_at < 0.05
    # The aborted waiter left no trace: the lock is free and can be taken at once.
    mutex.acquire("res", blocking=False).release()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"timeout": 0}, "timeout"),
        ({"timeout": -1}, "timeout"),
        ({"lease": 0}, "lease"),
        ({"lease": -5}, "lease"),
        ({"lease": "30"}, "lease"),
        ({"timeout": float("nan")}, "timeout"),
    ],
)
def test_bad_arguments_get_a_clear_value_error(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        create_mutex(**kwargs)  # type: ignore[arg-type]
    mutex = create_mutex()
    with pytest.raises(ValueError, match=name):
        mutex.acquire("res", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("key", ["", None, "a{b}"])
def test_bad_keys_get_a_clear_value_error(key: object) -> None:
    with pytest.raises(ValueError, match="key"):
        create_mutex().acquire(key)  # type: ignore[arg-type]


def test_threads_never_overlap_and_tokens_follow_grant_order(storage: MutexStorage) -> None:
    mutex = create_mutex(timeout=30, lease=10, storage=storage)
    inside = 0
    most = 0
    tokens: list[int] = []
    counts = [0] * 8

    def worker(i: int) -> None:
        nonlocal inside, most
        for _ in range(25):
            with mutex.lock("res") as lease:
                inside += 1
                most = max(most, inside)
                tokens.append(lease.fencing_token)
                counts[i] += 1
                time.sleep(0.0005)  # the protected work
                inside -= 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most == 1
    assert counts == [25] * 8
    assert tokens == sorted(tokens) and len(set(tokens)) == 200


def test_processes_never_overlap(redis_url: str, prefix: str) -> None:
    outs = run_contenders(4, "mutex", redis_url, prefix, "res", "1", "30")
    results = [json.loads(o) for o in outs]
    seen = [s for r in results for s in r["seen"]]
    tokens = [t for r in results for t in r["tokens"]]
    assert max(seen) == 1, "two processes held the mutex at once"
    assert len(tokens) == 120 and len(set(tokens)) == 120


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


def test_sigkill_of_holder_frees_the_lock_within_lease_plus_1s(
    redis_storage: RedisMutexStorage, spawn_holder: type, redis_url: str, prefix: str
) -> None:
    lease = 1.5
    holder = spawn_holder("mutex", redis_url, prefix, "res", str(lease), "1")
    mutex = create_mutex(timeout=10, storage=redis_storage)
    os.kill(holder.proc.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    with mutex.lock("res") as lease_obj:
        waited = time.monotonic() - killed_at
        assert lease_obj.fencing_token > holder.token
    assert waited <= lease + 1.0


def test_sigstop_past_the_lease_gives_a_higher_token_and_refuses_the_old_release(
    redis_storage: RedisMutexStorage, spawn_holder: type, redis_url: str, prefix: str
) -> None:
    holder = spawn_holder("mutex", redis_url, prefix, "res", "1.0", "1")
    os.kill(holder.proc.pid, signal.SIGSTOP)
    try:
        mutex = create_mutex(timeout=10, storage=redis_storage)
        lease = mutex.acquire("res")
        assert lease.fencing_token > holder.token
    finally:
        os.kill(holder.proc.pid, signal.SIGCONT)
    reply = holder.command("release")
    assert reply.startswith("RELEASED False"), reply
    assert redis_storage.get_lock_info("res").holder == lease.owner
    lease.release()


def test_every_operation_is_one_evalsha(redis_url: str, prefix: str) -> None:
    c, sent = counting_client(redis_url)
    storage = RedisMutexStorage(c, prefix=prefix)
    mutex = create_mutex(storage=storage)
    mutex.acquire("warm", auto_renew=False).release()  # loads the scripts
    sent.clear()
    for _ in range(10):
        mutex.acquire("res", auto_renew=False).release()
    assert sent == ["EVALSHA"] * 20
    sent.clear()
    storage.get_lock_info("res")
    storage.extend_lock("res", 1)
    storage.force_release("res")
    assert sent == ["EVALSHA"] * 3


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


@pytest.mark.parametrize("name", ["db", "db:main", "tenant/42", "}x"])
def test_lock_keys_share_one_cluster_slot(name: str) -> None:
    if "}" in name:
        with pytest.raises(ValueError, match="key"):
            KeySpace("rediskit").lock(name)
        return
    keys = KeySpace("rediskit").lock(name).as_list()
    assert len({key_slot(k.encode()) for k in keys}) == 1
    assert all(f"{{{name}}}" in k for k in keys)


def test_scripts_reload_after_a_server_restart(private_server: object, prefix: str) -> None:
    c = redis.Redis.from_url(private_server.url)  # type: ignore[attr-defined]
    mutex = create_mutex(storage=RedisMutexStorage(c, prefix=prefix))
    mutex.acquire("res", auto_renew=False).release()
    private_server.restart()  # type: ignore[attr-defined]
    with mutex.lock("res") as lease:
        assert lease.fencing_token == 1  # a fresh server: the counter starts again


@pytest.fixture(autouse=True)
def _no_stray_leases() -> Iterator[None]:
    yield
    for lease in renewer().held():
        lease_release = getattr(lease, "release", None)
        if lease_release:
            lease_release()


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


def test_a_discarded_client_leaves_no_wakeup_connection_or_pipe(redis_url: str,
                                                                 prefix: str) -> None:
    import gc

    from celery_rediskit import wakeup

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
