"""The primitives on a Sentinel-managed client (``Sentinel.master_for``), through a failover.

A ``SENTINEL FAILOVER`` promotes the replica at once; the old master keeps serving the
connections it already had until the sentinels demote it (seconds later: about 10 s with
Sentinel's default timers, 2 s in ``tests/faults/sentinel.py``). What the library promises
across it (the README's topology table):

- it reconnects to the new master: the renewer asks the sentinels which master to talk to at
  each renewal, so leases that were copied to the replica are renewed on the new master and
  survive, even when the old master is demoted later than their lease (``failover(
  hold_demotion=True)`` keeps it serving for longer than a lease);
- leases whose grant the new master never got are reported lost (at the first renewal on the
  new master, within ``lease / 3`` of the sentinels naming it);
- nothing waits longer than a lease;
- fencing tokens keep rising across the failover;
- two holders of one lock at once only for grants made around the failover.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from dataclasses import dataclass

import pytest
import redis

from celery_rediskit import (
    RedisMutexStorage,
    RedisSemaphoreStorage,
    create_mutex,
    create_semaphore,
)
from celery_rediskit._redis.keys import KeySpace
from celery_rediskit.devserver import free_port
from celery_rediskit.lease import Lease
from celery_rediskit.report import read_resources
from tests.faults.sentinel import MASTER_NAME, SentinelSetup, wait_until


def managed_client(setup: SentinelSetup) -> redis.Redis:
    """A client of the setup's master through the sentinels (``Sentinel.master_for``).

    Its connections' default address is a closed port: a connection that skipped the
    sentinels' lookup fails rather than reach whatever listens on localhost:6379."""
    sentinel = setup.sentinel(socket_timeout=5, host="127.0.0.1", port=free_port())
    return sentinel.master_for(MASTER_NAME)


def lost_log() -> tuple[list[tuple[str, float]], object]:
    """A list of (key, monotonic time) of leases reported lost, and the callback filling it."""
    lost: list[tuple[str, float]] = []
    return lost, lambda lease, reason: lost.append((lease.key, time.monotonic()))


def test_the_primitives_work_on_a_sentinel_managed_client(
    sentinel_setup: SentinelSetup, prefix: str
) -> None:
    client = managed_client(sentinel_setup)
    mutex = create_mutex(timeout=5, lease=5, storage=RedisMutexStorage(client, prefix))
    sem = create_semaphore(permits=2, timeout=5, storage=RedisSemaphoreStorage(client, prefix))
    got = threading.Event()

    def waiter() -> None:  # a contended handoff: a grant published on the master's pub/sub
        with mutex.lock("res"):
            got.set()

    with mutex.lock("res") as lease, sem.permit("db"):
        thread = threading.Thread(target=waiter)
        thread.start()
        master = sentinel_setup.node(sentinel_setup.master_port)
        wait_until(lambda: master.llen(KeySpace(prefix).lock("res").queue), "the waiter queues")
        assert {r.key for r in read_resources(client, prefix)} == {"res", "db"}
        assert master.exists(KeySpace(prefix).lock("res").lock)
        assert lease.fencing_token is not None
    thread.join(10)
    assert got.is_set()

    # Renewal reaches the master too: a lease outlives several of its lengths.
    short = create_mutex(timeout=5, lease=0.6, storage=RedisMutexStorage(client, prefix))
    held = short.acquire("renewed")
    end = time.monotonic() + 2.0
    while time.monotonic() < end:
        assert not held.lost, held.lost_reason
        time.sleep(0.05)  # watching a lease over time
    assert held.release()
    client.close()


def test_a_failover_keeps_copied_leases_and_reports_the_others_lost(
    sentinel_setup: SentinelSetup, prefix: str
) -> None:
    setup = sentinel_setup
    lease_s = 3.0
    client = managed_client(setup)
    lost, on_lost = lost_log()
    mutex = create_mutex(timeout=5, lease=lease_s, storage=RedisMutexStorage(client, prefix),
                         on_lost=on_lost)
    sem = create_semaphore(permits=1, timeout=5, lease=lease_s,
                           storage=RedisSemaphoreStorage(client, prefix), on_lost=on_lost)
    # Another client, holding nothing: its pooled connection stays on the old master.
    other = managed_client(setup)
    other_mutex = create_mutex(timeout=5, lease=lease_s,
                               storage=RedisMutexStorage(other, prefix), on_lost=on_lost)
    assert other.ping()
    keys = KeySpace(prefix)

    copied = mutex.acquire("copied")
    permit = sem.acquire("copied-sem")
    assert setup.replicated(), "the replica has the grants"
    # The old master keeps serving the connections it has for longer than a lease.
    old, new = setup.failover(hold_demotion=True)
    promoted = time.monotonic()
    # A grant the new master never sees: made on the old master, which still takes writes.
    orphan = other_mutex.acquire("orphan")
    old_node, new_node = setup.node(old), setup.node(new)
    assert old_node.exists(keys.lock("orphan").lock)
    assert not new_node.exists(keys.lock("orphan").lock)

    # Reported lost at its first renewal, on the new master: long before the old master is
    # demoted (which would kill the connections it has).
    wait_until(lambda: orphan.lost, "the orphan lease is reported lost", timeout=lease_s)
    assert [key for key, _ in lost] == ["orphan"]
    # Meanwhile the copied leases are renewed on the new master, beyond their lease.
    while time.monotonic() < promoted + lease_s + 1.0:
        assert not copied.lost and not permit.lost, (copied.lost_reason, permit.lost_reason)
        time.sleep(0.1)  # watching leases over time
    # The renewer's move also moved the client's pooled connections: a grant goes to the new
    # master, although the old one still serves.
    during = mutex.acquire("during")
    assert new_node.exists(keys.lock("during").lock)
    assert not old_node.exists(keys.lock("during").lock)
    during.release()
    setup.end_hold(old)
    assert not copied.lost and not permit.lost, (copied.lost_reason, permit.lost_reason)
    assert 0 < new_node.pttl(keys.lock("copied").lock) <= lease_s * 1000
    assert new_node.zscore(keys.semaphore("copied-sem").holders, permit.owner) is not None
    assert copied.release() and permit.release()
    assert not new_node.exists(keys.lock("copied").lock)
    assert [key for key, _ in lost] == ["orphan"]

    # Fencing: the next grant of the lock the new master lost is higher than the lost one.
    again = mutex.acquire("orphan")
    assert again.fencing_token is not None and orphan.fencing_token is not None
    assert again.fencing_token > orphan.fencing_token > copied.fencing_token  # type: ignore[operator]
    again.release()
    client.close()
    other.close()


@dataclass
class Hold:
    """One holding of a lock by a worker thread, as that thread saw it."""

    key: str
    token: int
    asked: float  # monotonic, when acquire was called: the grant came after this
    granted: float  # when acquire returned: the grant came before this
    releasing: float  # when release was called: the lock was held until at least this
    held: bool  # release() found it still held


def test_a_contended_workload_runs_through_a_failover(
    sentinel_setup: SentinelSetup, prefix: str
) -> None:
    setup = sentinel_setup
    lease_s = 2.0
    client = managed_client(setup)
    mutex = create_mutex(timeout=None, lease=lease_s,
                         storage=RedisMutexStorage(client, prefix))
    holds: list[Hold] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def worker(key: str) -> None:
        while not stop.is_set():
            asked = time.monotonic()
            try:
                lease: Lease = mutex.acquire(key)
                granted = time.monotonic()
                time.sleep(0.02)  # the work done under the lock
                releasing = time.monotonic()
                held = lease.release()
            except Exception as exc:  # a connection killed by the demotion: try again
                errors.append(exc)
                continue
            assert lease.fencing_token is not None
            holds.append(Hold(key, lease.fencing_token, asked, granted, releasing, held))

    threads = [threading.Thread(target=worker, args=(f"k{i % 2}",)) for i in range(4)]
    for t in threads:
        t.start()
    wait_until(lambda: len(holds) >= 20, "the workload runs")
    started = time.monotonic()
    old, _new = setup.failover()
    setup.wait_demoted(old)
    settled = time.monotonic()
    count = len(holds)
    wait_until(lambda: len(holds) >= count + 20, "the workload runs on the new master")
    stop.set()
    for t in threads:
        t.join(lease_s * 3)
        assert not t.is_alive(), "a worker hangs"

    # Nothing waited longer than a lease (and the failover itself).
    assert max(h.granted - h.asked for h in holds) < lease_s + (settled - started)
    for key in ("k0", "k1"):
        mine = sorted((h for h in holds if h.key == key), key=lambda h: h.granted)
        for i, a in enumerate(mine):
            for b in mine[i + 1:]:
                # Fencing: a grant asked for after another was given out has a higher token.
                if b.asked > a.granted:
                    assert b.token > a.token, (a, b)
                # Surely held at once (each granted before the other was let go): only for
                # grants made during the failover.
                if b.granted < a.releasing and a.granted < b.releasing:
                    assert started <= b.granted and a.asked <= settled, (a, b)
    client.close()


@pytest.mark.parametrize("sentinel_setup", [{"persistent": True}, {"persistent": False}],
                         ids=["persistent", "volatile"], indirect=True)
def test_a_master_restarted_before_the_sentinels_notice(
    sentinel_setup: SentinelSetup, prefix: str
) -> None:
    # A crash and restart quicker than the sentinels' down-after: no failover. With an AOF the
    # master comes back with its leases; without one it comes back empty, its replica copies
    # the emptiness, and every lease is reported lost (tokens still rise: the server clock).
    setup = sentinel_setup
    lease_s = 3.0
    client = managed_client(setup)
    lost, on_lost = lost_log()
    mutex = create_mutex(timeout=5, lease=lease_s, storage=RedisMutexStorage(client, prefix),
                         on_lost=on_lost)
    held = mutex.acquire("res")
    assert setup.replicated()
    setup.restart_master()
    restarted = time.monotonic()
    keys = KeySpace(prefix).lock("res")
    replica = setup.node(setup.replica_port)
    if setup.persistent:
        assert replica.get(keys.lock) == held.owner.encode()
        while time.monotonic() < restarted + lease_s:
            assert not held.lost, held.lost_reason
            time.sleep(0.1)  # watching the lease over time
        assert held.release()
    else:
        assert not replica.exists(keys.lock)  # the replica was emptied too
        wait_until(lambda: held.lost, "the lease is reported lost", timeout=lease_s * 2)
        assert [key for key, _ in lost] == ["res"]
        again = mutex.acquire("res")
        assert again.fencing_token > held.fencing_token  # type: ignore[operator]
        again.release()
    assert setup.masters_seen() == {setup.master_port}  # no failover happened
    client.close()


def test_a_waiter_in_another_process_gets_the_lock_within_a_lease_across_a_failover(
    sentinel_setup: SentinelSetup, prefix: str
) -> None:
    # The waiter's wake-up connection stays on the old master until the sentinels demote it,
    # so a grant published on the new master may not reach it: its bounded wait, or the
    # demotion (which closes that connection: every waiter asks again), ends the wait.
    setup = sentinel_setup
    lease_s = 3.0
    client = managed_client(setup)
    mutex = create_mutex(timeout=5, lease=lease_s, storage=RedisMutexStorage(client, prefix))
    held = mutex.acquire("res")
    reports: multiprocessing.Queue[tuple[str, float, int]] = multiprocessing.Queue()

    def waiter() -> None:
        own = managed_client(setup)
        lease = create_mutex(timeout=None, lease=lease_s,
                             storage=RedisMutexStorage(own, prefix)).acquire("res")
        reports.put(("granted", time.monotonic(), int(lease.fencing_token or 0)))
        lease.release()

    child = multiprocessing.get_context("fork").Process(target=waiter)
    child.start()
    try:
        master = setup.node(setup.master_port)
        wait_until(lambda: master.llen(KeySpace(prefix).lock("res").queue), "the waiter queues")
        assert setup.replicated()
        old, _new = setup.failover()
        released = time.monotonic()
        held.release()
        what, granted, token = reports.get(timeout=lease_s * 3)
        assert what == "granted"
        assert granted - released < lease_s + 0.5
        assert token > int(held.fencing_token or 0)
        child.join(10)
        assert child.exitcode == 0
        setup.wait_demoted(old)
    finally:
        if child.is_alive():
            child.kill()
        client.close()


def test_min_replicas_to_write_makes_an_old_master_refuse_grants(
    sentinel_setup: SentinelSetup, prefix: str
) -> None:
    # The README's advice: with min-replicas-to-write, a master left without its replica
    # (here: promoted away from it) refuses grants instead of making ones the new master
    # never sees; once demoted, the client's next grant is on the new master.
    setup = sentinel_setup
    master = setup.node(setup.master_port)
    master.config_set("min-replicas-to-write", 1)
    master.config_set("min-replicas-max-lag", 1)
    client = managed_client(setup)  # holds nothing: its pooled connection stays put
    mutex = create_mutex(timeout=5, lease=3, storage=RedisMutexStorage(client, prefix))
    assert client.ping()
    old, new = setup.failover(hold_demotion=True)

    def refused() -> bool:
        try:
            mutex.acquire("res", auto_renew=False).release()
        except redis.ResponseError as exc:
            assert "NOREPLICAS" in str(exc)
            return True
        return False

    wait_until(refused, "the old master refuses grants", timeout=10.0)
    assert not setup.node(new).exists(KeySpace(prefix).lock("res").lock)
    setup.end_hold(old)
    lease = mutex.acquire("res")
    assert setup.node(new).get(KeySpace(prefix).lock("res").lock) == lease.owner.encode()
    lease.release()
    client.close()
