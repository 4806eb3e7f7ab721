"""``global_rate_limit`` across real ``celery worker -P prefork`` subprocesses.

300 tasks limited to 20/s on two workers: starts (on the Redis server's clock) come no faster
than 20/s, every task runs, and the broker carries at most 2 messages per task on average (the
send, and at most one re-queue with the exact countdown to the task's reserved slot), counted
as LPUSHes on the broker's own private server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import redis

from celery_rediskit.devserver import PrivateServer

from .rateapp import build

HERE = Path(__file__).parent
TASKS = 300
RATE = 20.0


def _start_worker(name: str, broker: str, url: str, prefix: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, RK_BROKER=broker, RK_URL=url, RK_PREFIX=prefix,
               PYTHONPATH=str(HERE))
    cmd = [sys.executable, "-m", "celery", "-A", "rateapp", "worker", "-P", "prefork",
           "-c", "2", "-n", f"{name}@%h", "-Q", f"q-{prefix}", "-l", "warning",
           "--without-gossip", "--without-mingle", "--without-heartbeat"]
    return subprocess.Popen(cmd, env=env, cwd=HERE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _publishes(broker: redis.Redis) -> int:
    stats = broker.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("lpush", "rpush"))


def test_three_hundred_tasks_start_no_faster_than_the_rate(
        private_server: PrivateServer, redis_url: str, client: redis.Redis) -> None:
    prefix = f"rkr-{uuid.uuid4().hex[:8]}"
    broker_url = private_server.url
    procs = [_start_worker(f"w{i}-{prefix}", broker_url, redis_url, prefix) for i in (1, 2)]
    app = build(broker_url, redis_url, prefix)
    broker = redis.Redis.from_url(broker_url)
    try:
        deadline = time.monotonic() + 60
        while len(app.control.ping(timeout=0.5)) < 2:
            assert all(p.poll() is None for p in procs), "a worker exited at start"
            assert time.monotonic() < deadline, "workers did not answer ping"
        before = _publishes(broker)
        results = [app.tasks["rated"].delay(i) for i in range(TASKS)]
        assert sorted(r.get(timeout=120) for r in results) == list(range(TASKS))
        messages = _publishes(broker) - before
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
        broker.close()
    rows = [r.split() for r in client.lrange(f"{prefix}:starts", 0, -1)]
    assert len(rows) == TASKS  # every task ran, once
    starts = sorted(int(t) / 1e6 for t, _ in rows)
    # A re-queued run starts at its reserved slot (server clock) or later, never before.
    behind = sorted(int(t) / 1e6 - float(at) for t, at in rows if float(at))
    assert behind[0] >= 0, behind[:3]
    # The re-queued runs' slots are one interval apart, none shared or skipped: every task
    # spent exactly one slot, and the first slot s0 is the last one less 299 intervals.
    interval = 1 / RATE
    slots = sorted(float(at) for _, at in rows if float(at))
    assert all(abs(b - a - interval) < 1e-5 for a, b in zip(slots, slots[1:], strict=False))
    s0 = slots[-1] - (TASKS - 1) * interval
    assert 0 <= starts[0] - s0 < 1.0
    # No faster than 20/s: the k-th start comes at least k slots after the first slot (the
    # k-th start is no earlier than the k-th slot, as no start precedes its own slot).
    early = [k for k, t in enumerate(starts) if t < s0 + k * interval - 1e-3]
    assert not early, [(k, starts[k] - s0) for k in early[:5]]
    # Windows of one second: the starts within one interval of their slot are at most 20 + 1;
    # a run a busy worker starts later than that may fall into a window with runs on time.
    on_time = sorted(int(t) / 1e6 for t, at in rows
                     if not float(at) or int(t) / 1e6 - float(at) <= interval)
    most, most_on_time = _densest(starts), _densest(on_time)
    span = starts[-1] - starts[0]
    late = sum(1 for b in behind if b > interval)
    p50, p99 = behind[len(behind) // 2] * 1000, behind[int(0.99 * len(behind))] * 1000
    print(f"\n{TASKS} tasks at {RATE:.0f}/s on 2 prefork workers: {span:.2f} s from first to "
          f"last start ({(TASKS - 1) / span:.2f}/s); behind their slot: p50 {p50:.0f} ms, "
          f"p99 {p99:.0f} ms, max {behind[-1] * 1000:.0f} ms ({late} more than one interval); "
          f"at most "
          f"{most} starts in one second ({most_on_time} of those on time); {messages} broker "
          f"messages ({messages / TASKS:.2f} per task)")
    assert most_on_time <= RATE + 1
    assert messages <= 2 * TASKS
    assert (TASKS - 1) / span > 0.9 * RATE  # and the budget is used: no needless waits


def _densest(times: list[float]) -> int:
    """The most of ``times`` (sorted, seconds) in any window (t - 1 s, t]."""
    most, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - 1.0:
            j += 1
        most = max(most, i - j + 1)
    return most
