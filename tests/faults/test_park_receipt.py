"""Parking on receipt (the worker's main process parks a blocked message before the pool
sees it) when Redis fails under it: a park whose reply is lost, a park whose outcome is
unknown, the broker connection its ``task-parked`` events go through broken. An in-process
worker whose rediskit client (or whose broker writes) go through the fault proxy, the rest
direct; every task must run exactly once."""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from celery.worker import state

from celery_rediskit.integration import RedisKit
from celery_rediskit.integration.parking import PARKED_EVENT, store_of
from tests.celery.conftest import in_process_worker
from tests.celery.test_events import Capture
from tests.faults.proxy import FaultProxy, local_port
from tests.faults.servers import FaultServer

WAIT = 30


def wait_for(what: Any, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


class Setup:
    """The app and its tasks; through the proxy go the rediskit client, or with
    ``broker_writes`` the connections that write to the broker instead (the producers and
    event dispatchers; the worker's consumer reads direct)."""

    def __init__(self, server: FaultServer, proxy: FaultProxy, *,
                 broker_writes: bool = False) -> None:
        self.prefix = f"rkpr-{uuid.uuid4().hex[:8]}"
        self.client = server.client()
        self.app = Celery(f"pr-{self.prefix}", broker=server.url, backend=server.url,
                          set_as_current=False)
        self.app.conf.update(task_default_queue=f"q-{self.prefix}",
                             worker_hijack_root_logger=False, worker_prefetch_multiplier=1,
                             result_expires=600)
        if broker_writes:
            self.app.conf.update(broker_read_url=server.url, broker_write_url=proxy.url)
        RedisKit(self.app, url=server.url if broker_writes else proxy.url,
                 prefix=self.prefix, socket_timeout=0.5, park_ahead_hold=0)
        runs, go = f"{self.prefix}:runs", f"{self.prefix}:go"
        client = self.client

        def body(task_id: str, hold: bool) -> None:
            client.rpush(runs, task_id)
            while hold and not client.blpop([go], timeout=1):
                pass

        @self.app.task(shared=False, name="holder", bind=True, concurrency_limit="r:1",
                       on_limited="park")
        def holder(self: Any, marker: str) -> None:
            body(self.request.id, True)

        @self.app.task(shared=False, name="waiter", bind=True, concurrency_limit="r:1",
                       on_limited="park", ignore_result=True)
        def waiter(self: Any, marker: str) -> None:
            body(self.request.id, False)

    def runs(self) -> Counter[str]:
        return Counter(x.decode() for x in self.client.lrange(f"{self.prefix}:runs", 0, -1))

    def idle(self) -> bool:
        store = store_of(RedisKit.of(self.app).runtime())
        return (not state.reserved_requests and not state.active_requests
                and self.client.llen(f"q-{self.prefix}") == 0
                and store.counts([("s", "r")]) == [(0, 0)])

    def go(self) -> None:
        self.client.rpush(f"{self.prefix}:go", 1)


@pytest.fixture
def setup(fault_server: FaultServer, fault_proxy: FaultProxy) -> Iterator[Setup]:
    s = Setup(fault_server, fault_proxy)
    yield s
    s.app.close()
    s.client.close()


def test_a_lost_reply_of_a_park_on_receipt_is_a_copy_dropped(setup: Setup,
                                                               fault_proxy: FaultProxy,
                                                               caplog: Any) -> None:
    """The park reached Redis, its reply did not: the main process sends it again, learns
    the task is parked already, and acknowledges the message; the parked one runs once."""
    s = setup
    caplog.set_level(logging.INFO, logger="celery_rediskit")
    with in_process_worker(s.app, concurrency=2):
        first = s.app.tasks["holder"].delay("-")
        wait_for(lambda: len(s.runs()) == 1)
        marker = uuid.uuid4().hex
        fault_proxy.swallow_reply(marker.encode())  # only the park carries the arguments
        second = s.app.tasks["waiter"].delay(marker)
        wait_for(lambda: fault_proxy.swallowed == 1)
        wait_for(lambda: "its task id is parked at 'r' already" in caplog.text)
        s.go()
        first.get(timeout=WAIT)
        wait_for(lambda: second.id in s.runs())
        wait_for(lambda: s.idle())
    assert s.runs() == Counter({first.id: 1, second.id: 1})
    assert "parked on receipt" not in caplog.text  # the first reply was lost


def test_a_park_on_receipt_of_unknown_outcome_goes_back_to_the_broker(
        setup: Setup, fault_proxy: FaultProxy, caplog: Any) -> None:
    """Redis stops answering as the park is sent (and sent again): the main process cannot
    know whether the message parked. It gives the message back to the broker; its next
    delivery, redelivered, goes to the pool, which drops it as a copy if it parked (the
    queued bytes reach Redis when the network heals) and runs it otherwise: once, either
    way."""
    s = setup
    caplog.set_level(logging.INFO, logger="celery_rediskit")
    with in_process_worker(s.app, concurrency=1):  # the holder keeps the pool's only thread
        first = s.app.tasks["holder"].delay("-")
        wait_for(lambda: len(s.runs()) == 1)
        fault_proxy.blackhole()
        try:
            second = s.app.tasks["waiter"].delay("-")  # ignore_result: no PARKED, no asking
            wait_for(lambda: "the message goes back to the broker" in caplog.text)
        finally:
            fault_proxy.heal()
        s.go()
        first.get(timeout=WAIT)
        wait_for(lambda: second.id in s.runs())
        # nothing left anywhere that could run it again: no request in the worker, no
        # message in the queue, no entry parked or being re-sent
        wait_for(lambda: s.idle())
    assert s.runs() == Counter({first.id: 1, second.id: 1})


def dispatcher_ports(dispatcher: Any) -> list[int]:
    """The local ports of the broker connections an event dispatcher holds (what
    ``FaultProxy.drop`` chooses a connection by)."""
    channel = dispatcher.producer.channel
    ports = []
    for pool in (channel._pool, channel._async_pool):
        if pool is not None:
            for conn in [*pool._available_connections, *pool._in_use_connections]:
                if conn._sock is not None:
                    ports.append(local_port(conn._sock))
    return ports


def test_a_park_on_receipt_after_its_event_connection_broke_still_sends_task_parked(
        fault_server: FaultServer, fault_proxy: FaultProxy, caplog: Any) -> None:
    """The worker's main process keeps the dispatcher (and broker connection) the
    ``task-parked`` events of its parks on receipt go through. That connection goes silent
    between two parks on receipt (a NAT forgetting it: no error, no reconnect by redis-py's
    pool, the send times out): the second park's event still arrives, once, through a new
    dispatcher, and each task runs once."""
    s = Setup(fault_server, fault_proxy, broker_writes=True)
    # a send on the silent connection fails after 2 s instead of never
    s.app.conf.broker_transport_options = {"socket_timeout": 2.0}
    caplog.set_level(logging.WARNING, logger="celery_rediskit")
    capture = Capture(s.app)
    try:
        with in_process_worker(s.app, concurrency=1):  # the holder keeps the only thread
            first = s.app.tasks["holder"].delay("-")
            wait_for(lambda: len(s.runs()) == 1)
            second = s.app.tasks["waiter"].delay("-")
            capture.wait_for(PARKED_EVENT, second.id)
            # its send over (the event can arrive before the reply does): the request ends
            # after the event and the acknowledgement
            wait_for(lambda: second.id not in {r.id for r in state.reserved_requests})
            rt = RedisKit.of(s.app).runtime()
            kept = rt._rk_events  # type: ignore[attr-defined]
            ports = dispatcher_ports(kept[1])
            assert ports
            for port in ports:
                fault_proxy.drop(port)
            third = s.app.tasks["waiter"].delay("-")
            (got,) = capture.wait_for(PARKED_EVENT, third.id)
            assert (got["resource"], got["kind"]) == ("r", "semaphore")
            assert rt._rk_events[1] is not kept[1]  # type: ignore[attr-defined]
            s.go()
            first.get(timeout=WAIT)
            wait_for(lambda: {second.id, third.id} <= set(s.runs()))
            wait_for(lambda: s.idle())
        assert s.runs() == Counter({first.id: 1, second.id: 1, third.id: 1})
        assert len(capture.of(PARKED_EVENT, second.id)) == 1
        assert len(capture.of(PARKED_EVENT, third.id)) == 1
        assert "sending the task-parked event" not in caplog.text  # the second try worked
    finally:
        capture.close()
        s.app.close()
        s.client.close()
