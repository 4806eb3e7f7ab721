"""Lease renewal across a partition (the fault proxy's blackhole): a server that does not answer
delays no other client's renewals, a renewal call ends within its short timeout, and the holder
cut off from its Redis is told its lease is lost by the lease's deadline, before anyone else
can get the lock.

Every client here is made with redis-py's defaults (its socket timeout and its retry policy
with backoff), as users make them: renewal must not depend on them.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from celery_rediskit import Lease, RedisMutexStorage, create_mutex
from celery_rediskit.renewal import renewer
from tests.faults.holders import REPO_ROOT, child_env
from tests.faults.proxy import FaultProxy
from tests.faults.servers import FaultServer

LEASE = 1.2
SLACK = 0.5  # seconds of scheduling delay allowed on a loaded machine
CALL_LIMIT = LEASE / 3  # the longest a renewal call may wait for Redis
EARLY = 0.01 * LEASE + 0.002  # how early a lease may be deemed lost (clock-drift margin)

pytestmark = pytest.mark.usefixtures("no_stray_leases")


@pytest.fixture
def healed(fault_proxy: FaultProxy) -> Iterator[FaultProxy]:
    """The fault proxy, healed at the end of the test before leases are released (so that
    teardown does not wait for the blackhole)."""
    yield fault_proxy
    fault_proxy.heal()


def test_a_partitioned_server_does_not_delay_another_clients_renewals(
    fault_server: FaultServer, healed: FaultProxy, prefix: str
) -> None:
    cut = redis.Redis.from_url(healed.url)
    with FaultProxy(fault_server.port) as other_proxy:  # a second path to the same server
        fine = redis.Redis.from_url(other_proxy.url)
        admin = fault_server.client()
        lost: list[str] = []
        a = create_mutex(lease=LEASE, storage=RedisMutexStorage(cut, prefix)).acquire("a")
        b = create_mutex(lease=LEASE, storage=RedisMutexStorage(fine, prefix),
                         on_lost=lambda lease, reason: lost.append(reason)).acquire("b")
        renewer().renew_now([a, b])  # both renewal connections are open: a is registered first
        healed.blackhole()
        lowest = LEASE
        until = time.monotonic() + 4 * LEASE  # b's lock lives 4 leases only if renewed
        while time.monotonic() < until:
            pttl = admin.pttl(f"{prefix}:lock:{{b}}")
            assert pttl > 0, f"b's lock expired because a's Redis did not answer ({lost})"
            lowest = min(lowest, pttl / 1000)
            assert not b.lost, lost
            time.sleep(0.02)  # sampling the lock's remaining time, not a synchronisation
        # Renewed every LEASE/3: its remaining time never fell much below 2/3 of the lease.
        assert lowest > LEASE / 3, f"b's lease fell to {lowest:.3f} s: renewals were late"
        assert a.lost, "a could not be renewed for 4 leases: it must be lost"
        assert admin.get(f"{prefix}:lock:{{b}}") == b.owner.encode()
        healed.heal()
        b.release()
        a.release()
        admin.close()
        fine.close()
    cut.close()


def _call_in_thread(fn: Any) -> tuple[threading.Event, dict[str, Any]]:
    done, out = threading.Event(), {}

    def run() -> None:
        started = time.monotonic()
        try:
            out["result"] = fn()
        except Exception as exc:
            out["error"] = exc
        out["took"] = time.monotonic() - started
        done.set()

    threading.Thread(target=run, daemon=True, name="test-renewal-call").start()
    return done, out


def test_a_renewal_call_to_a_partitioned_server_ends_within_its_short_timeout(
    healed: FaultProxy, prefix: str
) -> None:
    client = redis.Redis.from_url(healed.url)  # redis-py's own timeout and retries
    storage = RedisMutexStorage(client, prefix)
    lease = create_mutex(lease=LEASE, storage=storage).acquire("res", auto_renew=False)
    storage.renew_leases([lease])  # the renewal connection is open and the script loaded
    limit = CALL_LIMIT
    healed.blackhole()
    # First on the open connection (the reply never comes), then on a fresh one (connected,
    # but its hand-shake or its command never answered): each ends within the timeout.
    for attempt in ("open connection", "fresh connection"):
        done, out = _call_in_thread(lambda: storage.renew_leases([lease]))
        assert done.wait(limit + SLACK + 1.0), (
            f"renewing on the {attempt} was still blocked after {limit + SLACK + 1.0:.2f} s "
            "(redis-py's retries and backoff?)")
        assert isinstance(out.get("error"), redis.RedisError), out
        assert out["took"] <= limit + SLACK, f"{attempt}: took {out['took']:.2f} s"
    healed.heal()
    assert storage.renew_leases([lease]) == [True]  # a fresh connection once healed
    lease.release()
    client.close()


TAKER = """
import sys, time
import redis
from celery_rediskit import RedisMutexStorage, create_mutex
url, prefix, key = sys.argv[1:4]
mutex = create_mutex(timeout=30, lease=5, storage=RedisMutexStorage(redis.Redis.from_url(url),
                                                                    prefix))
print("READY", flush=True)
sys.stdin.readline()
lease = mutex.acquire(key, auto_renew=False)
# CLOCK_MONOTONIC is one clock for every process of the machine: comparable with the parent's.
print("GOT", time.monotonic(), lease.fencing_token, flush=True)
lease.release()
"""


def test_a_partitioned_holder_is_told_lost_by_its_deadline_before_another_gets_the_lock(
    fault_server: FaultServer, healed: FaultProxy, prefix: str
) -> None:
    told = threading.Event()
    told_at: list[float] = []
    reasons: list[str] = []

    def on_lost(lease: Lease, reason: str) -> None:
        told_at.append(time.monotonic())
        reasons.append(reason)
        told.set()

    holder = redis.Redis.from_url(healed.url)
    mutex = create_mutex(lease=LEASE, storage=RedisMutexStorage(holder, prefix),
                         on_lost=on_lost)
    taker = subprocess.Popen(
        [sys.executable, "-c", TAKER, fault_server.url, prefix, "res"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env(),
        cwd=REPO_ROOT,
    )
    try:
        assert taker.stdout is not None and taker.stdin is not None
        assert taker.stdout.readline().strip() == "READY"
        a = mutex.acquire("res")
        renewer().renew_now([a])  # a renewal that got through: the deadline counts from it
        healed.blackhole()
        renewed = a.last_renewed  # any later renewal is lost in the blackhole
        deadline = renewed + LEASE
        taker.stdin.write("go\n")  # the other process queues for the lock now
        taker.stdin.flush()
        line = taker.stdout.readline().split()
        assert line[:1] == ["GOT"], line
        granted, token = float(line[1]), int(line[2])
        lost_when_granted = a.lost
        assert told.wait(LEASE + 5.0), "the cut-off holder was never told its lease is lost"
        assert lost_when_granted, "another process got the lock while the holder read lost=False"
        assert told_at[0] <= granted, (
            f"told lost {told_at[0] - granted:.3f} s after another process got the lock")
        assert told_at[0] <= deadline + SLACK, (
            f"told lost {told_at[0] - deadline:.3f} s after its deadline")
        assert told_at[0] >= deadline - EARLY - 0.001, "told lost too early"
        assert granted >= deadline - EARLY
        assert token > a.fencing_token
        assert "ended" in reasons[0], reasons
        assert taker.wait(10) == 0
    finally:
        taker.kill()
        taker.wait()
        for stream in (taker.stdin, taker.stdout):
            if stream is not None:
                stream.close()
    healed.heal()
    holder.close()
