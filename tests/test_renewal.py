"""The process-wide renewer: leases stay alive while held, one round trip renews many, and a
lease that can't be renewed is reported lost, never re-created."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster, key_slot

from celery_rediskit import (
    MemoryMutexStorage,
    MutexStorage,
    RedisMutexStorage,
    RedisSemaphoreStorage,
    create_mutex,
    create_semaphore,
)
from celery_rediskit.devserver import PrivateServer, free_port
from celery_rediskit.renewal import renewer
from tests.conftest import storage_fixtures
from tests.roundtrips import round_trip_client

storage, _ = storage_fixtures(MemoryMutexStorage, RedisMutexStorage)

pytestmark = pytest.mark.usefixtures("no_stray_leases")


def test_one_round_trip_renews_every_held_lease_of_a_client(redis_url: str, prefix: str) -> None:
    c, trips = round_trip_client(redis_url)
    mutex = create_mutex(lease=30, storage=RedisMutexStorage(c, prefix=prefix))
    semaphore = create_semaphore(permits=2, lease=30,
                                 storage=RedisSemaphoreStorage(c, prefix=prefix))
    leases = [mutex.acquire(f"res{i}") for i in range(5)] + [semaphore.acquire("pool")]
    renewer().renew_now(leases[:1])  # opens the renewal connection, loads the script
    trips.clear()
    renewer().renew_now(leases)
    assert trips == [["EVALSHA"]], "locks and permits of one client: one script, one trip"
    assert all(lease.ttl() > 29 and not lease.lost for lease in leases)
    for lease in leases:
        lease.release()


def test_a_big_batch_is_split_into_scripts_of_a_few_hundred_sent_in_one_round_trip(
    redis_url: str, prefix: str
) -> None:
    c, trips = round_trip_client(redis_url)
    mutex = create_mutex(lease=30, storage=RedisMutexStorage(c, prefix=prefix))
    count = 1000
    leases = [mutex.acquire(f"res{i}", auto_renew=False) for i in range(count)]
    renewer().renew_now(leases[:1])
    trips.clear()
    renewer().renew_now(leases)
    # Redis runs one script at a time: one script over 1,000 keys would stall every other
    # client of the server for milliseconds. At most 300 leases a script, all in one trip.
    assert len(trips) == 1, trips
    assert set(trips[0]) == {"EVALSHA"} and len(trips[0]) >= -(-count // 300), trips
    assert not any(lease.lost for lease in leases)
    assert min(c.pttl(f"{prefix}:lock:{{res{i}}}") for i in range(0, count, 50)) > 29_000
    for lease in leases:
        lease.release()


def test_companion_keys_live_as_long_as_their_lease_in_the_same_round_trip(
    redis_url: str, prefix: str
) -> None:
    """A lease's companion keys (a record about its holder) are extended by each renewal of
    the lease, in its script: no extra round trip. Never shortened, never created, and left
    alone once the lease is lost."""
    c, trips = round_trip_client(redis_url)
    mutex = create_mutex(lease=30, storage=RedisMutexStorage(c, prefix=prefix))
    semaphore = create_semaphore(permits=2, lease=30,
                                 storage=RedisSemaphoreStorage(c, prefix=prefix))
    rec = {name: f"{prefix}:rec:{name}" for name in ("lock", "permit", "long", "none",
                                                    "missing", "lost")}
    for name in ("lock", "permit", "lost"):
        c.set(rec[name], name, px=2000)
    c.set(rec["long"], "long", ex=3600)
    c.set(rec["none"], "no expiry")
    lock = mutex.acquire("res", companion_keys=(rec["lock"], rec["missing"]))
    permit = semaphore.acquire("pool", companion_keys=(rec["permit"], rec["long"]))
    permit.companion_keys += (rec["none"],)  # may be set while held
    lost = mutex.acquire("gone", companion_keys=(rec["lost"],))
    plain = mutex.acquire("plain")
    renewer().renew_now([plain])  # opens the renewal connection, loads the script
    mutex.storage.force_release("gone")
    trips.clear()
    renewer().renew_now([lock, permit, lost, plain])
    assert trips == [["EVALSHA"]], "companions ride in the leases' one script, one trip"
    assert c.pttl(rec["lock"]) > 29_000 and c.pttl(rec["permit"]) > 29_000
    assert c.ttl(rec["long"]) > 3500, "a longer expiry is never shortened"
    assert c.ttl(rec["none"]) == -1, "a key without expiry keeps none"
    assert not c.exists(rec["missing"]), "a companion is never created"
    assert lost.lost and 0 < c.pttl(rec["lost"]) <= 2000, "a lost lease extends nothing"
    assert lock.ttl() > 29 and permit.ttl() > 29
    for lease in (lock, permit, plain):
        lease.release()
    assert c.exists(rec["lock"]), "release leaves companions to their owner"
    c.delete(*rec.values())


def test_companion_keys_in_a_big_batch_go_with_their_own_lease(
    redis_url: str, prefix: str
) -> None:
    c, trips = round_trip_client(redis_url)
    mutex = create_mutex(lease=30, storage=RedisMutexStorage(c, prefix=prefix))
    count = 600  # three scripts: each carries the companions of its own leases
    leases = [mutex.acquire(f"res{i}", auto_renew=False,
                            companion_keys=[f"{prefix}:rec:{i}"] * (i % 3))
              for i in range(count)]
    for i in range(count):
        c.set(f"{prefix}:rec:{i}", i, px=2000)
    mutex.storage.force_release("res7")  # lost: its companion (one key) stays as it was
    renewer().renew_now(leases[:1])
    trips.clear()
    renewer().renew_now(leases)
    assert len(trips) == 1 and set(trips[0]) == {"EVALSHA"}, trips
    pttls = [c.pttl(f"{prefix}:rec:{i}") for i in range(count)]
    assert all(p > 29_000 for i, p in enumerate(pttls) if i % 3 and i != 7)
    assert all(0 < p <= 2000 for i, p in enumerate(pttls) if i % 3 == 0 or i == 7)
    for lease in leases:
        lease.release()
    c.delete(*(f"{prefix}:rec:{i}" for i in range(count)))


def _evalsha_calls(admin: redis.Redis) -> int:
    return int(admin.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


def test_a_renewal_is_split_by_cost_so_no_script_stalls_the_server(
    private_server: PrivateServer
) -> None:
    """Counted by the server itself (INFO commandstats, on a server of the test's own): a
    renewal of many leases runs as scripts of at most BATCH_COST commands each (a lock with a
    companion costs 3, a permit 3 and more), all in one round trip, and renews every lease."""
    admin = redis.Redis.from_url(private_server.url)
    c, trips = round_trip_client(private_server.url)
    mutex = create_mutex(lease=30, storage=RedisMutexStorage(c, prefix="p"))
    semaphore = create_semaphore(permits=1000, lease=30,
                                 storage=RedisSemaphoreStorage(c, prefix="p"))
    locks = [mutex.acquire(f"res{i}", auto_renew=False, companion_keys=[f"p:rec:{i}"])
             for i in range(900)]
    permits = [semaphore.acquire("pool", auto_renew=False) for _ in range(300)]
    leases = [*locks, *permits]
    for i in range(900):
        c.set(f"p:rec:{i}", i, px=2000)
    renewer().renew_now(leases[:1])  # the renewal connection, the script loaded
    before = _evalsha_calls(admin)
    trips.clear()
    renewer().renew_now(leases)
    scripts = _evalsha_calls(admin) - before
    assert trips == [["EVALSHA"] * scripts], "every script in one round trip"
    # 66 locks (3 commands each) per script of at most 200: 14 scripts, the last one with
    # 42 locks and 24 permits (3 each); the other 276 permits: 5 more
    assert scripts == 19, scripts
    assert not any(lease.lost for lease in leases)
    assert min(c.pttl(f"p:lock:{{res{i}}}") for i in range(0, 900, 30)) > 29_000
    assert min(c.pttl(f"p:rec:{i}") for i in range(0, 900, 30)) > 29_000
    assert 29 < permits[-1].ttl() <= 30
    for lease in leases:
        lease.release()
    admin.close()
    c.close()


@pytest.fixture
def one_node_cluster(tmp_path: Any) -> Iterator[RedisCluster]:
    """A real Redis Cluster of one node holding every slot: it refuses cross-slot scripts."""
    server = PrivateServer(extra_args=(
        "--cluster-enabled", "yes", "--cluster-config-file", str(tmp_path / "nodes.conf"),
        "--cluster-port", str(free_port()),  # not port + 10000, which may pass 65535
    ))
    with server:
        admin = redis.Redis(port=server.port)
        admin.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        deadline = time.monotonic() + 10
        while b"cluster_state:ok" not in admin.execute_command("CLUSTER", "INFO"):
            assert time.monotonic() < deadline, "the cluster did not come up"
            time.sleep(0.02)  # the node is assigning its slots; nothing to wait on but INFO
        admin.close()
        client = RedisCluster(host="127.0.0.1", port=server.port)
        try:
            yield client
        finally:
            client.close()


def test_companion_keys_on_a_cluster_client_in_any_slot(
    one_node_cluster: RedisCluster, prefix: str
) -> None:
    """On a cluster a script may touch one slot only: a companion in its lease's slot rides in
    the lease's script, one in another slot gets its PEXPIRE in a pipelined call after it."""
    c = one_node_cluster
    mutex = create_mutex(lease=30, storage=RedisMutexStorage(c, prefix=prefix))
    same, other, lost_rec = "rec:{res}", f"{prefix}:rec:other", f"{prefix}:rec:lost"
    assert key_slot(same.encode()) == key_slot(b"res") != key_slot(other.encode())
    for key in (same, other, lost_rec):
        c.set(key, "x", px=2000)
    lease = mutex.acquire("res", companion_keys=(same, other))
    lost = mutex.acquire("gone", companion_keys=(lost_rec,))
    mutex.storage.force_release("gone")
    renewer().renew_now([lease, lost])
    assert not lease.lost and lost.lost
    assert c.pttl(same) > 29_000 and c.pttl(other) > 29_000
    assert 0 < c.pttl(lost_rec) <= 2000
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

