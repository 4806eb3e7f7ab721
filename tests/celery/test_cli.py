"""The real ``celery`` command line: ``celery -A app rediskit ...`` and ``celery inspect
rediskit_leases``, run as subprocesses against a real prefork worker and Redis.

The app is ``workerapp.py`` (the one the prefork tests use), configured by ``RK_*``
environment variables, so the CLI, the workers and this test all build the same app.
"""

from __future__ import annotations

import json
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

from celery_rediskit import RedisMutexStorage, RedisSemaphoreStorage
from celery_rediskit.cache import RedisCacheProvider
from celery_rediskit.devserver import free_port
from celery_rediskit.lease import new_owner_id

from .workerapp import build

HERE = Path(__file__).parent
LEASE = 6.0
WAIT = 30


class Env:
    def __init__(self, url: str, prefix: str, app: Celery, client: redis.Redis,
                 node: str) -> None:
        self.url, self.prefix, self.app, self.client, self.node = url, prefix, app, client, node

    def env(self, **extra: str) -> dict[str, str]:
        base = {"RK_URL": self.url, "RK_PREFIX": self.prefix, "RK_LEASE": str(LEASE),
                "PYTHONPATH": str(HERE)}
        return {**os.environ, **base, **extra}

    def celery(self, *args: str, input: str | None = None, timeout: float = 60,
               **extra: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "celery", "-A", "workerapp", *args]
        return subprocess.run(cmd, cwd=HERE, env=self.env(**extra), capture_output=True,
                              text=True, input=input, timeout=timeout)

    def rediskit(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.celery("rediskit", *args, **kw)

    def ok(self, *args: str, **kw: Any) -> str:
        result = self.rediskit(*args, **kw)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result.stdout

    def json(self, *args: str, **kw: Any) -> Any:
        return json.loads(self.ok(*args, "--json", **kw))

    def lock_name(self, task: str, **kwargs: Any) -> str:
        t = self.app.tasks[task]
        p = t._rk_policy
        return str(p.singleton_name(t.name, p.bind((), kwargs), (), kwargs))

    def wait_for(self, what: Any, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)


def fails(result: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    """Assert a failure with exit status ``code`` and a one-line message naming ``words``."""
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines
    for word in words:
        assert word in lines[0], lines
    return lines[0]


def start_worker(env: Env, node: str, queue: str, **extra: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "celery", "-A", "workerapp", "worker", "-P", "prefork",
           "-c", "4", "-n", node, "-Q", queue, "-l", "warning",
           "--without-gossip", "--without-mingle", "--without-heartbeat"]
    return subprocess.Popen(cmd, cwd=HERE, env=env.env(**extra), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def wait_ping(app: Celery, node: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while not app.control.ping(destination=[node], timeout=0.5):
        assert proc.poll() is None, "the worker exited at start"
        assert time.monotonic() < deadline, "the worker did not answer ping"


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def env(redis_url: str) -> Iterator[Env]:
    prefix = f"rkc-{uuid.uuid4().hex[:8]}"
    node = f"cli-{prefix}@localhost"
    app = build(redis_url, prefix, LEASE)
    client = redis.Redis.from_url(redis_url)
    e = Env(redis_url, prefix, app, client, node)
    proc = start_worker(e, node, f"q-{prefix}")
    try:
        wait_ping(app, node, proc)
        yield e
    finally:
        stop(proc)
        app.close()
        client.close()


def test_commands_are_listed_in_help(env: Env) -> None:
    top = env.celery("--help")
    assert top.returncode == 0 and "rediskit" in top.stdout
    sub = env.rediskit("--help").stdout
    for command in ("locks", "release", "permits", "cache"):
        assert command in sub


def test_locks_and_inspect_show_running_tasks(env: Env) -> None:
    """A running singleton and three limited tasks: who holds what, from Redis and from the
    worker itself; nothing is stale while the worker answers."""
    run = uuid.uuid4().hex[:8]
    # the tasks run until the test lets them go (a loaded machine may take seconds per CLI call)
    single = env.app.tasks["single"].delay(run, 60.0)
    limited = [env.app.tasks["limited"].delay(run + "L", i, 60.0) for i in range(3)]
    lock_name = env.lock_name("single", run=run)
    sem_name = f"db-{run}L"

    def everything_held() -> bool:
        keys = {(r["kind"], r["key"], len(r["holders"])) for r in env.json("locks")}
        return {("lock", lock_name, 1), ("semaphore", sem_name, 3)} <= keys

    env.wait_for(everything_held)
    (lock,) = env.json("locks", "--pattern", lock_name)
    assert lock["kind"] == "lock" and lock["key"] == lock_name
    (holder,) = lock["holders"]
    assert holder["task_id"] == single.id and holder["task_name"] == "single"
    assert holder["worker"] == env.node and holder["stale"] is False
    assert holder["pid"] == int(env.client.get(f"{env.prefix}:pid:{run}") or 0)
    assert abs(holder["since"] - time.time()) < 10
    assert 0 < holder["remaining"] <= LEASE and lock["fencing_token"] >= 1
    (sem,) = env.json("locks", "--pattern", f"db-{run}*")
    assert sem["kind"] == "semaphore" and sem["key"] == sem_name
    assert (sem["total"], sem["acquired"], sem["available"]) == (3, 3, 0)
    assert {h["task_id"] for h in sem["holders"]} == {r.id for r in limited}
    assert {h["task_name"] for h in sem["holders"]} == {"limited"}

    table = env.ok("locks")
    assert lock_name in table and sem_name in table and "3/3 held" in table
    assert "STALE" not in table

    # the worker's own view: every lease with its last renewal (standard inspect options)
    result = env.celery("inspect", "rediskit_leases", "--json", "-d", env.node,
                        "--timeout", "5")
    assert result.returncode == 0, result.stderr
    replies = json.loads(result.stdout)
    leases = replies[env.node]
    by_task = {lease["task_id"]: lease for lease in leases}
    assert set(by_task) >= {single.id, *(r.id for r in limited)}
    mine = by_task[single.id]
    assert mine["kind"] == "lock" and mine["key"] == lock_name
    assert mine["task_name"] == "single" and mine["fencing_token"] == lock["fencing_token"]
    assert mine["last_renewed_ago"] is not None and 0 <= mine["last_renewed_ago"] <= LEASE
    assert abs(mine["last_renewed"] - time.time()) <= LEASE + 1
    text = env.celery("inspect", "rediskit_leases", "-d", env.node, "--timeout", "5")
    assert text.returncode == 0 and single.id in text.stdout

    env.client.rpush(f"{env.prefix}:go:{run}", 1)
    env.client.rpush(f"{env.prefix}:go:{run}L", 1, 1, 1)
    single.get(timeout=WAIT)
    for r in limited:
        r.get(timeout=WAIT)
    assert env.json("locks", "--pattern", lock_name) == []
    assert env.json("locks", "--pattern", sem_name) == []


def test_stale_holder_of_a_killed_worker_is_marked_and_released(env: Env) -> None:
    node = f"doomed-{env.prefix}@localhost"
    queue = f"doomed-{env.prefix}"
    # a long lease: the killed holder's lock would outlive the test without a release
    proc = start_worker(env, node, queue, RK_LEASE="120")
    try:
        wait_ping(env.app, node, proc)
        run = uuid.uuid4().hex[:8]
        res = env.app.tasks["single"].apply_async((run, 60.0), queue=queue)
        mutexes = RedisMutexStorage(env.client, prefix=env.prefix)
        name = env.lock_name("single", run=run)
        env.wait_for(lambda: any(r["holders"][0]["task_id"] == res.id
                                 for r in env.json("locks", "--pattern", name)))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole worker: nothing runs any cleanup
        proc.wait()
    (lock,) = env.json("locks", "--pattern", name, "--ping-timeout", "0.5")
    (holder,) = lock["holders"]
    assert holder["worker"] == node and holder["stale"] is True
    assert holder["remaining"] > 60
    table = env.rediskit("locks", "--pattern", name, "--ping-timeout", "0.5")
    assert "STALE" in table.stdout
    assert "no worker answered" in table.stderr

    key = lock["key"]
    assert key == name
    declined = env.rediskit("release", key, input="n\n")
    assert declined.returncode == 1
    assert mutexes.get_lock_info(key).locked
    # the Redis key, as printed by --json, is accepted too
    assert "released lock" in env.ok("release", lock["redis_key"], "--yes")
    assert not mutexes.get_lock_info(key).locked
    fails(env.rediskit("release", key, "--yes"), 1, "no held lock", key)
    assert env.json("locks", "--pattern", name) == []


def test_permits(env: Env) -> None:
    name = f"pool-{uuid.uuid4().hex[:6]}"
    sems = RedisSemaphoreStorage(env.client, prefix=env.prefix)
    sems.initialize(name, 2)
    owner = new_owner_id()
    sems.acquire(name, owner, 2, 30.0, 0)
    assert "total 2, 1 acquired, 1 available" in env.ok("permits", name)
    assert "total 2 -> 5" in env.ok("permits", name, "--increase", "3")
    assert env.json("permits", name, "--decrease", "1")["total"] == 4
    assert "set by an operator" in env.ok("permits", name)  # --increase/--decrease pin it
    reset = env.ok("permits", name, "--reset")
    assert "total 4 -> 2" in reset and "declared permits apply again" in reset
    assert env.json("permits", name, "--set", "7") == {
        "key": name, "total": 7, "acquired": 1, "available": 6, "previous_total": 2,
        "set_by_operator": True,
    }
    assert env.json("permits", name, "--decrease", "10")["total"] == 0

    fails(env.rediskit("permits", "no-such-sem", "--increase", "1"), 1, "no-such-sem")
    fails(env.rediskit("permits", name, "--increase", "0"), 2, "--increase")
    fails(env.rediskit("permits", name, "--set", "abc"), 2, "--set")
    fails(env.rediskit("permits", name, "--set", "1", "--reset"), 2, "--set", "--reset")
    fails(env.rediskit("permits", "bad{key}", "--reset"), 2, "bad{key}")
    fails(env.rediskit("permits", "bad\nkey", "--reset"), 2, "control character")

    # releasing permits: one holder, then every holder
    other = new_owner_id()
    sems.initialize(name, 3)
    sems.acquire(name, other, 3, 30.0, 0)
    assert "released 1 permit" in env.ok("release", name, "--yes", "--holder", owner)
    assert set(sems.get_semaphore_info(name).holders) == {other}
    assert "released 1 permit" in env.ok("release", name, "-y")
    assert sems.get_semaphore_info(name).holders == {}


def test_cache_stats_and_clear(env: Env) -> None:
    provider = RedisCacheProvider(env.client, prefix=env.prefix)
    provider.clear()
    provider.set("shop.price:aaa", 1, 60, tags=["sku:1"])
    provider.set("shop.price:bbb", 2, 60, tags=["sku:2"])
    provider.set("shop.stock:ccc", 3, 60)
    stats = env.json("cache", "stats")
    assert stats["entries"] == 3 and stats["tags"] == 2
    assert stats["by_function"] == {"shop.price": 2, "shop.stock": 1}
    assert "3 entries" in env.ok("cache", "stats")

    assert "dropped 1 entry tagged 'sku:1'" in env.ok("cache", "clear", "--tag", "sku:1")
    assert provider.get("shop.price:aaa") is None and provider.get("shop.price:bbb") == 2
    env.ok("cache", "clear")
    assert env.json("cache", "stats")["entries"] == 0


def test_unreachable_redis_is_one_line_and_fast(env: Env) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    for args in (("locks",), ("release", "x", "--yes"), ("permits", "x"),
                 ("cache", "stats"), ("cache", "clear")):
        started = time.monotonic()
        result = env.rediskit(*args, RK_URL=url)
        fails(result, 1, "cannot reach Redis")
        assert time.monotonic() - started < 15


def test_locks_stays_fast_with_100k_keys(env: Env) -> None:
    """100,000 other keys under the prefix: ``locks`` (SCAN, never KEYS) still finds the
    locks, well within a generous bound (the figure is printed with ``-s``)."""
    prefix = f"rkbig-{uuid.uuid4().hex[:8]}"
    names = [f"{prefix}:cache:e:{{cache/k{i}}}" for i in range(100_000)]
    pipe = env.client.pipeline(transaction=False)
    for i, key in enumerate(names):
        pipe.set(key, "x", ex=300)
        if i % 10_000 == 9_999:
            pipe.execute()
    pipe.execute()
    try:
        mutexes = RedisMutexStorage(env.client, prefix=prefix)
        for lock in ("alpha", "beta", "gamma"):
            mutexes.acquire(lock, new_owner_id(), 60.0, 0)
        started = time.monotonic()
        report = env.json("locks", "--no-ping", RK_PREFIX=prefix)
        elapsed = time.monotonic() - started
        baseline_started = time.monotonic()
        env.ok("locks", "--help")  # the same process start-up, without the command
        baseline = time.monotonic() - baseline_started
        assert [r["key"] for r in report] == ["alpha", "beta", "gamma"]
        print(f"\nlocks over 100k keys: {elapsed:.2f} s, of which process start-up "
              f"{baseline:.2f} s")
        assert elapsed < 20.0
    finally:
        for start in range(0, len(names), 10_000):
            env.client.unlink(*names[start:start + 10_000])


def test_inspect_in_process_leases_have_exact_renewal(app: Celery, worker: Any) -> None:
    """A threads-pool worker answers from its own renewer: leases of tasks in this process."""
    import threading

    from celery_rediskit.integration.control import lock_report

    go = threading.Event()
    started = threading.Event()

    @app.task(singleton=True, singleton_key=(), shared=False)
    def holds() -> str:
        started.set()
        go.wait(20)
        return "done"

    with worker(app, pool="threads", concurrency=2) as w:
        result = holds.delay()
        assert started.wait(20)
        replies = app.control.broadcast("rediskit_leases", reply=True, timeout=5,
                                        destination=[w.hostname])
        (reply,) = replies
        (lease,) = reply[w.hostname]
        assert lease["task_id"] == result.id and lease["task_name"] == holds.name
        assert lease["pid"] == os.getpid() and lease["kind"] == "lock"
        assert 0 <= lease["last_renewed_ago"] < lease["lease"]
        # the Python API: the same holder, as objects, not stale
        report = lock_report(app)
        (res,) = report.resources
        (holder,) = res.holders
        assert holder.task_id == result.id and holder.worker == w.hostname
        assert holder.stale is False and report.workers_alive == [w.hostname]
        go.set()
        assert result.get(timeout=WAIT) == "done"
    assert lock_report(app, ping=False).resources == []
