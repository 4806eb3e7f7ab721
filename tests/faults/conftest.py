"""Fixtures of the fault kit: a private Redis that may be killed and stalled, a fault proxy in
front of it, and lock holders in child processes that may be paused."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest

from tests.faults.holders import HolderProcess
from tests.faults.proxy import FaultProxy
from tests.faults.servers import FaultServer


@pytest.fixture
def fault_server() -> Iterator[FaultServer]:
    """A private, persistent Redis with DEBUG enabled (restart it, wipe it, stall it)."""
    with FaultServer(persistent=True) as server:
        yield server


@pytest.fixture
def fault_proxy(fault_server: FaultServer) -> Iterator[FaultProxy]:
    """A fault proxy in front of ``fault_server``; clients connect to ``fault_proxy.url``.

    At teardown the proxy is closed, and its thread and sockets are checked to be gone."""
    with FaultProxy(fault_server.port) as proxy:
        yield proxy
    assert proxy.open_sockets() == 0
    assert not [t for t in threading.enumerate() if t.name == f"fault-proxy-{proxy.port}"]


@pytest.fixture
def spawn_holder() -> Iterator[Callable[..., HolderProcess]]:
    """``spawn_holder(url, prefix, key, lease, resource)`` starts a HolderProcess; each is
    resumed and killed at the end of the test."""
    made: list[HolderProcess] = []

    def spawn(url: str, prefix: str, key: str, lease: float, resource: str) -> HolderProcess:
        holder = HolderProcess(url, prefix, key, lease, resource)
        made.append(holder)
        return holder

    yield spawn
    for holder in made:
        holder.close()
