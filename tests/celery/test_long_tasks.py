"""Tasks that run longer than twice their lease keep their claims record (issue 11, item 4).

The claims record (``<prefix>:claims:<task id>``: what the task holds, and who runs it) is
written when the task takes its leases. It must live as long as the leases, however long the
task runs: the lock report, ``inspect rediskit_leases`` (for prefork children) and the release
by task id after a terminate all read it. It is renewed with the leases, in their renewal's
round trip, and deleted when the task ends.

Real ``celery worker -P prefork`` subprocesses (``workerapp.py``) with a 1 s lease, on a
Redis server of this module's own that publishes keyspace events: a release shows there as
``del`` (a lock) or ``zrem`` (a permit), a lease running out as ``expired`` or not at all.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from celery_rediskit import RedisMutexStorage, RedisSemaphoreStorage
from celery_rediskit._redis.scripts import load_script
from celery_rediskit.devserver import PrivateServer
from celery_rediskit.integration import RedisKit
from celery_rediskit.integration.control import lock_report
from celery_rediskit.renewal import renewer
from tests.roundtrips import RoundTripConnection

from .conftest import WorkerFactory, make_app
from .probe import Probe
from .workerapp import build

HERE = Path(__file__).parent
LEASE = 1.0
PAST = 3 * LEASE + 0.5  # well past 2 × lease, the lifetime of the record before the fix
WAIT = 30


class LongEnv:
    def __init__(self, url: str, prefix: str, app: Celery, client: redis.Redis,
                 node: str) -> None:
        self.url, self.prefix, self.app, self.client, self.node = url, prefix, app, client, node
        self.mutexes = RedisMutexStorage(client, prefix=prefix)
        self.semaphores = RedisSemaphoreStorage(client, prefix=prefix)

    def probe(self, run: str) -> Probe:
        return Probe(self.client, f"{self.prefix}:probe:{run}")

    def pid_of(self, run: str) -> int:
        return int(self.client.get(f"{self.prefix}:pid:{run}") or 0)

    def record(self, task_id: str) -> str:
        return f"{self.prefix}:claims:{task_id}"

    def wait_for(self, what: Any, timeout: float = WAIT) -> None:
        """Poll ``what()`` (state owned by other processes) until true."""
        deadline = time.monotonic() + timeout
        while not what():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)

    def held(self, task: str, run: str) -> tuple[str, str]:
        """(resource name, Redis key of its lease) that ``task`` takes for ``run``."""
        if task == "limited":
            name = f"db-{run}"
            return name, self.semaphores.renewal_key(name)
        t = self.app.tasks[task]
        p = t._rk_policy
        name = str(p.singleton_name(t.name, p.bind((), {"run": run}), (), {"run": run}))
        return name, self.mutexes.renewal_key(name)

    def send(self, task: str, run: str, seconds: float) -> Any:
        args = (run, 0, seconds) if task == "limited" else (run, seconds)
        return self.app.tasks[task].delay(*args)

    def keep_record_past_twice_the_lease(self, task_id: str, until: Any = None) -> float:
        """Assert the record of ``task_id`` exists throughout ``PAST`` seconds (or until
        ``until()``); the seconds watched."""
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < PAST:
            if until is not None and until():
                break
            assert self.client.exists(self.record(task_id)), (
                f"the claims record of the running task expired {elapsed:.1f} s in "
                f"(lease {LEASE} s)")
            time.sleep(0.05)
        return elapsed


def _start_worker(url: str, prefix: str, node: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, RK_URL=url, RK_PREFIX=prefix, RK_LEASE=str(LEASE),
               PYTHONPATH=str(HERE))
    cmd = [sys.executable, "-m", "celery", "-A", "workerapp", "worker", "-P", "prefork",
           "-c", "2", "-n", node, "-Q", f"q-{prefix}", "-l", "warning",
           "--without-gossip", "--without-mingle", "--without-heartbeat"]
    return subprocess.Popen(cmd, cwd=HERE, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


@pytest.fixture(scope="module")
def long_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LongEnv]:
    server = PrivateServer(extra_args=("--notify-keyspace-events", "Kgxz"))
    with server:
        prefix = f"rkl-{uuid.uuid4().hex[:8]}"
        node = f"long-{prefix}@localhost"
        proc = _start_worker(server.url, prefix, node)
        app = build(server.url, prefix, LEASE)
        client = redis.Redis.from_url(server.url)
        try:
            deadline = time.monotonic() + 60
            while not app.control.ping(destination=[node], timeout=0.5):
                assert proc.poll() is None, "the worker exited at start"
                assert time.monotonic() < deadline, "the worker did not answer ping"
            yield LongEnv(server.url, prefix, app, client, node)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            app.close()
            client.close()


@pytest.mark.parametrize("task", ["single", "limited", "single_queued"])
def test_a_task_running_past_twice_its_lease_keeps_its_record_until_it_ends(
    long_env: LongEnv, task: str
) -> None:
    env, run = long_env, uuid.uuid4().hex[:10]
    result = env.send(task, run, PAST + 2.0)
    env.wait_for(lambda: env.probe(run).current == 1)
    watched = env.keep_record_past_twice_the_lease(result.id, until=result.ready)
    assert watched >= PAST, f"the body ended {watched:.1f} s into the watch, too early to tell"
    result.get(timeout=WAIT)
    # deleted by the run itself before its result was stored: not left to expire
    assert not env.client.exists(env.record(result.id)), "the record outlived its task"


def _first_release_event(client: redis.Redis, key: str, act: Any, timeout: float) -> str | None:
    """Subscribe to the keyspace events of ``key``, call ``act()``, and return the first event
    that ends the lease there (``del``/``zrem`` by a release, ``expired`` or a reaping
    ``zremrangebyscore`` when it ran out), or None if none came within ``timeout``."""
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe(f"__keyspace@0__:{key}")
        pubsub.get_message(timeout=1.0)  # the subscription's confirmation
        act()
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = pubsub.get_message(timeout=left)
            if message is None:
                continue
            event = message["data"].decode()
            if event in ("del", "zrem", "expired", "zremrangebyscore"):
                return str(event)
        return None
    finally:
        pubsub.close()


@pytest.mark.parametrize("task", ["single", "limited"])
def test_past_twice_its_lease_a_task_is_reported_inspected_and_released_by_task_id(
    long_env: LongEnv, task: str
) -> None:
    env, run = long_env, uuid.uuid4().hex[:10]
    result = env.send(task, run, 60.0)
    env.wait_for(lambda: env.probe(run).current == 1 and env.pid_of(run) > 0)
    child = env.pid_of(run)
    name, lease_key = env.held(task, run)
    env.keep_record_past_twice_the_lease(result.id)

    # the lock report still names the task and its worker, and judges it (not stale)
    report = lock_report(env.app, name, ping_timeout=5)
    (resource,) = report.resources
    (holder,) = resource.holders
    assert (holder.task_id, holder.task_name, holder.worker, holder.pid) == (
        result.id, task, env.node, child)
    assert holder.stale is False and report.workers_alive == [env.node]

    # the worker lists the lease its prefork child holds
    replies = env.app.control.broadcast("rediskit_leases", reply=True, timeout=5,
                                        destination=[env.node])
    leases = [lease for reply in replies for lease in reply.get(env.node, [])]
    mine = [(lease["key"], lease["pid"], lease["task_name"]) for lease in leases
            if lease.get("task_id") == result.id]
    assert mine == [(name, child, task)], leases

    # terminate with SIGKILL: the child cannot clean up (with the default SIGTERM, billiard
    # raises SystemExit in it, and its own path releases), so only the worker's main process
    # can release, by task id, from the record; else the lease would be left to run out
    event = _first_release_event(
        env.client, lease_key, lambda: result.revoke(terminate=True, signal="SIGKILL"),
        timeout=10)
    assert event == ("del" if task == "single" else "zrem"), (
        f"after terminate the lease ended by {event!r}, not by a release by task id")
    env.wait_for(lambda: not env.client.exists(env.record(result.id)), timeout=5)


def test_renewal_keeps_the_record_in_its_one_round_trip_per_tick(
    redis_url: str, prefix: str, worker: WorkerFactory
) -> None:
    """In process (threads pool), on a connection that records its round trips: while a task
    holds a lock and a permit past twice its lease, every renewal is one EVALSHA, and the
    record stays."""
    app = make_app(redis_url, prefix, lease=LEASE)
    go, started = threading.Event(), threading.Event()

    @app.task(shared=False, singleton=True, singleton_key=(), concurrency_limit="pool:2")
    def holds() -> str:
        started.set()
        go.wait(30)
        return "done"

    rt = RedisKit.of(app).runtime()
    rt.client.script_load(load_script("renew_batch").source)  # no NOSCRIPT round trip later
    trips: list[list[str]] = []
    rt.client.connection_pool.connection_class = type(
        "Trips", (RoundTripConnection,), {"trips": trips})
    try:
        with worker(app, pool="threads", concurrency=2):
            result = holds.delay()
            assert started.wait(20)
            record = rt.claims.key(result.id)
            assert len(rt.claims.held(result.id)) == 2
            # the first renewal opens the renewal connection: count from the next one on
            deadline = time.monotonic() + WAIT
            while ["EVALSHA"] not in trips:
                assert time.monotonic() < deadline, trips
                time.sleep(0.02)
            trips.clear()
            ticks = renewer().ticks
            elapsed = 0.0
            begun = time.monotonic()
            while (elapsed := time.monotonic() - begun) < PAST:
                assert rt.client.exists(record), f"the record expired {elapsed:.1f} s in"
                time.sleep(0.05)
            renewals = [t for t in trips if t != ["EXISTS"]]
            ticks = renewer().ticks - ticks
            assert renewals and all(t == ["EVALSHA"] for t in renewals), renewals
            assert 3 <= len(renewals) <= ticks + 1, (renewals, ticks)
            go.set()
            assert result.get(timeout=WAIT) == "done"
            assert not rt.client.exists(record)
    finally:
        go.set()
        app.close()
