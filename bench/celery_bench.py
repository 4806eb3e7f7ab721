"""The Celery section: task throughput with the integration, against a plain task.

One ``celery worker -P prefork -c 2`` subprocess serves a private queue. Each of
``2 * rounds + 1`` rounds sends ``N`` tasks of each kind, in two halves ordered A B C C B A
(order rotated per round), waiting for every result of a half before the next:

- ``plain``: ``@app.task`` with no option (the baseline, on the same worker, same run);
- ``singleton``: ``singleton=True`` with a distinct argument per call (a lock per call: the
  claims record and the acquire in one round trip, the release in another);
- ``limited``: ``concurrency_limit="bench-db:64"`` (a permit per call, never full).

Targets: singleton and limited reach at least 0.85x the plain task's throughput (paired
per-round ratio). A cache hit (``cache_ttl``; served at ``delay()`` without a message) must be
faster than the round trip of a trivial task body.
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

from .common import (
    BenchEnv,
    SectionResult,
    Target,
    at_least,
    fmt_ms,
    median,
    paired_ratio,
    rotated,
)

N = 400
LATENCY_CALLS = 200
HERE = Path(__file__).resolve().parent


def _throughput(app: Any, name: str, n: int, round_no: int) -> float:
    task = app.tasks[name]
    start = time.perf_counter()
    results = [task.delay(f"{round_no}-{i}") for i in range(n)]
    for r in results:
        r.get(timeout=120)
    return n / (time.perf_counter() - start)


def _latency(call: Callable[[], Any], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        call()
    return (time.perf_counter() - start) / n


def run(env: BenchEnv, log: Callable[[str], None]) -> SectionResult:
    from .celery_app import build

    res = SectionResult("celery", "Celery: plain vs singleton vs limited task; cache hit")
    worker_env = dict(os.environ, RKB_URL=env.url, RKB_PREFIX=env.prefix,
                      PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    cmd = [sys.executable, "-m", "celery", "-A", "bench.celery_app", "worker", "-P", "prefork",
           "-c", "2", "-Q", f"q-{env.prefix}", "-n", f"bench-{env.prefix}@%h", "-l", "error",
           "--without-gossip", "--without-mingle", "--without-heartbeat"]
    proc = subprocess.Popen(cmd, env=worker_env, cwd=HERE.parent,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    app = build(env.url, env.prefix)
    try:
        deadline = time.monotonic() + 60
        while not app.control.ping(timeout=0.5):
            if proc.poll() is not None or time.monotonic() > deadline:
                res.skipped = "the bench worker did not start"
                return res
        n = max(50, int(N * env.scale))
        kinds = ["plain", "single", "limited"]
        _throughput(app, "plain", 50, -1)  # warm-up: connections, scripts
        _throughput(app, "single", 50, -2)
        _throughput(app, "limited", 50, -3)
        rates: dict[str, list[float]] = {k: [] for k in kinds}
        rounds = 2 * env.rounds + 1
        for round_no in range(rounds):
            # A B C C B A: each kind runs half its tasks on either side of the round's middle,
            # so a load that drifts during the round weighs on every kind alike.
            order = rotated(kinds, round_no)
            spent = dict.fromkeys(kinds, 0.0)
            for i, kind in enumerate([*order, *reversed(order)]):
                half = n // 2
                spent[kind] += half / _throughput(app, kind, half, round_no * 10 + i)
            for kind in kinds:
                rates[kind].append(2 * (n // 2) / spent[kind])
            log(f"celery round {round_no + 1}/{rounds}: " + ", ".join(
                f"{k} {rates[k][-1]:,.0f}/s" for k in kinds))
        rows = [[k, *(f"{r:,.0f}" for r in rates[k]), f"{median(rates[k]):,.0f}"]
                for k in kinds]
        for kind in ("single", "limited"):
            rows.append([f"{kind}/plain", *(f"{a / b:.2f}" for a, b in
                                            zip(rates[kind], rates["plain"], strict=True)),
                         f"{paired_ratio(rates[kind], rates['plain']):.2f}"])
        headers = ["task", *(f"r{i + 1} /s" for i in range(rounds)), "median /s"]
        res.tables.append((f"tasks/s, {n} tasks per round (A B C C B A halves), "
                           f"1 worker x 2 processes; ratio rows: same-round ratios and their "
                           f"median", headers, rows))
        plain = median(rates["plain"])
        for kind, label in (("single", "singleton=True"), ("limited", "concurrency_limit")):
            res.targets.append(at_least(
                f"{label} task throughput", median(rates[kind]), plain, "plain", 0.85,
                ratio=paired_ratio(rates[kind], rates["plain"]),
            ))

        cached, plain_task = app.tasks["cached"], app.tasks["plain"]
        cached.delay("hit").get(timeout=60)  # computed once by the worker, then cached
        hit = _latency(lambda: cached.delay("hit").get(timeout=60), LATENCY_CALLS)
        trivial = _latency(lambda: plain_task.delay("x").get(timeout=60), LATENCY_CALLS // 4)
        res.tables.append(("per call, delay().get()", ["call", "latency"],
                           [["cache hit", fmt_ms(hit)], ["trivial task body", fmt_ms(trivial)]]))
        ratio = trivial / hit if hit else float("nan")
        res.targets.append(Target("cache hit vs trivial task", fmt_ms(hit),
                                  f"trivial task {fmt_ms(trivial)}", ratio, "> 1.00x faster",
                                  bool(ratio > 1.0)))
        return res
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        app.close()
