"""A task's ``concurrency_limit`` is declared: a changed limit applies at the next acquire,
unless an operator set the semaphore's total (``celery rediskit permits``), until ``--reset``.

A redeploy is two builds of one app (``workerapp.py``) on one prefix whose task ``report``
declares another limit: the old deployment's prefork worker (a subprocess, declaring 5) still
runs its tasks while the new deployment's worker (in this process, declaring 2) starts its own.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.bin.base import CLIContext
from click.testing import CliRunner

from celery_rediskit.integration import RedisKit
from celery_rediskit.integration.cli import rediskit

from .conftest import WorkerFactory
from .probe import Probe
from .workerapp import build

HERE = Path(__file__).parent
LEASE = 10.0
WAIT = 30


def _until(what: Callable[[], bool], timeout: float = WAIT) -> None:
    """Wait for a condition that Redis or a worker makes true (checked every 10 ms)."""
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _permits_cli(app: Celery, *args: str) -> dict[str, Any]:
    """``celery -A app rediskit permits ... --json``, through the CLI's own entry point."""
    result = CliRunner().invoke(
        rediskit, ["permits", *args, "--json"],
        obj=CLIContext(app=app, no_color=True, workdir=None, quiet=True),
    )
    assert result.exit_code == 0, (result.output, result.exception)
    data: dict[str, Any] = json.loads(result.output)
    return data


def _notes(caplog: pytest.LogCaptureFixture, key: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == "celery_rediskit.semaphore" and repr(key) in r.getMessage()]


@pytest.fixture
def old_worker(redis_url: str, prefix: str) -> Iterator[Celery]:
    """The old deployment: a prefork worker whose ``report`` declares ``reports:5``, and the
    app (built the same way) that sends to it."""
    env = {**os.environ, "RK_URL": redis_url, "RK_PREFIX": prefix, "RK_LEASE": str(LEASE),
           "RK_REPORTS_LIMIT": "5",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    node = f"old-{prefix}@localhost"
    cmd = [sys.executable, "-m", "celery", "-A", "workerapp", "worker", "-P", "prefork",
           "-c", "5", "-n", node, "-Q", f"q-{prefix}", "-l", "warning",
           "--without-gossip", "--without-mingle", "--without-heartbeat"]
    proc = subprocess.Popen(cmd, cwd=HERE, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    app = build(redis_url, prefix, LEASE, reports_limit=5)
    try:
        deadline = time.monotonic() + 60
        while not app.control.ping(destination=[node], timeout=0.5):
            assert proc.poll() is None, "the worker exited at start"
            assert time.monotonic() < deadline, "the worker did not answer ping"
        yield app
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        app.close()


def test_a_lowered_limit_applies_at_the_next_acquire_and_holders_keep_theirs(
    redis_url: str, prefix: str, client: redis.Redis, worker: WorkerFactory,
    old_worker: Celery, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="celery_rediskit.semaphore")
    new = build(redis_url, prefix, LEASE, reports_limit=2)
    new.conf.update(task_default_queue=f"q-{prefix}-new", worker_hijack_root_logger=False)
    started, run = f"{prefix}:started:r", "r"
    sems = RedisKit.of(new).runtime().semaphore_storage
    queue = sems.keys.semaphore("reports").queue

    def go(i: int) -> None:
        client.rpush(f"{prefix}:go:{run}:{i}", 1)

    try:
        holds = [old_worker.tasks["report"].delay(run, i, hold=True) for i in range(5)]
        _until(lambda: client.llen(started) == 5)
        assert sems.get_semaphore_info("reports").total == 5

        with worker(new, concurrency=4):
            jobs = [new.tasks["report"].delay(run, 10 + i) for i in range(4)]
            _until(lambda: client.llen(queue) == 4)  # all four tried, were refused, queued
            info = sems.get_semaphore_info("reports")
            assert info.total == 2, "the total stored at first use (5) still wins"
            assert info.acquired == 5  # the holders keep their permits

            for i in range(3):  # 5 -> 2 held: still no room under the new total of 2
                go(i)
                assert holds[i].get(timeout=WAIT) is True
            info = sems.get_semaphore_info("reports")
            assert (info.acquired, client.llen(queue), client.llen(started)) == (2, 4, 5)

            go(3)  # 1 held: one new body at a time until the last old one leaves
            assert holds[3].get(timeout=WAIT) is True
            _until(lambda: client.llen(started) >= 6)
            go(4)
            assert holds[4].get(timeout=WAIT) is True
            assert all(r.get(timeout=WAIT) is True for r in jobs)
        entries = [e.decode().split(":") for e in client.lrange(started, 0, -1)]
        running_at_start = {int(i): int(n) for i, n in entries}
        assert len(running_at_start) == 9
        assert all(running_at_start[10 + i] <= 2 for i in range(4)), running_at_start
        (note,) = _notes(caplog, "reports")
        assert note.levelno == logging.INFO and "was 5" in note.getMessage()
    finally:
        for i in range(5):
            go(i)
        new.close()


def test_an_operators_total_wins_until_reset(
    app: Celery, client: redis.Redis, prefix: str, worker: WorkerFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="celery_rediskit.semaphore")
    probe = Probe(client, prefix + ":pool")
    started = threading.Semaphore(0)
    go = threading.Event()

    @app.task(shared=False, concurrency_limit="pool:2", on_limited="wait", limit_timeout=60)
    def limited(i: int) -> int:
        probe.enter()
        started.release()
        go.wait(WAIT)
        probe.exit()
        return i

    sems = RedisKit.of(app).runtime().semaphore_storage
    queue = sems.keys.semaphore("pool").queue

    def run(n: int, running: int) -> None:
        """Start n bodies; see `running` of them start and the others queue; finish all."""
        go.clear()
        results = [limited.delay(i) for i in range(n)]
        for _ in range(running):
            assert started.acquire(timeout=WAIT)
        _until(lambda: client.llen(queue) == n - running)
        assert probe.current == running
        go.set()
        assert sorted(r.get(timeout=WAIT) for r in results) == list(range(n))
        for _ in range(n - running):
            assert started.acquire(timeout=WAIT)

    try:
        with worker(app, concurrency=5):
            run(3, 2)  # the declared 2
            changed = _permits_cli(app, "pool", "--set", "4")
            assert changed["total"] == 4
            run(5, 4)  # the operator's 4, though every task declares 2
            shown = _permits_cli(app, "pool")
            assert shown["total"] == 4

            reset = _permits_cli(app, "pool", "--reset")
            assert reset["total"] == 2, "after --reset the declared 2 applies again"
            run(3, 2)  # the declared 2 again
            info = sems.get_semaphore_info("pool")
            assert (info.total, info.pinned) == (2, False)
            assert changed["set_by_operator"] and shown["set_by_operator"]
            assert reset["set_by_operator"] is False
        # told once, though five acquires met the operator's total
        (note,) = _notes(caplog, "pool")
        assert note.levelno == logging.WARNING
        assert "4 permits an operator set" in note.getMessage()
    finally:
        go.set()
