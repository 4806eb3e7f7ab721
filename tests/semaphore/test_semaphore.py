"""The semaphore against a real Redis (and the memory storage where the semantics are shared)."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from redis.cluster import key_slot

from celery_rediskit import (
    AcquireAborted,
    LockTimeout,
    MemorySemaphoreStorage,
    RedisSemaphoreStorage,
    SemaphoreStorage,
    create_semaphore,
)
from celery_rediskit._redis.keys import KeySpace
from celery_rediskit.renewal import renewer
from celery_rediskit.semaphore import Semaphore
from tests.interrupts import HOWS, Background, interrupt_wait, wait_until
from tests.processes import run_contenders


def test_with_permit_and_permit_context_manager(storage: SemaphoreStorage) -> None:
    sem = create_semaphore(permits=2, timeout=5, lease=5, storage=storage)
    assert sem.with_permit("db", lambda x: x * 2, 21) == 42
    with sem.permit("db") as permit:
        assert permit.key == "db" and not permit.lost
        assert 4.0 < permit.ttl() <= 5.0
        info = storage.get_semaphore_info("db")
        assert (info.total, info.acquired, info.available) == (2, 1, 1)
        assert permit.owner in info.holders
    assert storage.get_available_permits("db") == 2
    assert permit.ttl() == 0.0


def test_first_use_initialises_with_the_semaphores_own_permits(storage: SemaphoreStorage) -> None:
    sem = create_semaphore(permits=7, storage=storage)
    assert not storage.get_semaphore_info("api").initialized
    with sem.permit("api"):
        assert storage.get_total_permits("api") == 7
        assert storage.get_available_permits("api") == 6


def test_permits_run_out_then_timeout(storage: SemaphoreStorage) -> None:
    sem = create_semaphore(permits=2, timeout=0.3, storage=storage)
    held = [sem.acquire("db"), sem.acquire("db")]
    with pytest.raises(LockTimeout):
        sem.acquire("db")
    with pytest.raises(LockTimeout):
        sem.acquire("db", blocking=False)
    held[0].release()
    sem.acquire("db", blocking=False).release()
    held[1].release()


def test_initialize_never_lets_more_holders_in_than_the_total(storage: SemaphoreStorage) -> None:
    sem = create_semaphore(permits=3, storage=storage)
    held = [sem.acquire("db") for _ in range(3)]
    storage.initialize("db", 2)
    held.pop().release()
    info = storage.get_semaphore_info("db")
    assert (info.total, info.acquired, info.available) == (2, 2, 0)
    with pytest.raises(LockTimeout):
        sem.acquire("db", blocking=False)
    held.pop().release()
    sem.acquire("db", blocking=False).release()
    held.pop().release()


def test_release_is_owner_checked_and_idempotent(storage: SemaphoreStorage) -> None:
    sem = create_semaphore(permits=1, storage=storage)
    permit = sem.acquire("db")
    assert storage.release("db", "stranger:1") is False
    assert storage.get_semaphore_info("db").acquired == 1
    assert permit.release() is True
    assert storage.release("db", permit.owner) is False
    assert storage.get_semaphore_info("db").acquired == 0


def test_decrease_increase_reset_and_clear(storage: SemaphoreStorage) -> None:
    sem = create_semaphore(permits=3, storage=storage)
    permit = sem.acquire("db")
    assert storage.decrease_permits("db", 2) == 1
    assert storage.get_semaphore_info("db").available == 0
    assert storage.decrease_permits("db", 5) == 0
    info = storage.get_semaphore_info("db")
    assert info.available == max(0, info.total - info.acquired) == 0
    assert storage.increase_permits("db", 4) == 4
    storage.reset("db")
    info = storage.get_semaphore_info("db")
    assert (info.total, info.acquired) == (3, 1), "reset keeps holders"
    storage.clear("db")
    assert not storage.get_semaphore_info("db").initialized
    renewer().renew_now([permit])
    assert permit.lost, "a cleared semaphore's holders find their permits lost"


def test_increase_wakes_as_many_waiters_as_permits_at_once(storage: SemaphoreStorage) -> None:
    sem = create_semaphore(permits=1, timeout=10, storage=storage)
    blocker = sem.acquire("db")
    got = threading.Semaphore(0)
    queued = threading.Barrier(4)
    release = threading.Event()

    def waiter() -> None:
        queued.wait()
        with sem.permit("db"):
            got.release()
            release.wait(10)

    threads = [threading.Thread(target=waiter) for _ in range(3)]
    for t in threads:
        t.start()
    queued.wait()
    # All three wait in the queue (the wake-up is what is tested, not a free permit taken).
    if isinstance(storage, RedisSemaphoreStorage):
        waiters = storage.keys.semaphore("db").waiters
        wait_until(lambda: storage.client.hlen(waiters) == 3)
    else:
        assert isinstance(storage, MemorySemaphoreStorage)

        def queue_length() -> int:
            with storage._cond:
                return len(storage._state("db").queue)

        wait_until(lambda: queue_length() == 3)
    started = time.monotonic()
    storage.increase_permits("db", 3)
    for _ in range(3):
        assert got.acquire(timeout=2)
    assert time.monotonic() - started < 0.5
    release.set()
    for t in threads:
        t.join()
    blocker.release()


def test_abort_stops_the_wait_within_50ms(storage: SemaphoreStorage) -> None:
    sem = create_semaphore(permits=1, timeout=30, storage=storage)
    abort = threading.Event()
    outcome: dict[str, object] = {}

    def waiter() -> None:
        try:
            sem.acquire("db", abort=abort)
        except AcquireAborted as exc:
            outcome["error"], outcome["at"] = exc, time.monotonic()

    with sem.permit("db"):
        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(0.1)  # let the waiter get into its wait
        set_at = time.monotonic()
        abort.set()
        thread.join(5)
    assert isinstance(outcome["error"], AcquireAborted)
    assert float(outcome["at"]) - set_at < 0.05  # type: ignore[arg-type]
    assert storage.get_semaphore_info("db").acquired == 0


def test_threads_never_exceed_the_total_and_are_served_fairly(storage: SemaphoreStorage) -> None:
    sem = create_semaphore(permits=3, timeout=30, lease=10, storage=storage)
    lock = threading.Lock()
    inside = 0
    most = 0
    counts = [0] * 10

    def worker(i: int) -> None:
        nonlocal inside, most
        for _ in range(20):
            with sem.permit("db"):
                with lock:
                    inside += 1
                    most = max(most, inside)
                counts[i] += 1
                time.sleep(0.0005)
                with lock:
                    inside -= 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most == 3
    assert counts == [20] * 10


def test_total_holds_under_processes_while_permits_change(
    redis_storage: RedisSemaphoreStorage, redis_url: str, prefix: str
) -> None:
    """Processes race for 3 permits while the total drops to 1 and rises back, over and over."""
    redis_storage.initialize("db", 3)
    stop = threading.Event()
    snapshots = []

    def churn() -> None:
        while not stop.is_set():
            redis_storage.decrease_permits("db", 2)
            snapshots.append(redis_storage.get_semaphore_info("db"))
            redis_storage.increase_permits("db", 2)
            snapshots.append(redis_storage.get_semaphore_info("db"))

    churner = threading.Thread(target=churn)
    churner.start()
    try:
        outs = run_contenders(4, "semaphore", redis_url, prefix, "db", "3", "25")
    finally:
        stop.set()
        churner.join()
    seen = [s for out in outs for s in json.loads(out)["seen"]]
    assert len(seen) == 100
    assert max(seen) <= 3, "more holders than the largest total at once"
    assert all(i.available == max(0, i.total - i.acquired) for i in snapshots)
    assert redis_storage.get_semaphore_info("db").total == 3


def test_sigkill_of_holder_returns_its_permit_within_lease_plus_1s(
    redis_storage: RedisSemaphoreStorage, spawn_holder: type, redis_url: str, prefix: str
) -> None:
    lease = 1.5
    holder = spawn_holder("semaphore", redis_url, prefix, "db", str(lease), "1")
    sem = create_semaphore(permits=1, timeout=10, storage=redis_storage)
    os.kill(holder.proc.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    with sem.permit("db"):
        waited = time.monotonic() - killed_at
    assert waited <= lease + 1.0


def test_release_in_another_process_wakes_a_waiter_at_once(
    redis_storage: RedisSemaphoreStorage, spawn_holder: type, redis_url: str, prefix: str
) -> None:
    holder = spawn_holder("semaphore", redis_url, prefix, "db", "30", "1")
    sem = create_semaphore(permits=1, timeout=10, storage=redis_storage)
    got: dict[str, float] = {}

    def waiter() -> None:
        with sem.permit("db"):
            got["at"] = time.monotonic()

    thread = threading.Thread(target=waiter)
    thread.start()
    while not redis_storage.client.llen(redis_storage.keys.semaphore("db").queue):
        time.sleep(0.005)  # wait until the waiter is queued in Redis
    released_at = time.monotonic()
    assert holder.command("release").startswith("RELEASED True")
    thread.join(5)
    assert got["at"] - released_at < 0.5


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("exc", [KeyboardInterrupt, SoftTimeLimitExceeded],
                         ids=lambda e: e.__name__)
def test_an_interrupted_wait_leaves_the_queue_and_the_next_release_serves_a_live_waiter(
    redis_storage: RedisSemaphoreStorage, exc: type[BaseException], how: str
) -> None:
    """A wait ended by anything but its timeout or abort leaves no ghost in the queue: the
    freed permit goes to the live waiter behind it at once, not after the ghost's lease."""
    sem = create_semaphore(permits=1, timeout=30, lease=30, storage=redis_storage)
    keys = redis_storage.keys.semaphore("db")
    queued = redis_storage.client.hlen
    held = sem.acquire("db")
    live = Background(lambda: sem.acquire("db", timeout=5))

    def queue_a_live_waiter_behind() -> None:
        wait_until(lambda: queued(keys.waiters) == 1)
        live.start()
        wait_until(lambda: queued(keys.waiters) == 2)

    interrupt_wait(how, exc, lambda abort: sem.acquire("db", abort=abort),
                   queue_a_live_waiter_behind)
    try:
        waiting = (queued(keys.waiters), redis_storage.client.llen(keys.queue))
        released_at = time.monotonic()
        held.release()
        live.join(10)
        holders = list(redis_storage.get_semaphore_info("db").holders)
        assert live.error is None, (
            f"the permit went to {holders}, not to the live waiter, which got {live.error!r}"
        )
        assert live.finished_at - released_at < 1.0
        assert holders == [live.result.owner]
        assert waiting == (1, 1), "the interrupted waiter stayed queued in Redis"
    finally:
        live.join(10)
        if live.result is not None:
            live.result.release()


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: create_semaphore(permits=0), "permits"),
        (lambda: create_semaphore(permits="5"), "permits"),  # type: ignore[arg-type]
        (lambda: create_semaphore(permits=2.5), "permits"),  # type: ignore[arg-type]
        (lambda: create_semaphore(permits=2, timeout=0), "timeout"),
        (lambda: create_semaphore(permits=2, lease=-1), "lease"),
        (lambda: create_semaphore(permits=2).acquire(""), "key"),
        (lambda: MemorySemaphoreStorage().increase_permits("db", 0), "n"),
        (lambda: MemorySemaphoreStorage().decrease_permits("db", "1"), "n"),  # type: ignore[arg-type]
        (lambda: MemorySemaphoreStorage().initialize("db", 0), "permits"),
    ],
)
def test_bad_input_gets_a_value_error_naming_the_argument(call, name: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=name):
        call()


def test_bad_admin_input_on_redis(redis_storage: RedisSemaphoreStorage) -> None:
    with pytest.raises(ValueError, match="n"):
        redis_storage.increase_permits("db", -2)
    with pytest.raises(ValueError, match="key"):
        redis_storage.get_semaphore_info("")


def test_semaphore_keys_share_one_cluster_slot() -> None:
    keys = KeySpace("rediskit").semaphore("tenant:42").with_pin()
    assert len(keys) == 6 and len({key_slot(k.encode()) for k in keys}) == 1


# -- declared permits (the Celery layer's concurrency_limit) -----------------------------------

def _declared(storage: SemaphoreStorage, permits: int) -> Semaphore:
    return create_semaphore(permits=permits, timeout=0.5, storage=storage, declared=True)


def _notes(caplog: pytest.LogCaptureFixture, key: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == "celery_rediskit.semaphore" and repr(key) in r.getMessage()]


def test_declared_permits_take_effect_at_the_next_acquire(storage: SemaphoreStorage) -> None:
    """5 declared, 4 held; then 2 declared: the holders keep their permits, and nobody new
    gets in until fewer than 2 are held."""
    old = [_declared(storage, 5).acquire("db") for _ in range(4)]
    new = _declared(storage, 2)
    with pytest.raises(LockTimeout):
        new.acquire("db", blocking=False)
    info = storage.get_semaphore_info("db")
    assert (info.total, info.acquired, info.available) == (2, 4, 0)
    assert set(info.holders) == {p.owner for p in old} and not info.pinned
    for permit in old[:2]:
        permit.release()
    with pytest.raises(LockTimeout):  # 2 held, 2 declared: still full
        new.acquire("db", blocking=False)
    old[2].release()
    got = new.acquire("db", blocking=False)  # 1 held: one gets in
    with pytest.raises(LockTimeout):
        new.acquire("db", blocking=False)
    assert not any(p.lost for p in old[3:]) and old[3].ttl() > 0
    old[3].release()
    got.release()
    # the primitive's default is unchanged: a plain acquire never changes the total
    create_semaphore(permits=9, storage=storage).acquire("db").release()
    assert storage.get_total_permits("db") == 2


def test_an_operators_total_wins_over_declared_permits_until_reset(
    storage: SemaphoreStorage,
) -> None:
    _declared(storage, 2).acquire("db").release()
    storage.initialize("db", 4)  # what `celery rediskit permits db --set 4` calls
    assert storage.get_semaphore_info("db").pinned
    held = [_declared(storage, 2).acquire("db", blocking=False) for _ in range(4)]
    with pytest.raises(LockTimeout):
        _declared(storage, 3).acquire("db", blocking=False)
    info = storage.get_semaphore_info("db")
    assert (info.total, info.acquired, info.pinned) == (4, 4, True)
    assert storage.decrease_permits("db", 1) == 3  # still the operator's (--decrease)
    for permit in held:
        permit.release()
    _declared(storage, 3).acquire("db").release()
    assert storage.get_total_permits("db") == 3
    storage.reset("db")
    # reset returns to the last declared total, and declared permits apply again
    info = storage.get_semaphore_info("db")
    assert (info.total, info.pinned) == (3, False)
    _declared(storage, 2).acquire("db").release()
    assert storage.get_total_permits("db") == 2
    assert storage.increase_permits("db", 1) == 3  # --increase pins as well
    _declared(storage, 2).acquire("db").release()
    assert storage.get_total_permits("db") == 3
    storage.clear("db")  # clear forgets the operator's total with the rest
    _declared(storage, 2).acquire("db").release()
    info = storage.get_semaphore_info("db")
    assert (info.total, info.pinned) == (2, False)


def test_a_difference_is_logged_once_per_process_and_semaphore(
    storage: SemaphoreStorage, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="celery_rediskit.semaphore")
    _declared(storage, 5).acquire("db").release()
    assert _notes(caplog, "db") == []  # first use: nothing to tell
    for permits in (2, 5, 2, 5):  # e.g. old and new workers during a rolling deploy
        _declared(storage, permits).acquire("db").release()
    (changed,) = _notes(caplog, "db")
    assert changed.levelno == logging.INFO
    assert "2 permits declared" in changed.getMessage() and "was 5" in changed.getMessage()

    _declared(storage, 2).acquire("api").release()
    storage.initialize("api", 4)
    for _ in range(3):  # every acquire meets the operator's total: told once
        _declared(storage, 2).acquire("api").release()
    (pinned,) = _notes(caplog, "api")
    assert pinned.levelno == logging.WARNING
    assert "4 permits an operator set" in pinned.getMessage()
    assert "--reset" in pinned.getMessage()


def test_raising_declared_permits_serves_the_waiters(
    redis_storage: RedisSemaphoreStorage,
) -> None:
    holder = _declared(redis_storage, 1).acquire("db")
    waiter = create_semaphore(permits=1, timeout=20, storage=redis_storage, declared=True)
    got = threading.Event()

    def wait() -> None:
        with waiter.permit("db"):
            got.set()

    thread = threading.Thread(target=wait)
    thread.start()
    while not redis_storage.client.llen(redis_storage.keys.semaphore("db").queue):
        time.sleep(0.005)  # wait until the waiter is queued in Redis
    raised = _declared(redis_storage, 3).acquire("db", blocking=False)
    assert got.wait(10)  # the waiter got one of the new permits: no release needed
    thread.join(10)
    raised.release()
    holder.release()


def _pttls(client: Any, pinned: str, total: str) -> tuple[int, int]:
    """The mark's and the total's remaining ms, the total read first: equal expiries then
    read as pinned <= total even when a millisecond passes between the two reads."""
    left = int(client.pttl(total))
    return int(client.pttl(pinned)), left


def test_the_operators_mark_lives_as_long_as_the_total(
    redis_storage: RedisSemaphoreStorage,
) -> None:
    """The mark shares the semaphore's hash tag and never outlives its total: it takes the
    total's expiry when set, and again at each acquire with declared permits."""
    client, keys = redis_storage.client, redis_storage.keys.semaphore("db")

    def mark_within_total() -> bool:
        # Both read in one script: the server's clock stands still inside it, so two
        # equal expiries read equal (two PTTL calls would read the later one 1 ms shorter).
        mark, total = client.eval("return {redis.call('pttl', KEYS[1]), "
                                  "redis.call('pttl', KEYS[2])}", 2, keys.pinned, keys.total)
        return bool(0 < mark <= total)

    _declared(redis_storage, 2).acquire("db").release()
    redis_storage.increase_permits("db", 1)  # an admin call refreshes the total's expiry too
    assert mark_within_total()
    client.pexpire(keys.total, 30_000)
    _declared(redis_storage, 2).acquire("db").release()
    assert mark_within_total()
    redis_storage.initialize("db", 5)
    assert mark_within_total()
    redis_storage.reset("db")
    assert not client.exists(keys.pinned)
    redis_storage.increase_permits("db", 1)
    redis_storage.clear("db")
    assert not client.exists(keys.pinned)


@pytest.fixture(autouse=True)
def _no_stray_leases() -> Iterator[None]:
    yield
    for lease in renewer().held():
        release = getattr(lease, "release", None)
        if release:
            release()
