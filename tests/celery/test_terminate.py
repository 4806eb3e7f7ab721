"""``revoke(terminate=True)`` and hard time limits on a real ``celery worker -P prefork``.

The worker's main process learns of these before the child running the task has stopped
(``task_revoked`` / ``task_failure`` fire when the signal is sent). The task's leases must
stay held until that child has exited or moved on to another task; a child that survives the
signal releases them itself when its body ends. One worker with three processes serves the
module; the lease is 6 s, so a release by the main process (well under a second after the
child is gone) is told apart from expiry (at least 4 s after the child's last renewal).
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

import pytest
import redis
from celery.exceptions import TimeLimitExceeded

from celery_rediskit.integration import RedisKit

from .termapp import build_term
from .test_prefork import Workers

LEASE = 6.0
WAIT = 30
HERE = Path(__file__).parent


def _start_worker(url: str, prefix: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, RK_URL=url, RK_PREFIX=prefix, RK_LEASE=str(LEASE),
               PYTHONPATH=str(HERE))
    cmd = [sys.executable, "-m", "celery", "-A", "termapp", "worker", "-P", "prefork",
           "-c", "3", "-n", f"term-{prefix}@%h", "-Q", f"q-{prefix}", "-l", "warning",
           "--without-gossip", "--without-mingle", "--without-heartbeat"]
    return subprocess.Popen(cmd, env=env, cwd=HERE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def workers(redis_url: str) -> Iterator[Workers]:
    prefix = f"rkt-{uuid.uuid4().hex[:8]}"
    proc = _start_worker(redis_url, prefix)
    app = build_term(redis_url, prefix, LEASE)
    client = redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + 60
        while not app.control.ping(timeout=0.5):
            assert proc.poll() is None, "the worker exited at start"
            assert time.monotonic() < deadline, "the worker did not answer ping"
        yield Workers(app, prefix, client)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        app.close()
        client.close()


def _gone(pid: int) -> bool:
    """True once process ``pid`` has exited (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):  # the read fails if it is reaped after the open
        return True


def _key(workers: Workers, what: str, run: str) -> bytes | None:
    value = workers.client.get(f"{workers.prefix}:{what}:{run}")
    return value if value is None else bytes(value)


@pytest.mark.parametrize("how", ["term", "usr1"])
def test_terminated_body_that_survives_keeps_its_lock(workers: Workers, how: str) -> None:
    """(a) SIGTERM trapped by the body, (c) SIGUSR1 (``SoftTimeLimitExceeded``): the body
    cleans up for 2 s after the signal; a duplicate sent meanwhile must wait for it."""
    app, run = workers.app, uuid.uuid4().hex
    first = app.tasks["trapping"].delay(run, how, 2.0)
    workers.wait_for(lambda: _key(workers, "ready", run) is not None)
    if how == "term":
        first.revoke(terminate=True)
    else:
        first.revoke(terminate=True, signal="SIGUSR1")
    workers.wait_for(lambda: _key(workers, "signalled", run) is not None)
    # the main process has announced the revoke (task_revoked) by the time it is stored
    workers.wait_for(lambda: first.state in ("REVOKED", "SUCCESS"))
    name = workers.lock_name("trapping", run=run, how=how)
    # the lock must not be free while the body is still cleaning up (probe still entered)
    released_early = not workers.locked(name) and workers.probe(run).current == 1
    dup = app.tasks["trapping"].delay(run, "none")
    assert dup.get(timeout=WAIT) > 0
    probe = workers.probe(run)
    assert probe.runs == 2
    assert probe.peak == 1, "the duplicate ran beside the body cleaning up after the signal"
    assert not released_early, "released while the body was still cleaning up"
    assert not workers.locked(name)


def test_hard_time_limit_releases_once_the_child_is_gone(workers: Workers) -> None:
    """(b) billiard SIGTERMs, then SIGKILLs, a child past its hard time limit: the lock is
    held until the child is gone, then released at once by the main process."""
    app, run = workers.app, uuid.uuid4().hex
    result = app.tasks["hard_trapping"].delay(run)
    workers.wait_for(lambda: workers.probe(run).current == 1 and workers.pid_of(run) > 0)
    pid, name = workers.pid_of(run), workers.lock_name("hard_trapping", run=run)
    assert workers.locked(name)
    with pytest.raises(TimeLimitExceeded):
        result.get(timeout=WAIT)
    seen = time.monotonic()
    workers.wait_for(lambda: _key(workers, "at_term", run) is not None)
    assert _key(workers, "at_term", run) == b"held", "released before the child was stopped"
    workers.wait_for(lambda: not workers.locked(name), timeout=LEASE + 2)
    took = time.monotonic() - seen
    assert _gone(pid)
    assert took < LEASE / 2, f"freed after {took:.2f} s: by expiry, not by the main process"
    # released by task id (which drops the claims record right after), not by expiry
    claims = RedisKit.of(app).runtime().claims
    workers.wait_for(lambda: claims.held(result.id) == [], timeout=LEASE / 2)


def test_revoke_with_sigkill_frees_once_the_child_is_gone(workers: Workers) -> None:
    app, run = workers.app, uuid.uuid4().hex
    result = app.tasks["sleeper"].delay(run)
    workers.wait_for(lambda: workers.probe(run).current == 1 and workers.pid_of(run) > 0)
    pid, name = workers.pid_of(run), workers.lock_name("sleeper", run=run)
    assert workers.locked(name)
    result.revoke(terminate=True, signal="SIGKILL")
    took = workers.wait_for(lambda: not workers.locked(name), timeout=LEASE + 2)
    assert _gone(pid)
    assert took < LEASE / 2, f"freed after {took:.2f} s: by expiry, not by the main process"
    claims = RedisKit.of(app).runtime().claims
    workers.wait_for(lambda: claims.held(result.id) == [], timeout=LEASE / 2)
