"""Parked tasks survive a crash at every step: real ``celery worker -P prefork`` subprocesses
killed (SIGKILL, the whole worker) at a named point (``RK_TEST_CRASH_AT``, see
``celery_rediskit/integration/crashpoints.py``), then a check that every task ran exactly once.

Each worker consumes a queue of its own, so a test decides which worker gets which task: the
holder of the limit on one, the tasks that park on another.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from celery_rediskit.integration import RedisKit
from celery_rediskit.integration.parking import store_of
from celery_rediskit.parking import PUBLISH_DEADLINE
from tests.faults.servers import FaultServer

from .parkapp import LEASE, build

WAIT = 60
HERE = Path(__file__).parent


class Cluster:
    """Workers of one test (started and killed by it), the app and a Redis client."""

    def __init__(self, url: str, prefix: str, tmp: Path, broker: str | None = None) -> None:
        self.url, self.prefix, self.tmp, self.broker = url, prefix, tmp, broker
        self.app: Celery = build(url, prefix, broker)
        self.client = redis.Redis.from_url(url)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.run = uuid.uuid4().hex[:8]

    def queue(self, name: str) -> str:
        return f"q-{self.prefix}-{name}"

    def start(self, name: str, *, queue: str | None = None, crash_at: str = "",
              concurrency: int = 2, extra: dict[str, str] | None = None,
              ) -> subprocess.Popen[bytes]:
        env = dict(os.environ, RK_URL=self.url, RK_PREFIX=self.prefix, PYTHONPATH=str(HERE),
                   **(extra or {}))
        if self.broker:
            env["RK_BROKER"] = self.broker
        if crash_at:
            env["RK_TEST_CRASH_AT"] = crash_at
        node = f"{name}-{self.prefix}@%h"
        cmd = [sys.executable, "-m", "celery", "-A", "parkapp", "worker", "-P", "prefork",
               "-c", str(concurrency), "-n", node, "-Q", self.queue(queue or name), "-l", "info",
               "--without-gossip", "--without-mingle", "--without-heartbeat"]
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        # a session of its own: a crash point kills the whole worker (its process group)
        proc = subprocess.Popen(cmd, env=env, cwd=HERE, stdout=log, stderr=log,
                                start_new_session=True)
        log.close()
        self.procs.append(proc)
        deadline = time.monotonic() + WAIT
        while not self.app.control.ping(destination=[node.replace("%h", os.uname()[1])],
                                        timeout=0.5):
            assert proc.poll() is None, self.log(name)
            assert time.monotonic() < deadline, "worker did not answer ping"
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def stop(self, proc: subprocess.Popen[bytes], *, signalled: bool = False) -> None:
        if not signalled:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def send(self, task: str, queue: str, hold: bool = False) -> Any:
        return self.app.tasks[task].apply_async((self.run, hold), queue=self.queue(queue))

    def runs(self) -> Counter[str]:
        key = f"{self.prefix}:runs:{self.run}"
        return Counter(x.decode() for x in self.client.lrange(key, 0, -1))

    def go(self) -> None:
        self.client.rpush(f"{self.prefix}:go:{self.run}", 1)

    def parked(self) -> int:
        store = store_of(RedisKit.of(self.app).runtime())
        return sum(store.counts([("s", f"pk-{self.run}")])[0])

    def ahead_waiter(self, task_id: str) -> str:
        """The waiter of ``task_id`` sent ahead ("" until its message arrived, or if not)."""
        store = store_of(RedisKit.of(self.app).runtime())
        raw = self.client.hget(store.key_list("s", f"pk-{self.run}")[6], task_id)
        return raw.decode().split("|")[4] if raw else ""

    def wait_for(self, what: Any, timeout: float = WAIT) -> float:
        start = time.monotonic()
        while not what():
            assert time.monotonic() - start < timeout, f"timed out waiting for {what}"
            time.sleep(0.02)
        return time.monotonic() - start

    def close(self) -> None:
        live = [proc for proc in self.procs if proc.poll() is None]
        for proc in live:  # every warm shutdown at once: the test's end waits for the slowest
            proc.send_signal(signal.SIGTERM)
        for proc in live:
            self.stop(proc, signalled=True)
        self.app.close()
        self.client.close()


@pytest.fixture
def cluster(redis_url: str, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(redis_url, f"rkpc-{uuid.uuid4().hex[:8]}", tmp_path)
    yield c
    c.close()


@pytest.mark.parametrize(("point", "task"), [
    ("park:received-after-park", "waiter"),  # parked on receipt by the main process
    ("park:received-after-park", "early"),   # the same, with early acknowledgement
    ("park:after-park", "waiter2"),          # its first limit free: parked by its run
])
def test_killed_after_parking_before_the_ack(cluster: Cluster, point: str, task: str) -> None:
    """The worker dies after the park, before the acknowledgement. The broker delivers the
    message again; that copy is recognised and dropped, and the parked message runs once
    when the permit frees. A message parked on receipt (by the worker's main process) is
    acknowledged after the park even with early acknowledgement; one parked by its run is
    so with ``acks_late`` (with early acknowledgement Celery acknowledges when the pool
    process takes it: a crash before the park loses it, as for any task)."""
    c = cluster
    c.start("b")
    holder = c.send("holder", "b", hold=True)
    c.wait_for(lambda: len(c.runs()) == 1)
    a = c.start("a", crash_at=point)
    waiter = c.send(task, "a")
    assert a.wait(WAIT) == -signal.SIGKILL
    assert c.parked() == 1
    # the message was not acknowledged: the broker delivers it again to the next worker
    c.start("a2", queue="a")
    c.wait_for(lambda: "a redelivered copy of a parked message" in c.log("a2"))
    assert c.parked() == 1
    c.go()
    assert holder.get(timeout=WAIT) == holder.id
    assert waiter.get(timeout=WAIT) == waiter.id
    assert c.runs() == Counter({holder.id: 1, waiter.id: 1})


def test_killed_between_take_and_publish(cluster: Cluster) -> None:
    """The releasing worker dies after taking the next parked message (reserving the permit
    for it), before publishing it: another worker's sweeper re-sends it once its publish
    deadline passes."""
    c = cluster
    c.start("b")
    a = c.start("a", crash_at="release:after-take")
    c.send("early", "a", hold=True)
    c.wait_for(lambda: len(c.runs()) == 1)
    waiting = [c.send("early", "b") for _ in range(3)]
    c.wait_for(lambda: c.parked() == 3)
    released = time.monotonic()
    c.go()
    assert a.wait(WAIT) == -signal.SIGKILL
    for r in waiting:
        assert r.get(timeout=WAIT) == r.id
    assert time.monotonic() - released < PUBLISH_DEADLINE + 2 + LEASE
    runs = c.runs()
    assert len(runs) == 4 and set(runs.values()) == {1}


def test_killed_after_publish_before_marking_sent(cluster: Cluster) -> None:
    """The releasing worker dies after publishing, before marking the message sent: a sweep
    re-sends it (the same dispatch id), so the queue holds two copies. The first adopts the
    reservation and runs; the second finds its entry gone and is dropped."""
    c = cluster
    b = c.start("b")
    a = c.start("a", crash_at="release:after-publish")
    c.send("early", "a", hold=True)
    c.wait_for(lambda: len(c.runs()) == 1)
    waiting = [c.send("early", "b") for _ in range(2)]
    c.wait_for(lambda: c.parked() == 2)
    c.stop(b)  # nobody consumes the re-sent message until both copies are queued
    c.go()
    assert a.wait(WAIT) == -signal.SIGKILL
    time.sleep(PUBLISH_DEADLINE + 0.2)  # the publish deadline of the taken entry passes
    assert RedisKit.of(c.app).sweeper.sweep_once() == 1  # any worker's sweep does this
    assert c.client.llen(c.queue("b")) == 2  # two copies of the first waiting task
    c.start("b2", queue="b")
    for r in waiting:
        assert r.get(timeout=WAIT) == r.id
    c.wait_for(lambda: "ran already or runs" in c.log("b2"))
    runs = c.runs()
    assert len(runs) == 3 and set(runs.values()) == {1}


@pytest.fixture
def fault_server() -> Iterator[FaultServer]:
    with FaultServer(persistent=True) as server:
        yield server


def test_broker_down_while_resending(redis_url: str, tmp_path: Path,
                                     fault_server: FaultServer) -> None:
    """The broker is down when the holder releases: publishing the next parked task fails,
    the entry stays taken, and the sweeper publishes it once the broker is back."""
    c = Cluster(redis_url, f"rkpc-{uuid.uuid4().hex[:8]}", tmp_path, broker=fault_server.url)
    try:
        c.start("b")
        holder = c.send("early", "b", hold=True)
        c.wait_for(lambda: len(c.runs()) == 1)
        waiting = [c.send("early", "b") for _ in range(2)]
        c.wait_for(lambda: c.parked() == 2)
        fault_server.stop()
        c.go()
        c.wait_for(lambda: "(a sweep sends it again)" in c.log("b"))
        assert c.parked() == 2  # nothing lost: the first is taken, the second still parked
        fault_server.start()  # the queued messages were persisted: the broker comes back whole
        for r in waiting:
            assert r.get(timeout=WAIT) == r.id
        runs = c.runs()
        assert set(runs) == {holder.id, *(r.id for r in waiting)}
        assert set(runs.values()) == {1}
    finally:
        c.close()


def test_redis_restart_with_persistence_loses_nothing(tmp_path: Path,
                                                      fault_server: FaultServer) -> None:
    """Redis (broker, results and the parked queue in one persistent server) restarts while
    tasks are parked: they are all there afterwards and each runs once."""
    c = Cluster(fault_server.url, f"rkpc-{uuid.uuid4().hex[:8]}", tmp_path)
    try:
        c.start("b")
        holder = c.send("early", "b", hold=True)
        c.wait_for(lambda: len(c.runs()) == 1)
        waiting = [c.send("early", "b") for _ in range(3)]
        c.wait_for(lambda: c.parked() == 3)
        fault_server.restart(keep_data=True, down_for=1.0)
        c.client = fault_server.client()
        assert c.parked() == 3
        c.go()
        # (the test's own result listener lost its connection in the restart: poll instead)
        ids = [holder.id, *(r.id for r in waiting)]
        c.wait_for(lambda: all(c.client.get(f"celery-task-meta-{i}") and
                               b'"SUCCESS"' in c.client.get(f"celery-task-meta-{i}")
                               for i in ids))
        runs = c.runs()
        assert set(runs) == set(ids) and set(runs.values()) == {1}
    finally:
        c.close()


AHEAD = {"RK_AHEAD_HOLD": "600", "RK_AHEAD_WAIT": "600"}  # every release sends ahead


def test_killed_while_waiting_ahead(cluster: Cluster) -> None:
    """A task sent ahead waits in its worker for the release; the worker dies meanwhile. The
    release reserves the permit for it all the same (its last check-in is recent); a sweep
    re-sends its message once it did not adopt in time, and another worker runs it, once."""
    c = cluster
    c.start("b", extra=AHEAD)
    holder = c.send("holder", "b", hold=True)
    c.wait_for(lambda: len(c.runs()) == 1)
    c.start("c", extra=AHEAD)
    first = c.send("early", "c", hold=True)
    c.wait_for(lambda: c.parked() == 1)
    a = c.start("a", extra=AHEAD)
    second = c.send("early", "a")
    c.wait_for(lambda: c.parked() == 2)
    c.go()  # the holder ends: `first` gets the permit, `second` is sent ahead and waits on a
    c.wait_for(lambda: len(c.runs()) == 2 and c.ahead_waiter(second.id) != "")
    os.killpg(a.pid, signal.SIGKILL)
    a.wait()
    c.go()  # `first` ends
    c.start("a2", queue="a")
    assert holder.get(timeout=WAIT) == holder.id
    assert first.get(timeout=WAIT) == first.id
    assert second.get(timeout=WAIT) == second.id
    assert c.runs() == Counter({holder.id: 1, first.id: 1, second.id: 1})
    assert c.parked() == 0
