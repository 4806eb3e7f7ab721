"""Prometheus metrics: counted from the signals, served by a real prefork worker
(``rediskit_metrics_port``) summed over its pool processes, and the Redis gauges of
``celery -A proj rediskit metrics``, each scraped over HTTP."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeoutError
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from celery_rediskit.errors import ConfigurationError, LockTimeout
from celery_rediskit.integration import RedisKit, metrics
from celery_rediskit.integration.worker_metrics import fold_dead_files
from celery_rediskit.report import read_resources
from celery_rediskit.testing import free_port

from .conftest import in_process_worker, make_app
from .observeapp import HERE, WorkerProcess, build

WAIT = 30
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return parse(reply.read().decode())


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    return samples.get((metric, frozenset(labels.items())), 0.0)


# -- the signals drive the metrics (in this process) ----------------------------------------

@pytest.fixture
def registry() -> Iterator[CollectorRegistry]:
    reg = CollectorRegistry()
    metrics.enable(reg)
    yield reg
    metrics.disable()


def test_metrics_count_the_signals(registry: CollectorRegistry, redis_url: str,
                                   prefix: str) -> None:
    app = make_app(redis_url, prefix, retry_delay=0.05, retry_delay_max=0.1)

    @app.task(shared=False, singleton=True, concurrency_limit="tenant:{tenant}:2")
    def guarded(tenant: int) -> int:
        return tenant

    @app.task(shared=False, singleton=True, on_locked="skip")
    def skippable() -> str:
        return "ran"

    @app.task(shared=False, concurrency_limit="pool:1")
    def limited() -> str:
        return "ran"

    @app.task(shared=False, concurrency_limit="tight:1", on_limited="wait", limit_timeout=0.2)
    def impatient() -> str:
        return "ran"

    @app.task(shared=False, cache_ttl=60)
    def square(x: int) -> int:
        return x * x

    def get(metric: str, /, **labels: str) -> float:
        return registry.get_sample_value(metric, labels) or 0.0

    rt = RedisKit.of(app).runtime()
    try:
        with in_process_worker(app):
            assert [guarded.delay(t).get(timeout=WAIT) for t in (1, 2, 1)] == [1, 2, 1]
            with rt.mutex.acquire(skippable._rk_policy.singleton_name(
                    skippable.name, {}, (), {}), blocking=False):
                assert skippable.delay().get(timeout=WAIT) is None
            with rt.semaphore(1).acquire("pool", blocking=False):
                requeued = limited.delay()
                deadline = time.monotonic() + WAIT
                while not get("rediskit_task_requeues_total", reason="limited", name="pool"):
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
            assert requeued.get(timeout=WAIT) == "ran"
            with rt.semaphore(1).acquire("tight", blocking=False), \
                    pytest.raises(LockTimeout):
                impatient.delay().get(timeout=WAIT)
            assert square.delay(3).get(timeout=WAIT) == 9
            assert square.delay(3).get(timeout=WAIT) == 9
    finally:
        app.close()
    lock = {"name": f"singleton:{guarded.name}", "kind": "lock"}
    tenant = {"name": "tenant:{tenant}", "kind": "semaphore"}
    assert get("rediskit_grants_total", **lock) == 3
    assert get("rediskit_grants_total", **tenant) == 3  # one label for tenants 1 and 2
    assert get("rediskit_acquire_wait_seconds_count", **tenant) == 3
    assert get("rediskit_hold_seconds_count", **tenant) == 3
    assert get("rediskit_hold_seconds_sum", **lock) > 0
    assert get("rediskit_tasks_skipped_total", reason="locked",
               name=f"singleton:{skippable.name}") == 1
    assert get("rediskit_task_requeues_total", reason="limited", name="pool") >= 1
    assert get("rediskit_acquire_timeouts_total", name="tight", kind="semaphore") == 1
    assert get("rediskit_cache_requests_total", task=square.name, result="miss") == 2
    assert get("rediskit_cache_requests_total", task=square.name, result="hit") == 1


def test_lost_leases_are_counted(registry: CollectorRegistry, redis_url: str,
                                 prefix: str) -> None:
    app = make_app(redis_url, prefix, lease=0.6)
    started, check = threading.Event(), threading.Event()

    @app.task(shared=False, bind=True, concurrency_limit="lost:{n}:1")
    def job(self: Any, n: int) -> bool:
        started.set()
        check.wait(WAIT)
        return bool(self.lease.lost)

    labels = {"name": "lost:{n}", "kind": "semaphore"}
    try:
        with in_process_worker(app):
            result = job.delay(3)
            assert started.wait(WAIT)
            RedisKit.of(app).runtime().semaphore_storage.clear("lost:3")  # taken away
            deadline = time.monotonic() + WAIT
            while not registry.get_sample_value("rediskit_leases_lost_total", labels):
                assert time.monotonic() < deadline
                time.sleep(0.02)
            check.set()
            assert result.get(timeout=WAIT) is True
    finally:
        check.set()
        app.close()
    assert registry.get_sample_value("rediskit_leases_lost_total", labels) == 1


def test_metrics_port_needs_a_port_number(redis_url: str) -> None:
    with pytest.raises(ConfigurationError, match="rediskit_metrics_port must be a TCP port"):
        build(redis_url, "bad", metrics_port="http")


# -- a prefork worker's endpoint -------------------------------------------------------------

class Served:
    def __init__(self, app: Celery, worker: WorkerProcess, port: int, prefix: str,
                 client: redis.Redis) -> None:
        self.app, self.worker, self.port, self.prefix = app, worker, port, prefix
        self.client = client

    def files_dir(self) -> Path:
        found = re.search(r"\(files in (\S+)\)", self.worker.output())
        assert found, self.worker.output()
        return Path(found.group(1))

    def scrape(self) -> Samples:
        return scrape(self.port)


@pytest.fixture(scope="module")
def served(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    prefix = f"rkm-{uuid.uuid4().hex[:8]}"
    port = free_port()
    app = build(redis_url, prefix)
    # every task in a new pool process: the sum must cover the exited ones too
    worker = WorkerProcess(redis_url, prefix, tmp_path_factory.mktemp("m") / "worker.log",
                           concurrency=2, metrics_port=port,
                           extra=("--max-tasks-per-child", "1"))
    client = redis.Redis.from_url(redis_url, socket_timeout=WAIT + 10)  # BLPOP up to WAIT
    try:
        worker.wait_ready(app)
        yield Served(app, worker, port, prefix, client)
    finally:
        worker.stop()
        app.close()
        client.close()


def test_worker_endpoint_sums_every_pool_process(served: Served) -> None:
    lock = {"name": "singleton:blocked", "kind": "lock"}
    before = served.scrape()
    results = [served.app.tasks["blocked"].delay(uuid.uuid4().hex) for _ in range(8)]
    try:
        pids = {r.get(timeout=WAIT) for r in results}
    except CeleryTimeoutError:  # seen twice under the parallel suite's load: say what it was
        states = {r.id: (r.state, served.client.exists(f"celery-task-meta-{r.id}"))
                  for r in results}
        raise AssertionError(f"results: {states}\nworker log:\n"
                             f"{served.worker.output()[-6000:]}") from None
    assert len(pids) == 8  # eight pool processes
    deadline = time.monotonic() + WAIT
    while any(Path(f"/proc/{pid}").exists() for pid in pids):  # each exits after its task
        assert time.monotonic() < deadline
        time.sleep(0.05)
    after = served.scrape()
    assert value(after, "rediskit_grants_total", **lock) - value(
        before, "rediskit_grants_total", **lock) == 8
    assert value(after, "rediskit_hold_seconds_count", **lock) - value(
        before, "rediskit_hold_seconds_count", **lock) == 8
    # the exited processes' files were folded into the archives and deleted
    files = {p.name for p in served.files_dir().iterdir()}
    pid_files = {int(m.group(1)) for f in files if (m := re.match(r"\w+?_(\d+)\.db$", f))}
    assert not pids & pid_files, (files, pids)
    assert {"counter_archive.db", "histogram_archive.db"} <= files
    assert served.scrape() == after  # a second fold changes nothing


def test_worker_endpoint_sees_a_running_pool_process(served: Served) -> None:
    run = uuid.uuid4().hex[:8]
    slot = {"name": "slot:{run}", "kind": "semaphore"}
    before = served.scrape()
    result = served.app.tasks["hold"].delay(run)
    assert served.client.blpop([f"{served.prefix}:started:{run}"], timeout=WAIT)
    during = served.scrape()  # counted by a process that is still running
    assert value(during, "rediskit_grants_total", **slot) - value(
        before, "rediskit_grants_total", **slot) == 1
    served.client.rpush(f"{served.prefix}:go:{run}", 1)
    result.get(timeout=WAIT)


def test_a_killed_pool_process_keeps_its_counts(served: Served) -> None:
    run = uuid.uuid4().hex[:8]
    slot = {"name": "slot:{run}", "kind": "semaphore"}
    before = served.scrape()
    served.app.tasks["hold"].delay(run)
    started = served.client.blpop([f"{served.prefix}:started:{run}"], timeout=WAIT)
    assert started
    pid = int(started[1])
    assert value(served.scrape(), "rediskit_grants_total", **slot) - value(
        before, "rediskit_grants_total", **slot) == 1
    os.kill(pid, signal.SIGKILL)  # the holder dies: its count must stay, its file go
    deadline = time.monotonic() + WAIT
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    after = served.scrape()
    assert value(after, "rediskit_grants_total", **slot) - value(
        before, "rediskit_grants_total", **slot) == 1
    assert not any(p.name.endswith(f"_{pid}.db") for p in served.files_dir().iterdir())


def test_a_taken_port_leaves_the_worker_running(served: Served, redis_url: str,
                                                tmp_path: Path) -> None:
    prefix = f"rkm2-{uuid.uuid4().hex[:8]}"
    app = build(redis_url, prefix)
    worker = WorkerProcess(redis_url, prefix, tmp_path / "worker.log", name="w3",
                           concurrency=1, metrics_port=served.port)  # the module's worker's
    try:
        worker.wait_ready(app)
        assert app.tasks["blocked"].delay("k").get(timeout=WAIT) > 0
        assert f"cannot serve metrics on 0.0.0.0:{served.port}" in worker.output()
    finally:
        worker.stop()
        app.close()
    assert not re.search(r"files in", worker.output())


def test_worker_endpoint_counts_requeues_skips_and_cache(served: Served) -> None:
    app = served.app
    rt = RedisKit.of(app).runtime()
    key = uuid.uuid4().hex
    before = served.scrape()

    def lock_name(task: str) -> str:
        t = app.tasks[task]
        p = t._rk_policy
        return str(p.singleton_name(t.name, p.bind((key,), {}), (key,), {}))

    with rt.mutex.acquire(lock_name("skippable"), blocking=False):
        assert app.tasks["skippable"].delay(key).get(timeout=WAIT) is None
    with rt.mutex.acquire(lock_name("blocked"), blocking=False):
        requeued = app.tasks["blocked"].delay(key)
        deadline = time.monotonic() + WAIT
        while not value(served.scrape(), "rediskit_task_requeues_total", reason="locked",
                        name="singleton:blocked") > value(
                before, "rediskit_task_requeues_total", reason="locked",
                name="singleton:blocked"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    requeued.get(timeout=WAIT)
    x = int(uuid.uuid4().int % 10**9)
    assert app.send_task("cached", (x,)).get(timeout=WAIT) == x * x  # a miss in the worker
    assert app.send_task("cached", (x,)).get(timeout=WAIT) == x * x  # a hit
    after = served.scrape()

    def delta(metric: str, /, **labels: str) -> float:
        return value(after, metric, **labels) - value(before, metric, **labels)

    assert delta("rediskit_tasks_skipped_total", reason="locked",
                 name="singleton:skippable") == 1
    assert delta("rediskit_cache_requests_total", task="cached", result="miss") == 1
    assert delta("rediskit_cache_requests_total", task="cached", result="hit") == 1


def test_worker_removes_its_files_when_it_stops(redis_url: str, prefix: str,
                                                tmp_path: Path) -> None:
    port = free_port()
    app = build(redis_url, prefix)
    worker = WorkerProcess(redis_url, prefix, tmp_path / "worker.log", name="w2",
                           concurrency=1, metrics_port=port)
    try:
        worker.wait_ready(app)
        assert app.tasks["blocked"].delay("k").get(timeout=WAIT) > 0
        assert value(scrape(port), "rediskit_grants_total", name="singleton:blocked",
                     kind="lock") == 1
        folder = Served(app, worker, port, prefix, None).files_dir()  # type: ignore[arg-type]
        assert folder.is_dir()
    finally:
        worker.stop()
        app.close()
    assert not folder.exists()


def test_fold_keeps_counts_of_exited_processes(tmp_path: Path) -> None:
    """Folding, on files written by real processes that have exited."""
    code = ("import os, sys; os.environ['PROMETHEUS_MULTIPROC_DIR'] = sys.argv[1]\n"
            "from prometheus_client import Counter\n"
            "Counter('rediskit_x', 'x', ['n']).labels('a').inc(int(sys.argv[2]))\n")
    for n in (2, 3):
        subprocess.run([sys.executable, "-c", code, str(tmp_path), str(n)], check=True)
    assert fold_dead_files(str(tmp_path)) == 2
    assert fold_dead_files(str(tmp_path)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter_archive.db"]
    subprocess.run([sys.executable, "-c", code, str(tmp_path), "4"], check=True)
    from prometheus_client.multiprocess import MultiProcessCollector
    reg = CollectorRegistry()
    MultiProcessCollector(reg, str(tmp_path))
    assert reg.get_sample_value("rediskit_x_total", {"n": "a"}) == 9


# -- the exporter ----------------------------------------------------------------------------

def _exporter(redis_url: str, prefix: str, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, RK_URL=redis_url, RK_PREFIX=prefix, PYTHONPATH=str(HERE))
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "observeapp", "rediskit", "metrics", *args],
        env=env, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_exporter_serves_the_gauges_while_a_worker_runs(served: Served,
                                                        redis_url: str) -> None:
    app, run = served.app, uuid.uuid4().hex[:8]
    rt = RedisKit.of(app).runtime()
    result = app.tasks["hold"].delay(run)  # holds a permit of slot:<run> in a pool process
    assert served.client.blpop([f"{served.prefix}:started:{run}"], timeout=WAIT)
    port = free_port()
    exporter = _exporter(redis_url, served.prefix, "--port", str(port))
    extra = rt.semaphore(3).acquire(f"slot:{run}", blocking=False)
    adhoc = rt.mutex.acquire(f"adhoc-{run}", blocking=False)  # a lock no task declares
    lines: list[str] = []
    try:
        reader = threading.Thread(target=lambda: lines.extend(exporter.stdout or ()),
                                  daemon=True)
        reader.start()
        deadline = time.monotonic() + WAIT
        while not any("serving" in line for line in lines):
            assert exporter.poll() is None, lines
            assert time.monotonic() < deadline, lines
            time.sleep(0.05)
        samples = scrape(port)
        slots = read_resources(served.client, served.prefix, "slot:*", include_idle=True)
        assert len(slots) >= 1  # earlier tests' semaphores of this name count too
        assert value(samples, "rediskit_permits_total", name="slot:{run}") == 3 * len(slots)
        assert value(samples, "rediskit_permits_acquired", name="slot:{run}") == 2
        assert value(samples, "rediskit_locks_held", name="(other)") == 1
        extra.release()
        adhoc.release()
        samples = scrape(port)
        assert value(samples, "rediskit_permits_acquired", name="slot:{run}") == 1
        assert ("rediskit_locks_held", frozenset({("name", "(other)")})) not in samples
    finally:
        exporter.terminate()
        exporter.wait(10)
        served.client.rpush(f"{served.prefix}:go:{run}", 1)
    result.get(timeout=WAIT)


def test_exporter_reports_redis_down_and_back(private_server: Any) -> None:
    prefix = f"rkx-{uuid.uuid4().hex[:8]}"
    port = free_port()
    exporter = _exporter(private_server.url, prefix, "--port", str(port))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(exporter.stdout or ()), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + WAIT
        while not any("serving" in line for line in lines):
            assert exporter.poll() is None, lines
            assert time.monotonic() < deadline, lines
            time.sleep(0.05)
        assert value(scrape(port), "rediskit_redis_up") == 1
        private_server.stop()
        down = scrape(port)  # still answers, without the gauges
        assert value(down, "rediskit_redis_up") == 0
        assert not any(name == "rediskit_permits_total" for name, _ in down)
        private_server.start()
        deadline = time.monotonic() + WAIT
        while value(scrape(port), "rediskit_redis_up") != 1:  # the client reconnects
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        exporter.terminate()
        exporter.wait(10)
    assert sum("cannot read Redis" in line for line in lines) == 1, lines  # once per outage


def test_exporter_once_prints_the_gauges(redis_url: str, prefix: str) -> None:
    app = build(redis_url, prefix)
    rt = RedisKit.of(app).runtime()
    t = app.tasks["blocked"]
    name = t._rk_policy.singleton_name(t.name, {"key": "k"}, ("k",), {})
    try:
        with rt.mutex.acquire(name, blocking=False), \
                rt.semaphore(2).acquire("tenant:acme", blocking=False):
            out, _ = _exporter(redis_url, prefix, "--once").communicate(timeout=60)
    finally:
        app.close()
    samples = parse(out)
    assert value(samples, "rediskit_locks_held", name="singleton:blocked") == 1
    assert value(samples, "rediskit_permits_total", name="tenant:{tenant}") == 2
    assert value(samples, "rediskit_permits_acquired", name="tenant:{tenant}") == 1


def test_exporter_needs_a_port(redis_url: str, prefix: str) -> None:
    proc = _exporter(redis_url, prefix)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "--port is required" in out
