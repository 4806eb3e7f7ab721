"""The main process's deferred releases (``children.py``), driven directly: real Redis, real
processes standing in for pool children, and Celery's own threaded timer.

The worker-level behaviour (terminate, hard time limit) is in ``test_terminate.py``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery.utils.timer2 import Timer

from celery_rediskit.integration import RedisKit
from celery_rediskit.integration.children import ChildWatch

from .conftest import make_app

WAIT = 10


class Setup:
    def __init__(self, app: Any) -> None:
        self.kit = RedisKit.of(app)
        self.rt = self.kit.runtime()
        self.watch: ChildWatch = self.kit.child_watch

    def hold(self, task_id: str, pid: int) -> str:
        """Take a lock for ``task_id`` and record it as process ``pid`` would."""
        name, owner = f"lock-{task_id}", f"owner-{task_id}"
        assert self.rt.mutex_storage.try_acquire(name, owner, 30.0) >= 1
        holder = f"@|{time.time():.3f}|{pid}|w@test|job"
        self.rt.claims.record(task_id, [("m", name, owner)], 60, holder)
        return name

    def locked(self, name: str) -> bool:
        return bool(self.rt.mutex_storage.is_locked(name))


@pytest.fixture
def setup(app: Any) -> Iterator[Setup]:
    timer = Timer(max_interval=0.05)
    s = Setup(app)
    s.watch.attach(timer)
    yield s
    s.watch.detach()
    timer.stop()


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def _wait(what: Any) -> float:
    start = time.monotonic()
    while not what():
        assert time.monotonic() - start < WAIT, f"timed out waiting for {what}"
        time.sleep(0.01)
    return time.monotonic() - start


def test_released_once_the_child_has_exited(setup: Setup, child: Any) -> None:
    name = setup.hold("t1", child.pid)
    setup.watch.defer("t1", child.pid)
    setup.watch.check()
    assert setup.locked(name) and setup.watch.pending() == {child.pid: {"t1"}}
    child.kill()  # not reaped: a zombie counts as exited
    assert _wait(lambda: not setup.locked(name)) < 2.0
    assert setup.watch.pending() == {}
    _wait(lambda: setup.rt.claims.held("t1") == [])  # dropped right after the release


def test_released_when_the_child_moves_on(setup: Setup, child: Any) -> None:
    name = setup.hold("t1", child.pid)
    setup.watch.accepted(child.pid, "t1")
    setup.watch.defer("t1", setup.watch.pid_of("t1") or 0)
    assert setup.locked(name)
    setup.watch.accepted(child.pid, "t1")  # the same task id again: a new run, left alone
    assert setup.locked(name)
    setup.watch.defer("t1", child.pid)
    setup.watch.accepted(child.pid, "t2")  # another task: the body of t1 has ended
    assert not setup.locked(name)
    assert setup.watch.pending() == {}


def test_only_the_record_of_that_process_is_released(setup: Setup, child: Any) -> None:
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        name = setup.hold("t1", other.pid)  # a later run of t1, in another process
        setup.watch.defer("t1", child.pid)
        child.kill()
        _wait(lambda: setup.watch.pending() == {})
        assert setup.locked(name)
    finally:
        other.kill()
        other.wait()


def test_a_child_already_gone_is_released_at_once(setup: Setup) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    name = setup.hold("t1", proc.pid)
    setup.watch.defer("t1", proc.pid)
    assert not setup.locked(name)


def test_the_child_is_found_from_the_claims_record(setup: Setup, child: Any) -> None:
    """Without the pool's acknowledgement (a task with its own ``Request`` class), the pid
    recorded with the claims tells which child to wait for."""
    name = setup.hold("t1", child.pid)
    setup.kit._release_when_stopped("t1", "test")
    assert setup.locked(name) and setup.watch.pending() == {child.pid: {"t1"}}
    child.kill()
    _wait(lambda: not setup.locked(name))


def test_without_a_worker_timer_the_check_is_explicit(redis_url: str, prefix: str,
                                                      child: Any) -> None:
    app = make_app(redis_url, prefix)
    try:
        s = Setup(app)
        name = s.hold("t1", child.pid)
        s.watch.defer("t1", child.pid)
        child.kill()
        child.wait()
        assert s.locked(name)  # nobody looks: the lease would expire
        s.watch.check()
        assert not s.locked(name)
    finally:
        app.close()
