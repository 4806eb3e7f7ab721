"""A holder paused past its lease comes back to find its writes refused by the fenced resource."""

from __future__ import annotations

from collections.abc import Callable

from celery_rediskit import RedisMutexStorage, create_mutex
from tests.faults.holders import FencedResource, FencedWrite, HolderProcess
from tests.faults.servers import FaultServer


def test_a_paused_holder_is_fenced_off_by_the_next_holders_token(
    fault_server: FaultServer, spawn_holder: Callable[..., HolderProcess], prefix: str
) -> None:
    lease = 1.0
    resource_key = f"{prefix}:resource"
    a = spawn_holder(fault_server.url, prefix, "res", lease, resource_key)
    assert a.write("A, before the pause") == FencedWrite(True, a.token)

    client = fault_server.client()
    resource = FencedResource(client, resource_key)
    mutex = create_mutex(timeout=10 * lease, lease=lease,
                         storage=RedisMutexStorage(client, prefix))
    a.pause()
    try:
        with mutex.lock("res") as b:  # granted once A's lease ran out, A being stopped
            assert b.fencing_token > a.token
            assert resource.write(b.fencing_token, "B") == FencedWrite(True, b.fencing_token)
            a.resume()
            assert a.write("A, after the pause") == FencedWrite(False, b.fencing_token)
            assert resource.read() == ("B", b.fencing_token)
    finally:
        a.resume()
        client.close()
