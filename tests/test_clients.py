"""The Redis storages take a synchronous redis-py client, plain, cluster or Sentinel-managed,
and refuse anything else at once with an error naming the argument.

(Sentinel-managed clients at work: tests/faults/test_sentinel.py; cluster clients: the cluster
tests.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
from redis.cluster import ClusterPipeline
from redis.sentinel import Sentinel

from celery_rediskit import ConfigurationError, RedisMutexStorage, RedisSemaphoreStorage
from celery_rediskit.cache import RedisCacheProvider
from celery_rediskit.report import read_resources

USERS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "mutex": ("client", lambda c: RedisMutexStorage(c, "rk")),
    "semaphore": ("client", lambda c: RedisSemaphoreStorage(c, "rk")),
    "cache": ("redis_client", lambda c: RedisCacheProvider(c, "rk")),
    "report": ("client", lambda c: read_resources(c, "rk")),
}


@pytest.fixture(params=sorted(USERS))
def user(request: pytest.FixtureRequest) -> tuple[str, Callable[[Any], Any]]:
    """(argument name, a call handing its argument to one of the Redis storages)."""
    return USERS[request.param]


@pytest.fixture
def wrong_clients(redis_url: str) -> Iterator[dict[str, tuple[Any, str]]]:
    """Things that are not a usable client, each with a word the error must say."""
    plain = redis.Redis.from_url(redis_url)
    sentinel = Sentinel([("127.0.0.1", 1)])
    yield {
        "url": (redis_url, "redis.Redis.from_url"),
        "asyncio client": (redis.asyncio.Redis.from_url(redis_url), "asyncio"),
        "pipeline": (plain.pipeline(), "pipeline"),
        # Only its type is looked at: no cluster needs to exist.
        "cluster pipeline": (ClusterPipeline.__new__(ClusterPipeline), "pipeline"),
        "Sentinel": (sentinel, "master_for"),
        "Sentinel replica": (sentinel.slave_for("m"), "replica"),  # never connected
        "None": (None, "redis.Redis"),
    }
    plain.close()


@pytest.mark.parametrize("what", ["url", "asyncio client", "pipeline", "cluster pipeline",
                                  "Sentinel", "Sentinel replica", "None"])
def test_anything_but_a_client_is_refused_naming_the_argument(
    user: tuple[str, Callable[[Any], Any]], wrong_clients: dict[str, tuple[Any, str]],
    what: str,
) -> None:
    argument, make = user
    value, says = wrong_clients[what]
    with pytest.raises(ConfigurationError, match=argument) as caught:
        make(value)
    assert says in str(caught.value)


def test_a_plain_client_and_a_sentinel_managed_one_are_accepted(redis_url: str) -> None:
    plain = redis.Redis.from_url(redis_url)
    managed = Sentinel([("127.0.0.1", 1)]).master_for("m")  # not reached: only looked at
    for _, make in USERS.values():
        if make is not USERS["report"][1]:
            make(plain)
            make(managed)
    assert read_resources(plain, "rk-none") == []
    plain.close()
