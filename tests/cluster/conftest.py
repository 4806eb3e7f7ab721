"""Fixtures of the Redis Cluster tests: one private 3-master cluster for the session, and key
names chosen to land on each of its masters.

The session cluster is shared: tests that move slots put them back, and each test uses its
own key prefix. A test that kills a node starts a cluster of its own (``Cluster`` from
``nodes.py``). Without a server binary the whole folder is skipped, with the reason shown.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from redis.cluster import RedisCluster

from celery_rediskit.devserver import find_server_binary
from tests.cluster.nodes import Cluster


def _binary_or_skip() -> str:
    try:
        return find_server_binary()
    except RuntimeError as exc:
        pytest.skip(f"Redis Cluster tests need a server binary: {exc}")


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """A private cluster of 3 masters (no replicas) for the whole session."""
    _binary_or_skip()
    with Cluster(masters=3) as made:
        yield made


@pytest.fixture
def cluster_client(cluster: Cluster) -> Iterator[RedisCluster]:
    c = cluster.client()
    yield c
    c.close()


@pytest.fixture
def cprefix() -> str:
    """A key prefix unique to the test."""
    return f"rkc-{uuid.uuid4().hex[:8]}"
