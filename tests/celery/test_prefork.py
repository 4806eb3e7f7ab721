"""Real ``celery worker -P prefork`` subprocesses: several workers, crashes and kills.

Two workers with four processes each serve one queue for the whole module; each test uses
its own ``run`` id, so keys and probes never mix. The lease is short (3 s) so that recovery
by expiry is observable within seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

from celery_rediskit.integration import RedisKit

from .probe import Probe
from .workerapp import build

LEASE = 3.0
WAIT = 30
HERE = Path(__file__).parent


class Workers:
    def __init__(self, app: Celery, prefix: str, client: redis.Redis) -> None:
        self.app, self.prefix, self.client = app, prefix, client

    def probe(self, run: str) -> Probe:
        return Probe(self.client, f"{self.prefix}:probe:{run}")

    def wait_for(self, what: Any, timeout: float = WAIT) -> float:
        """Poll ``what()`` (state owned by other processes) until true; seconds taken."""
        start = time.monotonic()
        while not what():
            if time.monotonic() - start > timeout:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.02)
        return time.monotonic() - start

    def lock_name(self, task: str, **kwargs: Any) -> str:
        t = self.app.tasks[task]
        p = t._rk_policy
        return str(p.singleton_name(t.name, p.bind((), kwargs), (), kwargs))

    def locked(self, name: str) -> bool:
        return bool(RedisKit.of(self.app).runtime().mutex_storage.is_locked(name))

    def pid_of(self, run: str) -> int:
        return int(self.client.get(f"{self.prefix}:pid:{run}") or 0)


def _start_worker(name: str, url: str, prefix: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, RK_URL=url, RK_PREFIX=prefix, RK_LEASE=str(LEASE),
               PYTHONPATH=str(HERE))
    cmd = [sys.executable, "-m", "celery", "-A", "workerapp", "worker", "-P", "prefork",
           "-c", "4", "-n", f"{name}@%h", "-Q", f"q-{prefix}", "-l", "warning",
           "--without-gossip", "--without-mingle", "--without-heartbeat"]
    return subprocess.Popen(cmd, env=env, cwd=HERE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def workers(redis_url: str) -> Iterator[Workers]:
    prefix = f"rkp-{uuid.uuid4().hex[:8]}"
    procs = [_start_worker(f"w{i}-{prefix}", redis_url, prefix) for i in (1, 2)]
    app = build(redis_url, prefix, LEASE)
    client = redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + 60
        while len(app.control.ping(timeout=0.5)) < 2:
            assert all(p.poll() is None for p in procs), "a worker exited at start"
            assert time.monotonic() < deadline, "workers did not answer ping"
        yield Workers(app, prefix, client)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        app.close()
        client.close()


def test_two_workers_twenty_delays_never_overlap(workers: Workers) -> None:
    app, run = workers.app, uuid.uuid4().hex
    results = [app.tasks["single"].delay(run, 0.02) for _ in range(20)]
    pids = {r.get(timeout=WAIT) for r in results}
    probe = workers.probe(run)
    assert probe.runs == 20 and probe.peak == 1
    assert len(pids) > 1  # more than one process took part

    queued = [app.tasks["single_queued"].delay(run + "q", 0.2) for _ in range(20)]
    assert {r.id for r in queued} == {queued[0].id}
    queued[0].get(timeout=WAIT)
    assert workers.probe(run + "q").runs == 1


def test_thirty_limited_tasks_never_more_than_three(workers: Workers) -> None:
    app, run = workers.app, uuid.uuid4().hex
    results = [app.tasks["limited"].delay(run, i, 0.15) for i in range(30)]
    # while the limited tasks queue up, a plain task still gets a worker slot at once:
    # blocked tasks are re-queued, not parked in a process
    workers.wait_for(lambda: workers.probe(run).current >= 3)
    started = time.monotonic()
    assert app.tasks["plain"].delay("free").get(timeout=WAIT) == "free"
    plain_latency = time.monotonic() - started
    assert sorted(r.get(timeout=60) for r in results) == list(range(30))
    probe = workers.probe(run)
    assert probe.peak == 3 and probe.runs == 30
    assert plain_latency < 1.0
    info = RedisKit.of(app).runtime().semaphore_storage.get_semaphore_info(f"db-{run}")
    assert info.available == 3


@pytest.mark.parametrize("task", ["single", "limited"])
def test_sigkill_frees_within_lease(workers: Workers, task: str) -> None:
    app, run = workers.app, uuid.uuid4().hex
    args = (run, 30.0) if task == "single" else (run, 0, 30.0)
    app.tasks[task].delay(*args)
    workers.wait_for(lambda: workers.probe(run).current == 1 and workers.pid_of(run) > 0)
    runtime = RedisKit.of(app).runtime()
    if task == "single":
        name = workers.lock_name("single", run=run)
        assert workers.locked(name)

        def free() -> bool:
            return not workers.locked(name)
    else:
        def free() -> bool:
            return runtime.semaphore_storage.get_semaphore_info(f"db-{run}").available == 3
        assert not free()
    os.kill(workers.pid_of(run), signal.SIGKILL)
    assert workers.wait_for(free, timeout=LEASE + 2) <= LEASE + 2


def test_revoke_terminate_releases_at_once(workers: Workers) -> None:
    app, run = workers.app, uuid.uuid4().hex
    result = app.tasks["single"].delay(run, 30.0)
    workers.wait_for(lambda: workers.probe(run).current == 1)
    name = workers.lock_name("single", run=run)
    assert workers.locked(name)
    result.revoke(terminate=True)
    # released by the main process (task_revoked), not by the lease running out
    assert workers.wait_for(lambda: not workers.locked(name)) < LEASE / 2


def test_hard_time_limit_releases(workers: Workers) -> None:
    app, run = workers.app, uuid.uuid4().hex
    result = app.tasks["hard_limited"].delay(run)
    workers.wait_for(lambda: workers.probe(run).current == 1)
    name = workers.lock_name("hard_limited", run=run)
    with pytest.raises(TimeLimitExceeded):
        result.get(timeout=WAIT)
    assert workers.wait_for(lambda: not workers.locked(name)) < LEASE / 2


def test_soft_time_limit_releases(workers: Workers) -> None:
    app, run = workers.app, uuid.uuid4().hex
    result = app.tasks["soft_limited"].delay(run)
    with pytest.raises(SoftTimeLimitExceeded):
        result.get(timeout=WAIT)
    assert not workers.locked(workers.lock_name("soft_limited", run=run))
