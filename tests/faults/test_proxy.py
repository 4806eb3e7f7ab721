"""Each mode of the fault proxy does what it says, against a real Redis server."""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.faults.proxy import FaultProxy, local_port
from tests.faults.servers import FaultServer

PING = b"*1\r\n$4\r\nPING\r\n"


@pytest.fixture
def raw(fault_proxy: FaultProxy) -> Iterator[socket.socket]:
    """A plain socket connected through the proxy (sees resets and silences unfiltered)."""
    sock = socket.create_connection(("127.0.0.1", fault_proxy.port), timeout=5)
    yield sock
    sock.close()


def answered_within(sock: socket.socket, seconds: float) -> bool:
    ready, _, _ = select.select([sock], [], [], seconds)
    return bool(ready)


def round_trip(client: redis.Redis) -> float:
    started = time.monotonic()
    client.ping()
    return time.monotonic() - started


def test_traffic_passes_and_each_connection_is_listed(fault_proxy: FaultProxy) -> None:
    client = redis.Redis.from_url(fault_proxy.url)
    client.set("k", "v")
    assert client.get("k") == b"v"
    conn: Any = client.connection_pool.get_connection()
    port = local_port(conn._sock)
    [link] = fault_proxy.links()
    assert link.client_port == port
    assert not link.subscribed and not link.dropped
    assert link.bytes_up > 0 and link.bytes_down > 0
    client.close()


def test_delay_holds_each_direction_for_its_time(fault_proxy: FaultProxy) -> None:
    client = redis.Redis.from_url(fault_proxy.url)
    client.ping()
    fault_proxy.delay(0.3, 0.2)
    assert round_trip(client) >= 0.5
    fault_proxy.heal()
    assert round_trip(client) < 0.25
    client.close()


def test_delay_is_latency_not_a_queue_of_waits(fault_proxy: FaultProxy,
                                               raw: socket.socket) -> None:
    fault_proxy.delay(0.4, 0.0)
    started = time.monotonic()
    for _ in range(5):  # five writes in flight at once: each is held 0.4 s, not 0.4 s more
        raw.sendall(PING)
        time.sleep(0.02)
    received = b""
    while received.count(b"+PONG\r\n") < 5:
        received += raw.recv(1024)
    assert 0.4 <= time.monotonic() - started < 1.0
    assert received == b"+PONG\r\n" * 5  # order kept


def test_blackhole_hangs_the_client_without_closing_and_heal_delivers(
    fault_proxy: FaultProxy, raw: socket.socket, fault_server: FaultServer
) -> None:
    raw.sendall(PING)
    assert raw.recv(64) == b"+PONG\r\n"
    fault_proxy.blackhole()
    raw.sendall(PING)
    assert not answered_within(raw, 0.5)  # no reply and no EOF: the socket stays open
    timed_out = redis.Redis.from_url(fault_proxy.url, socket_timeout=0.3, retry=None)
    with pytest.raises(redis.TimeoutError):
        timed_out.ping()  # a new connection is accepted and hangs as well
    timed_out.close()
    direct = fault_server.client()
    assert any(c["cmd"] == "ping" for c in direct.client_list())  # the server still has it
    fault_proxy.heal()
    assert answered_within(raw, 5)
    assert raw.recv(64) == b"+PONG\r\n"  # held, not lost: like TCP after a partition heals
    direct.close()


def test_reset_closes_every_connection_with_an_rst(fault_proxy: FaultProxy,
                                                   raw: socket.socket) -> None:
    client = redis.Redis.from_url(fault_proxy.url)
    client.ping()
    raw.sendall(PING)
    assert raw.recv(64) == b"+PONG\r\n"
    assert fault_proxy.reset() == 2
    assert answered_within(raw, 5)
    with pytest.raises(ConnectionResetError):
        raw.recv(64)
    assert fault_proxy.links() == []
    client.ping()  # new connections pass
    client.close()


def test_drop_silences_one_pubsub_connection_and_nothing_else(
    fault_proxy: FaultProxy, fault_server: FaultServer
) -> None:
    client = redis.Redis.from_url(fault_proxy.url)
    direct = fault_server.client()
    ps: Any = client.pubsub()  # type: ignore[no-untyped-call]
    ps.subscribe("wake")
    assert ps.get_message(timeout=5)["type"] == "subscribe"
    direct.publish("wake", "one")
    assert ps.get_message(timeout=5)["data"] == b"one"
    port = local_port(ps.connection._sock)
    assert [link.subscribed for link in fault_proxy.links()] == [True]

    fault_proxy.drop(port)
    fault_proxy.heal()  # does not bring a dropped connection back
    assert direct.publish("wake", "two") == 1  # the server still counts the subscriber
    assert ps.get_message(timeout=1.0) is None  # ... but the message never arrives
    assert direct.pubsub_numsub("wake") == [(b"wake", 1)]
    assert ps.connection._sock is not None  # the client isn't told
    assert client.ping()  # other connections pass
    [dropped] = [link for link in fault_proxy.links() if link.client_port == port]
    assert dropped.dropped
    ps.close()
    client.close()
    direct.close()


def test_swallow_reply_runs_the_command_but_loses_its_reply(
    fault_proxy: FaultProxy, fault_server: FaultServer
) -> None:
    client = redis.Redis.from_url(fault_proxy.url, retry=Retry(NoBackoff(), 0))
    direct = fault_server.client()
    client.set("before", "1")  # a command without the match passes
    fault_proxy.swallow_reply(b"swallowed-key")
    with pytest.raises(redis.ConnectionError):
        client.incr("swallowed-key")
    assert direct.get("swallowed-key") == b"1"  # the server ran it once
    assert fault_proxy.swallowed == 1
    assert client.incr("swallowed-key") == 2  # one-shot: the next send passes
    client.close()
    direct.close()


def test_drop_of_an_unknown_connection_raises(fault_proxy: FaultProxy) -> None:
    with pytest.raises(LookupError):
        fault_proxy.drop(1)


def test_a_down_server_resets_connections_through_the_proxy(
    fault_proxy: FaultProxy, fault_server: FaultServer
) -> None:
    client = redis.Redis.from_url(fault_proxy.url, retry=None)
    client.ping()
    fault_server.stop()
    with pytest.raises(redis.ConnectionError):
        client.ping()
    with pytest.raises(redis.ConnectionError):
        client.ping()  # reconnecting: the proxy resets the connection the server refused
    assert fault_proxy.refused >= 1
    fault_server.start()
    assert client.ping()
    client.close()


def test_close_ends_connections_and_leaks_no_thread_or_socket(
    fault_server: FaultServer,
) -> None:
    before = {t.ident for t in threading.enumerate()}
    with FaultProxy(fault_server.port) as proxy:
        socks = [socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
                 for _ in range(3)]
        proxy.blackhole()  # even frozen connections are closed
        assert len(proxy.links()) == 3
    assert proxy.open_sockets() == 0
    assert {t.ident for t in threading.enumerate()} <= before
    for sock in socks:
        assert answered_within(sock, 5)
        assert sock.recv(64) == b""
        sock.close()
    with pytest.raises(RuntimeError):
        proxy.heal()
