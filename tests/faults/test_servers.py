"""The server faults do what they say: restarts keep or lose the data, a stall stalls."""

from __future__ import annotations

import time

import pytest

from tests.faults.servers import FaultServer


def test_a_restart_of_a_persistent_server_keeps_acknowledged_writes(
    fault_server: FaultServer,
) -> None:
    client = fault_server.client()
    client.set("kept", "1")
    client.incr("counter", 41)
    fault_server.restart(keep_data=True)
    assert client.get("kept") == b"1"
    assert client.incr("counter") == 42
    client.close()


def test_a_restart_without_data_comes_back_empty_on_the_same_port(
    fault_server: FaultServer,
) -> None:
    client = fault_server.client()
    client.set("gone", "1")
    fault_server.restart(keep_data=False)
    assert client.get("gone") is None
    assert client.dbsize() == 0
    client.close()


def test_a_non_persistent_server_refuses_a_restart_that_keeps_data() -> None:
    with FaultServer(persistent=False) as server, pytest.raises(ValueError, match="persistent"):
        server.restart(keep_data=True)


def test_a_stall_blocks_every_other_client_until_it_ends(fault_server: FaultServer) -> None:
    client = fault_server.client()
    client.ping()
    stall = fault_server.stall(0.6)
    client.ping()  # queued behind the DEBUG SLEEP
    answered = time.monotonic()
    assert stall.wait(10)
    assert stall.error is None
    assert stall.ended_at is not None
    assert answered - stall.sent_at >= 0.5
    client.close()
