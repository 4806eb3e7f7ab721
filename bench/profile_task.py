"""Where one task's time goes in the worker: ``python -m bench.profile_task [KIND ...]``.

Runs each kind of task of ``bench/peers_app.py`` through Celery's own worker tracer
(``celery.app.trace.build_tracer``: what a pool process runs per message, result stored in
the Redis backend) in this process, against a private Redis server, ``--calls`` times, and
prints:

- CPU and wall time per task, no profiler, against the no-option task;
- the CPU per task of the steps of one kind (``--detail``, default ``single``), by wrapping
  them with this thread's CPU clock (``time.thread_time_ns``);
- a cProfile breakdown of the same kind: the steps of the
  integration's path (argument binding and key building, owner ids and the claims record,
  the acquire round trip, the lease object and its renewer registration, the release and
  the record's deletion) in µs per task, cumulative (a step includes what it calls).
  cProfile's own cost inflates small functions: read the shares, not the absolutes.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

# (label, file suffix, function name): the steps reported, in the order of the path.
STEPS: list[tuple[str, str, str]] = [
    ("whole task (Celery's tracer)", "app/trace.py", "trace_task"),
    ("  RedisKitTask.__call__", "integration/task.py", "__call__"),
    ("    bind arguments", "integration/options.py", "bind"),
    ("    singleton key (canonical + digest)", "integration/options.py", "singleton_name"),
    ("    limit names", "integration/options.py", "limit_names"),
    ("    cache key", "integration/options.py", "cache_name"),
    ("    cache lookup (GET)", "integration/runtime.py", "cache_lookup"),
    ("    _rk_acquire", "integration/task.py", "_rk_acquire"),
    ("      owner ids", "celery_rediskit/lease.py", "new_owner_id"),
    ("      claims record command", "integration/claims.py", "record_command"),
    ("      holder line", "integration/claims.py", "holder_line"),
    ("      record + acquire, pipelined (cluster)", "_redis/scripts.py", "run_after"),
    ("      acquire round trip (record in script)", "_redis/scripts.py", "run"),
    ("      lease object", "celery_rediskit/lease.py", "__init__"),
    ("      renewer registration", "celery_rediskit/lease.py", "start_renewal"),
    ("    queued claim (take)", "integration/task.py", "_rk_take_claim"),
    ("    the task body", "bench/peers_app.py", "single"),
    ("    cache store", "integration/runtime.py", "cache_store"),
    ("    _rk_finish (releases)", "integration/task.py", "_rk_finish"),
    ("      release round trip (all, record too)", "_redis/batch.py", "run_scripts"),
    ("    _rk_forget_record (round trip)", "integration/task.py", "_rk_forget_record"),
    ("  store the result (backend)", "backends/base.py", "mark_as_done"),
    ("lean command path (every round trip)", "_redis/scripts.py", "call"),
    ("pipelined commands (every round trip)", "_redis/scripts.py", "call_many"),
]


def _tracer(app: Any, kind: str) -> Callable[[int], Any]:
    from celery.app.trace import build_tracer

    task = app.tasks[kind]
    trace = build_tracer(task.name, task, app=app, hostname="profile@host")

    def one(i: int) -> Any:
        task_id = str(uuid.uuid4())
        request = {"id": task_id, "task": task.name, "hostname": "profile@host",
                   "delivery_info": {"exchange": "", "routing_key": "q"},
                   "reply_to": None, "correlation_id": task_id, "ignore_result": False}
        result = trace(task_id, (f"{kind}-{i}-{task_id}",), {}, request)
        if result[1] is not None:  # an exception info
            raise RuntimeError(f"{kind} failed: {result}")
        return result

    return one


def _costs(tracers: dict[str, Callable[[int], Any]], kinds: list[str], n: int,
           rounds: int = 9) -> dict[str, tuple[float, float]]:
    """Median CPU and wall seconds per task of each kind, ``n`` calls split over interleaved
    rounds (the order rotates each round: a load that drifts weighs on every kind alike)."""
    for kind in kinds:
        for i in range(50):
            tracers[kind](-i)
    per = max(1, n // rounds)
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    for r in range(rounds):
        for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
            call = tracers[kind]
            cpu, wall = time.process_time(), time.perf_counter()
            for i in range(per):
                call(r * per + i)
            samples[kind].append(((time.process_time() - cpu) / per,
                                  (time.perf_counter() - wall) / per))
    return {k: (statistics.median(c for c, _ in v), statistics.median(w for _, w in v))
            for k, v in samples.items()}


def breakdown(stats: pstats.Stats, calls: int) -> list[tuple[str, float, float]]:
    """(step, µs per task cumulative, calls per task) of each step found in ``stats``."""
    out = []
    table: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for label, suffix, name in STEPS:
        cum = count = 0.0
        for (path, _line, func), (_cc, nc, _tt, ct, _callers) in table.items():
            if func == name and path.endswith(suffix):
                cum += ct
                count += nc
        if count:
            out.append((label, cum / calls * 1e6, count / calls))
    return out


def stages(app: Any, kind: str, n: int) -> list[tuple[str, float]]:
    """CPU µs per task (this thread's CPU clock) of the integration's steps, measured by
    wrapping them (each wrapper costs well under a µs), and of the whole task."""
    import celery.backends.base as backend_base

    from celery_rediskit._redis import batch
    from celery_rediskit.integration import options, task

    clock = time.thread_time_ns
    spent: dict[str, int] = {}
    wrapped: list[tuple[Any, str, Any]] = []

    def wrap(owner: Any, attr: str, label: str) -> None:
        original = getattr(owner, attr)
        spent[label] = 0

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = clock()
            try:
                return original(*args, **kwargs)
            finally:
                spent[label] += clock() - started

        wrapped.append((owner, attr, original))
        setattr(owner, attr, timed)

    wrap(task.RedisKitTask, "__call__", "RedisKitTask.__call__ (options + body)")
    wrap(options.TaskPolicy, "bind", "  bind arguments")
    wrap(options.TaskPolicy, "singleton_name", "  singleton key (canonical JSON + blake2b)")
    wrap(task.RedisKitTask, "_rk_acquire", "  _rk_acquire (owner ids, record, lease, renewer)")
    wrap(task, "_try_acquire", "    acquire round trip (record in the script)")
    wrap(task.RedisKitTask, "_rk_finish", "  _rk_finish (every release)")
    wrap(batch, "run_scripts", "    release round trip (leases + record)")
    wrap(backend_base.Backend, "mark_as_done", "Celery: store the result (the releases ride in it)")
    try:
        one = _tracer(app, kind)
        for i in range(100):
            one(-i)
        for label in spent:
            spent[label] = 0
        started = clock()
        for i in range(n):
            one(i)
        total = clock() - started
    finally:
        for owner, attr, original in reversed(wrapped):
            setattr(owner, attr, original)
    return [("whole task (Celery's tracer)", total / n / 1000)] + [
        (label, ns / n / 1000) for label, ns in spent.items() if ns]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_task", description=__doc__)
    parser.add_argument("kinds", nargs="*",
                        default=["plain", "single", "single_q", "limited", "cached"])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--detail", default="single")
    args = parser.parse_args(argv)

    from celery_rediskit.devserver import PrivateServer

    from .peers_app import build

    with PrivateServer() as server:
        app = build(server.url, f"prof-{uuid.uuid4().hex[:6]}")
        tracers = {k: _tracer(app, k) for k in {*args.kinds, args.detail}}
        costs = _costs(tracers, list(args.kinds), args.calls)
        base_cpu, base_wall = costs.get("plain", (float("nan"), float("nan")))
        print(f"per task through Celery's worker tracer, {args.calls} calls in 9 interleaved "
              f"rounds (medians), no profiler")
        print(f"{'task':<12} {'CPU us':>8} {'vs plain':>9} {'wall us':>8} {'vs plain':>9}")
        for kind, (cpu, wall) in costs.items():
            print(f"{kind:<12} {cpu * 1e6:>8.0f} {cpu / base_cpu:>8.2f}x {wall * 1e6:>8.0f} "
                  f"{wall / base_wall:>8.2f}x")

        print(f"\nsteps of {args.detail!r}: CPU us per task (thread CPU clock, wrapped steps)")
        for label, us in stages(app, args.detail, args.calls):
            print(f"{label:<52} {us:>7.1f}")

        profiler = cProfile.Profile()
        one = tracers[args.detail]
        profiler.enable()
        for i in range(args.calls):
            one(10_000 + i)
        profiler.disable()
        stats = pstats.Stats(profiler)
        print(f"\ncProfile of {args.detail!r}, {args.calls} calls: cumulative us per task "
              f"(wall clock, profiler overhead included)")
        print(f"{'step':<44} {'us/task':>8} {'calls/task':>10}")
        for label, us, count in breakdown(stats, args.calls):
            print(f"{label:<44} {us:>8.1f} {count:>10.2f}")
        app.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
