"""Which redis-py clients the Redis storages accept, checked where they are handed one.

Accepted: ``redis.Redis`` (a single server, TCP, TLS or Unix socket), ``redis.cluster.RedisCluster``
and a Sentinel-managed client (``Sentinel.master_for(name)``, a ``redis.Redis`` whose pool asks
the sentinels for the master at each new connection). Anything else fails at once with a
``ConfigurationError`` naming the argument, rather than later and obscurely inside a script
call: a URL string, an asyncio client (the library is synchronous: its renewer and waiters are
threads), a pipeline (it queues commands instead of sending them), the ``Sentinel`` object
itself, or a client of a Sentinel replica (``slave_for``: it refuses writes).
"""

from __future__ import annotations

from typing import TypeVar

import redis
from redis.client import Pipeline
from redis.cluster import ClusterPipeline, RedisCluster
from redis.sentinel import Sentinel

from ..errors import ConfigurationError

__all__ = ["check_client"]

C = TypeVar("C")

_ACCEPTED = ("a redis.Redis, a redis.cluster.RedisCluster or a Sentinel-managed client "
             "(Sentinel.master_for(name))")


def check_client(name: str, client: C) -> C:
    """Return ``client`` if the Redis storages can use it; else raise ``ConfigurationError``
    naming the argument ``name`` and what it should be."""
    if isinstance(client, (Pipeline, ClusterPipeline)):
        raise ConfigurationError(
            f"{name} must be {_ACCEPTED}, got a pipeline ({type(client).__name__}): pass the "
            f"client the pipeline was made from"
        )
    if isinstance(client, (redis.Redis, RedisCluster)):
        if getattr(getattr(client, "connection_pool", None), "is_master", True) is False:
            raise ConfigurationError(
                f"{name} is a client of a Sentinel replica (Sentinel.slave_for), which refuses "
                f"writes: use Sentinel.master_for(name)"
            )
        return client
    hint = ""
    module = type(client).__module__ or ""
    if isinstance(client, (str, bytes)):
        hint = ": build a client from a URL with redis.Redis.from_url(url)"
    elif isinstance(client, Sentinel):
        hint = ": pass sentinel.master_for(<master name>)"
    elif module.startswith("redis.asyncio"):
        hint = ": asyncio clients are not supported, use the synchronous redis.Redis"
    raise ConfigurationError(f"{name} must be {_ACCEPTED}, got {client!r}{hint}")
