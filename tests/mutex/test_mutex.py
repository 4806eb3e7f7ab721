"""The mutex against a real Redis (and the memory storage where the semantics are shared)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import redis
from celery.exceptions import SoftTimeLimitExceeded
from redis.cluster import key_slot

from celery_rediskit import (
    AcquireAborted,
    LockTimeout,
    MutexStorage,
    RedisMutexStorage,
    create_mutex,
)
from celery_rediskit._redis.keys import KeySpace
from tests.interrupts import HOWS, Background, interrupt_wait, wait_until
from tests.processes import run_contenders

pytestmark = pytest.mark.usefixtures("no_stray_leases")


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


INTERRUPTS = [KeyboardInterrupt, SystemExit, SoftTimeLimitExceeded]


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("exc", INTERRUPTS, ids=lambda e: e.__name__)
def test_an_interrupted_wait_leaves_the_queue_and_the_next_release_serves_a_live_waiter(
    redis_storage: RedisMutexStorage, exc: type[BaseException], how: str
) -> None:
    """A wait ended by anything but its timeout or abort leaves no ghost in the queue: the
    release goes to the live waiter behind it at once, not after the ghost's lease (30 s)."""
    mutex = create_mutex(timeout=30, lease=30, storage=redis_storage)
    keys = redis_storage.keys.lock("res")
    queued = redis_storage.client.hlen
    held = mutex.acquire("res")
    live = Background(lambda: mutex.acquire("res", timeout=5))

    def queue_a_live_waiter_behind() -> None:
        wait_until(lambda: queued(keys.waiters) == 1)
        live.start()
        wait_until(lambda: queued(keys.waiters) == 2)

    interrupt_wait(how, exc, lambda abort: mutex.acquire("res", abort=abort),
                   queue_a_live_waiter_behind)
    try:
        waiting = (queued(keys.waiters), redis_storage.client.llen(keys.queue))
        released_at = time.monotonic()
        held.release()
        live.join(10)
        holder = redis_storage.get_lock_info("res").holder
        assert live.error is None, (
            f"the release went to {holder!r}, not to the live waiter, which got {live.error!r}"
        )
        assert live.finished_at - released_at < 1.0
        assert holder == live.result.owner
        assert waiting == (1, 1), "the interrupted waiter stayed queued in Redis"
    finally:
        live.join(10)
        if live.result is not None:
            live.result.release()


@pytest.mark.parametrize("name", ["db", "db:main", "tenant/42", "}x"])
def test_lock_keys_share_one_cluster_slot(name: str) -> None:
    if "}" in name:
        with pytest.raises(ValueError, match="key"):
            KeySpace("rediskit").lock(name)
        return
    keys = KeySpace("rediskit").lock(name).as_list()
    assert len({key_slot(k.encode()) for k in keys}) == 1
    assert all(f"{{{name}}}" in k for k in keys)








