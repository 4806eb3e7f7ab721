"""The cache on a 3-master Redis Cluster, tags included: an entry's tag bookkeeping lives in
its own slot, and revalidation reaches every master."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from redis.cluster import RedisCluster

from celery_rediskit._redis.slots import key_slot, slot_tag
from celery_rediskit.cache import (
    RedisCacheProvider,
    cache_tag,
    cached,
    get_cache_provider,
    revalidate_tag,
    set_cache_provider,
)
from tests.cluster.nodes import Cluster


@pytest.fixture
def provider(cluster_client: RedisCluster, cprefix: str) -> RedisCacheProvider:
    return RedisCacheProvider(cluster_client, prefix=cprefix)


def _per_master(cluster: Cluster, provider: RedisCacheProvider, count: int = 1) -> list[str]:
    names = cluster.names_per_master(provider.entry_key, count)
    assert len(names) == 3
    return [n for group in names.values() for n in group]


def test_tags_index_entries_in_their_own_slot_and_revalidate_on_every_master(
    cluster: Cluster, provider: RedisCacheProvider, cluster_client: RedisCluster
) -> None:
    names = _per_master(cluster, provider)
    for name in names:
        provider.set(name, name.upper(), ttl=60, tags=["users", "all"])
    provider.set("other", 1, ttl=60, tags=["admins", "all"])
    provider.set("plain", 2, ttl=60)
    for name in names:
        entry = provider.entry_key(name)
        tag_set = provider.keys.cache_tag_group(key_slot(entry)) + "users"
        assert key_slot(tag_set) == key_slot(entry), "tag bookkeeping left the entry's slot"
        assert cluster_client.zscore(tag_set, entry) is not None
    assert provider.revalidate_tag("users") == 3
    assert [provider.get(n) for n in names] == [None, None, None]
    assert provider.get("other") == 1 and provider.get("plain") == 2
    assert provider.revalidate_tag("users") == 0
    assert provider.revalidate_tag("all") == 1  # the others went with "users"
    assert provider.get("other") is None and provider.get("plain") == 2


def test_overwrite_delete_and_expire_keep_the_cluster_index_exact(
    cluster: Cluster, provider: RedisCacheProvider, cluster_client: RedisCluster
) -> None:
    name = _per_master(cluster, provider)[0]
    entry = provider.entry_key(name)
    tag_set = provider.keys.cache_tag_group(key_slot(entry)) + "t"
    provider.set(name, 1, ttl=60, tags=["t"])
    provider.set(name, 2, ttl=60)  # re-stored without the tag: out of its set
    assert cluster_client.exists(tag_set) == 0
    assert provider.revalidate_tag("t") == 0 and provider.get(name) == 2
    provider.set(name, 3, ttl=60, tags=["t"])
    assert provider.delete(name)
    assert cluster_client.exists(tag_set) == 0
    provider.set(name, 4, ttl=5, tags=["t"])
    assert provider.expire(name, 3600)
    directory = provider.keys.cache_tag_directory("t")
    group = slot_tag(key_slot(entry))
    server_now_ms = cluster_client.time()[0] * 1000  # type: ignore[index]
    # the directory and the entry's tag set now cover the new lifetime, not the old 5 s
    assert float(cluster_client.zscore(directory, group)) > server_now_ms + 3500 * 1000
    assert float(cluster_client.zscore(tag_set, entry)) > server_now_ms + 3500 * 1000
    assert cluster_client.pttl(directory) > 3500 * 1000
    assert provider.revalidate_tag("t") == 1


def test_fill_with_tags_then_revalidate(
    cluster: Cluster, provider: RedisCacheProvider
) -> None:
    names = _per_master(cluster, provider)
    for name in names:
        claim = provider.claim(name)
        assert claim.state == "owner"
        provider.fill(claim, name, 60, tags=["filled"])
    assert [provider.get(n) for n in names] == names
    assert provider.revalidate_tag("filled") == 3
    assert [provider.get(n) for n in names] == [None, None, None]


@pytest.fixture
def global_provider(provider: RedisCacheProvider) -> Iterator[RedisCacheProvider]:
    before = get_cache_provider()
    set_cache_provider(provider)
    yield provider
    set_cache_provider(before)


def test_memoised_function_tags_on_cluster(global_provider: RedisCacheProvider) -> None:
    calls: list[int] = []

    @cached(ttl=60)
    def square(n: int) -> int:
        calls.append(n)
        cache_tag("squares", f"n:{n}")
        return n * n

    assert [square(n) for n in range(6)] == [0, 1, 4, 9, 16, 25]
    assert [square(n) for n in range(6)] == [0, 1, 4, 9, 16, 25]
    assert len(calls) == 6
    assert revalidate_tag("n:2") == 1
    square(2)
    assert len(calls) == 7
    assert revalidate_tag("squares") == 6
    square(3)
    assert len(calls) == 8


def test_revalidate_is_atomic_per_slot_not_across_masters(
    cluster: Cluster, provider: RedisCacheProvider
) -> None:
    """The documented limit: while revalidate_tag runs, an entry on one master may be gone
    while one on another master is still served. A master whose writes are paused (CLIENT
    PAUSE WRITE) shows it; once the call returns, every entry is gone."""
    names = _per_master(cluster, provider)
    for name in names:
        provider.set(name, name, ttl=60, tags=["t"])
    paused_name = names[0]
    paused = cluster.owner(provider.entry_key(paused_name))
    others = [n for n in names if n != paused_name]
    result: dict[str, int] = {}
    with paused.client() as admin:
        admin.execute_command("CLIENT", "PAUSE", 3000, "WRITE")
        try:
            thread = threading.Thread(target=lambda: result.update(n=provider.revalidate_tag("t")))
            thread.start()
            end = time.monotonic() + 2.5
            while any(provider.get(n) is not None for n in others):
                assert time.monotonic() < end, "the unpaused masters were not revalidated"
                time.sleep(0.005)  # watching Redis state change: there is no event to wait on
            assert provider.get(paused_name) == paused_name  # not yet: its master is paused
        finally:
            admin.execute_command("CLIENT", "UNPAUSE")
    thread.join(10)
    assert result == {"n": 3}
    assert [provider.get(n) for n in names] == [None, None, None]


def test_every_entry_stored_before_revalidate_is_gone_after(
    cluster: Cluster, provider: RedisCacheProvider
) -> None:
    """Writers keep storing tagged entries on every master while the tag is revalidated:
    an entry whose set returned before revalidate_tag was called never survives it."""
    names = _per_master(cluster, provider, count=4)
    stop = threading.Event()
    done: dict[str, float] = {}  # value -> time.monotonic() when its set returned
    lock = threading.Lock()
    errors: list[BaseException] = []

    def writer(mine: list[str], tag: str) -> None:
        n = 0
        try:
            while not stop.is_set():
                for name in mine:
                    n += 1
                    value = f"{tag}-{name}-{n}"
                    provider.set(name, value, ttl=60, tags=["t", tag])
                    with lock:
                        done[value] = time.monotonic()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(names[i::2], f"w{i}")) for i in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(5):
            while len(done) < 20:
                assert not errors, errors
                time.sleep(0.001)  # let the writers store a few entries first
            started = time.monotonic()
            provider.revalidate_tag("t")
            survivors = {n: provider.get(n) for n in names}
            with lock:
                stale = {n: v for n, v in survivors.items()
                         if v is not None and done.get(v, float("inf")) < started}
            assert not stale, f"entries stored before revalidate_tag survived it: {stale}"
            done.clear()
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not errors
