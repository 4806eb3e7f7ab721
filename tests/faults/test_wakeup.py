"""Wake-ups under network faults: a grant whose message is lost or late costs at most one
short re-check interval, and acquire returns it with its full lease.

The waiting process talks to Redis through the fault proxy; the holders are other processes
talking to the server directly, so every grant to the waiter travels by pub/sub.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis

from celery_rediskit import MutexLease, RedisMutexStorage, create_mutex
from celery_rediskit._redis.scripts import load_script
from celery_rediskit.lease import process_id
from tests.faults.holders import HolderProcess
from tests.faults.proxy import FaultProxy
from tests.faults.servers import FaultServer
from tests.interrupts import Background, wait_until

pytestmark = pytest.mark.usefixtures("no_stray_leases")


@pytest.fixture
def prefix() -> str:
    return f"rkt-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def direct(fault_server: FaultServer) -> Iterator[redis.Redis]:
    """A client straight to the server, to look at the keys."""
    client = fault_server.client()
    yield client
    client.close()


@pytest.fixture
def proxied(fault_proxy: FaultProxy) -> Iterator[redis.Redis]:
    """The waiting process's client, through the proxy."""
    client = redis.Redis.from_url(fault_proxy.url, socket_timeout=10)
    yield client
    client.close()


def _subscribed_port(proxy: FaultProxy) -> int:
    [link] = [link for link in proxy.links() if link.subscribed and not link.dropped]
    return link.client_port


def _queued(direct: redis.Redis, prefix: str) -> Callable[[], bool]:
    return lambda: direct.hlen(f"{prefix}:lock:{{res}}:waitq") == 1


def test_a_grant_lost_on_a_dropped_connection_has_its_full_lease_and_no_second_holder(
    fault_server: FaultServer, fault_proxy: FaultProxy, direct: redis.Redis,
    proxied: redis.Redis, prefix: str, spawn_holder: Callable[..., HolderProcess],
) -> None:
    """The issue's double grant: a waiter whose grant message is lost (its pub/sub connection
    silently dropped) learned of the grant only at its bound, with little left of its 3 s
    lease, and another process got the lock while the first still held it.

    The lease is taken with ``auto_renew=False``: what acquire returns is then all the holder
    has, so the outcome does not depend on when the renewer happens to tick.
    """
    first = spawn_holder(fault_server.url, prefix, "res", 3.0, "fenced")
    mutex = create_mutex(timeout=20, lease=3.0, storage=RedisMutexStorage(proxied, prefix))
    waiter = Background(lambda: mutex.acquire("res", auto_renew=False))
    waiter.start()
    wait_until(_queued(direct, prefix))
    fault_proxy.drop(_subscribed_port(fault_proxy))  # a NAT forgets the idle connection
    time.sleep(0.3)  # the scenario: the holder releases 0.3 s into the waiter's sleep
    released_at = time.monotonic()
    assert first.release().startswith("RELEASED True")  # the grant's message is lost
    waiter.join(15)
    assert waiter.error is None, repr(waiter.error)
    held: MutexLease = waiter.result
    learned = waiter.finished_at - released_at
    # Another process asks for the lock at once: it must wait until the 3 s lease ends.
    second = spawn_holder(fault_server.url, prefix, "res", 3.0, "fenced")
    after = time.monotonic() - waiter.finished_at
    try:
        assert after > 3.0 - 0.5, (
            f"a second owner got the lock {after:.2f} s after acquire returned a 3 s lease "
            f"(learned {learned:.2f} s after the release; tokens {held.fencing_token}, "
            f"{second.token})"
        )
        assert learned < 1.0 + 1.0, f"the grant was learned {learned:.2f} s after the release"
    finally:
        held.release()


def test_after_a_silent_drop_every_later_grant_is_learned_at_once(
    fault_server: FaultServer, fault_proxy: FaultProxy, direct: redis.Redis,
    proxied: redis.Redis, prefix: str, spawn_holder: Callable[..., HolderProcess],
) -> None:
    """The wake-up connection is health-checked: a silently dropped one is found and replaced,
    so a lost wake-up costs at most one re-check interval once, not the wait's bound for the
    life of the process."""
    mutex = create_mutex(timeout=20, lease=6.0, storage=RedisMutexStorage(proxied, prefix))

    def one_handoff() -> float:
        holder = spawn_holder(fault_server.url, prefix, "res", 6.0, "fenced")
        waiter = Background(lambda: mutex.acquire("res").release())
        waiter.start()
        wait_until(_queued(direct, prefix))
        released_at = time.monotonic()
        assert holder.release().startswith("RELEASED True")
        waiter.join(20)
        assert waiter.error is None, repr(waiter.error)
        return waiter.finished_at - released_at

    assert one_handoff() < 0.5  # the subscription works
    dropped = _subscribed_port(fault_proxy)
    fault_proxy.drop(dropped)
    first = one_handoff()
    assert first < 2.0 + 1.0, f"the grant lost on the dropped connection took {first:.2f} s"
    later = [one_handoff() for _ in range(3)]
    assert max(later) < 0.5, f"grants after the drop were learned late: {later}"
    assert _subscribed_port(fault_proxy) != dropped  # a new wake-up connection replaced it


def test_a_grant_message_delivered_late_is_renewed_before_acquire_returns(
    fault_server: FaultServer, fault_proxy: FaultProxy, direct: redis.Redis,
    proxied: redis.Redis, prefix: str, spawn_holder: Callable[..., HolderProcess],
) -> None:
    """A grant message held up in the network (1.2 s here) arrives with its lease partly
    spent: acquire renews it before returning, so the lease is whole when the caller gets it."""
    holder = spawn_holder(fault_server.url, prefix, "res", 30.0, "fenced")
    mutex = create_mutex(timeout=20, lease=6.0, storage=RedisMutexStorage(proxied, prefix))

    def take() -> tuple[MutexLease, float]:
        held = mutex.acquire("res", auto_renew=False)
        return held, held.ttl()

    waiter = Background(take)
    waiter.start()
    wait_until(_queued(direct, prefix))
    port = _subscribed_port(fault_proxy)
    before = [link.bytes_down for link in fault_proxy.links() if link.client_port == port][0]
    fault_proxy.delay(0.0, 1.2)  # what the server sends now reaches the client 1.2 s later
    assert holder.release().startswith("RELEASED True")
    wait_until(lambda: [link.bytes_down for link in fault_proxy.links()
                        if link.client_port == port][0] > before)  # the grant is in flight
    fault_proxy.heal()  # later replies are not delayed (the message stays 1.2 s late)
    waiter.join(15)
    assert waiter.error is None, repr(waiter.error)
    held, left = waiter.result
    try:
        assert left > 5.5, f"acquire returned the lock with {left:.2f} s of its 6 s lease"
    finally:
        held.release()


def test_waiters_ask_again_only_once_the_new_subscription_is_confirmed(
    fault_proxy: FaultProxy, direct: redis.Redis, proxied: redis.Redis, prefix: str,
) -> None:
    """When the wake-up connection breaks, the waiters look in Redis for a grant they missed
    only after the server has confirmed the new SUBSCRIBE: a grant published between an
    earlier look and the confirmation would be lost again."""
    lock = f"{prefix}:lock:{{res}}"
    holder = "elsewhere/1/abc:1"  # another process holds the lock (30 s, not renewed)
    assert direct.set(lock, holder, px=30_000)
    mutex = create_mutex(timeout=20, lease=30.0, storage=RedisMutexStorage(proxied, prefix))
    waiter = Background(lambda: mutex.acquire("res").release())
    waiter.start()
    wait_until(_queued(direct, prefix))
    channel = f"{prefix}:wake:{process_id()}"

    def snapshot() -> tuple[int, int]:
        """Scripts run so far and subscribers of the waiter's channel, at one instant."""
        pipe = direct.pipeline(transaction=True)
        pipe.info("commandstats")
        pipe.pubsub_numsub(channel)
        stats, [(_, subscribers)] = pipe.execute()
        return int(stats.get("cmdstat_evalsha", {}).get("calls", 0)), int(subscribers)

    scripts, subscribers = snapshot()
    assert subscribers == 1
    fault_proxy.delay(0.1, 0.0)  # the reconnection and the waiter's look take time to arrive
    assert direct.client_kill_filter(_type="pubsub") == 1
    end = time.monotonic() + 10
    while True:  # until the waiter's next look at Redis
        seen, subscribers = snapshot()
        if seen > scripts:
            break
        assert time.monotonic() < end, "the waiter never looked in Redis again"
    assert subscribers == 1, "the waiter looked in Redis before it was subscribed again"
    fault_proxy.heal()
    storage = RedisMutexStorage(direct, prefix)
    args = storage.release_argv(holder, "res")
    args[2] = "elsewhere/1/abc"  # released from another process: the grant is published
    load_script("mutex_release").run(direct, storage.release_keys("res"), args)
    waiter.join(10)
    assert waiter.error is None and not waiter.is_alive(), repr(waiter.error)
