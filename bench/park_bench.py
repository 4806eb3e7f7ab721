"""The park section: tasks blocked by a full limit park in Redis (``on_limited="park"``) vs
re-queue with a countdown (``on_limited="retry"``), in the same run.

Two ``celery worker -P prefork -c 4`` subprocesses serve one queue. For each limit (``"x:1"``,
``"x:4"``) and mode, ``N`` tasks of ``T`` seconds are sent at once; the wall time runs from
the first send to the last body's end. The ideal is ``N * T / permits``. Broker publishes are
counted on a broker Redis of the section's own (``INFO commandstats``: kombu publishes with
LPUSH), so the result backend and the library's keys (on the bench server) do not count;
events (the ``task-parked`` event, PUBLISH on the broker) are reported apart.

Targets: park reaches at least 0.9 of the ideal (ideal / wall), with at most 2 publishes per
task. Retry is reported for comparison. ``--scale`` scales ``N`` (1000 at 1.0, at least 100).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from .common import BenchEnv, SectionResult, Target, at_most

N = 1000
T = 0.05
WORKERS = 2
PROCESSES = 4
HERE = Path(__file__).resolve().parent


def _calls(client: Any) -> tuple[int, int]:
    """(LPUSH calls: task messages, PUBLISH calls: events) on the broker so far."""
    stats = client.info("commandstats")
    return (int(stats.get("cmdstat_lpush", {}).get("calls", 0)),
            int(stats.get("cmdstat_publish", {}).get("calls", 0)))


def _gaps(spans: list[tuple[float, float]], permits: int, since: float) -> list[float]:
    """Hand-off gaps (seconds) of bodies that started after ``since``: with ``permits``
    permits, in turn order, the k-th start took the permit the (k - permits)-th end freed."""
    starts = sorted(s for s, _ in spans)
    ends = sorted(e for _, e in spans)
    return [starts[k] - ends[k - permits] for k in range(permits, len(starts))
            if starts[k] >= since]


def _measure(app: Any, env: BenchEnv, broker: Any, name: str, n: int,
             permits: int = 1) -> tuple[float, float, float, float, float, list[float]]:
    """(wall seconds, broker publishes per task, steady ratio, events per task, seconds the
    sending took, hand-off gaps after the backlog) of ``n`` tasks ``name``.

    The steady ratio is ideal / wall counted from the moment the queue of sent messages is
    first empty (every task parked, re-queued or running) to the end: until then the workers
    receive and park (or re-queue) the backlog, on the same CPUs as the running tasks."""
    done = f"{env.prefix}:done"
    env.admin.set(done, 0)
    spans_key = f"{env.prefix}:spans"
    env.admin.delete(spans_key)
    task = app.tasks[name]
    queue = f"q-{env.prefix}"
    before = _calls(broker)
    start = time.perf_counter()
    with app.producer_or_acquire() as producer:  # one connection: sending costs the least
        for _ in range(n):
            task.apply_async((T,), ignore_result=False, producer=producer)
    sent = time.perf_counter() - start
    deadline = time.monotonic() + 20 * n * T + 120
    drained: tuple[float, int] | None = None
    while (count := int(env.admin.get(done) or 0)) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: only {count} of {n} tasks ran")
        if drained is None and broker.llen(queue) == 0:
            drained = (time.perf_counter(), count)
        time.sleep(0.01)
    end = time.perf_counter()
    since, count = drained or (start, 0)
    steady = (n - count) * T / permits / (end - since) if end > since else float("nan")
    after = _calls(broker)
    spans = [tuple(map(float, raw.split())) for raw in env.admin.lrange(spans_key, 0, -1)]
    wall_since = time.time() - (time.perf_counter() - since)  # the drain, as Unix time
    gaps = _gaps(spans, permits, wall_since)  # type: ignore[arg-type]
    return (end - start, (after[0] - before[0]) / n, steady, (after[1] - before[1]) / n,
            sent, gaps)


def _ms(values: list[float], q: float) -> str:
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000:.1f}"


def run(env: BenchEnv, log: Callable[[str], None]) -> SectionResult:
    from celery_rediskit.devserver import PrivateServer

    from .park_app import build

    res = SectionResult("park", "Park vs retry: 50 ms tasks under a full limit")
    n = max(100, int(N * env.scale))
    with PrivateServer() as broker_server:
        broker = redis.Redis.from_url(broker_server.url)
        worker_env = dict(os.environ, RKB_URL=env.url, RKB_BROKER=broker_server.url,
                          RKB_PREFIX=env.prefix,
                          PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
        procs = []
        for i in range(WORKERS):
            cmd = [sys.executable, "-m", "celery", "-A", "bench.park_app", "worker", "-P",
                   "prefork", "-c", str(PROCESSES), "-Q", f"q-{env.prefix}",
                   "-n", f"park{i}-{env.prefix}@%h", "-l", "error",
                   "--without-gossip", "--without-mingle", "--without-heartbeat"]
            procs.append(subprocess.Popen(cmd, env=worker_env, cwd=HERE.parent,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        app = build(env.url, broker_server.url, env.prefix)
        try:
            deadline = time.monotonic() + 60
            while len(app.control.ping(timeout=0.5)) < WORKERS:
                if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                    res.skipped = "the bench workers did not start"
                    return res
            for name in ("park1", "retry1", "park4", "retry4"):  # warm-up
                _measure(app, env, broker, name, 8, int(name[-1]))
            rows = []
            figures: dict[str, tuple[float, float, float]] = {}
            for permits in (1, 4):
                ideal = n * T / permits
                for mode in ("park", "retry"):
                    name = f"{mode}{permits}"
                    wall, publishes, steady, events, sent, gaps = _measure(
                        app, env, broker, name, n, permits)
                    p50, p90 = (_ms(gaps, 0.5), _ms(gaps, 0.9)) if gaps else ("-", "-")
                    figures[name] = (wall, ideal / wall, publishes)
                    log(f"park: {n} x {T * 1000:.0f} ms, limit x:{permits}, {mode}: "
                        f"{wall:.2f} s (sent in {sent:.2f} s; ideal {ideal:.2f} s, "
                        f"{ideal / wall:.2f}; after the "
                        f"backlog {steady:.2f}), {publishes:.2f} publishes/task, "
                        f"{events:.2f} events/task, hand-off after the backlog p50 {p50} ms, "
                        f"p90 {p90} ms")
                    rows.append([f'"x:{permits}"', mode, f"{wall:.2f} s", f"{sent:.2f} s",
                                 f"{ideal:.2f} s",
                                 f"{ideal / wall:.2f}", f"{steady:.2f}", f"{publishes:.2f}",
                                 f"{events:.2f}", f"{p50} / {p90}"])
            res.tables.append((
                f"{n} tasks of {T * 1000:.0f} ms, {WORKERS} prefork workers x {PROCESSES}",
                ["limit", "mode", "wall", "sending", "ideal (N*t/permits)", "ideal/wall",
                 "after backlog", "publishes/task", "events/task",
                 "hand-off p50 / p90 ms (after backlog)"], rows))
            for permits in (1, 4):
                wall, ratio, publishes = figures[f"park{permits}"]
                retry_wall = figures[f"retry{permits}"][0]
                res.targets.append(Target(
                    f'park, "x:{permits}": wall time against the ideal', f"{wall:.2f} s",
                    f"ideal {n * T / permits:.2f} s (retry {retry_wall:.2f} s)", ratio,
                    ">= 0.90 of ideal", bool(ratio >= 0.9)))
                res.targets.append(at_most(
                    f'park, "x:{permits}": broker publishes per task', publishes, 2.0,
                    "{:.2f}", f"retry {figures[f'retry{permits}'][2]:.2f}"))
            return res
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            app.close()
            broker.close()
