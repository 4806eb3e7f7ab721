"""The peers section: what each task option costs, against celery-once and celery-singleton.

One ``celery worker -P prefork -c 2`` subprocess (``bench/peers_app.py``) serves every kind of
task: no option (the baseline), ``base=celery.Task``, ``singleton=True`` (running and queued
scope), ``concurrency_limit``, ``cache_ttl`` (a miss per call), celery-once's ``QueueOnce`` and
celery-singleton's ``Singleton``. Each round sends ``N`` tasks of each kind with distinct
arguments (nothing contends), in ``SLICES`` slices: each pass over the kinds runs one slice of
each in a new shuffled order, and waits for every result of a slice before the next (so a load
that drifts during the round weighs on every kind alike).

Measured per kind and round, per task (the machine's load moves throughput by +-20 %; the work
a task costs moves much less):

- worker CPU: the CPU time of the worker's process tree (the main process and its pool
  children, every thread: ``/proc/<pid>/task/<tid>/schedstat``, in ns);
- Redis CPU: ``INFO cpu`` (user + sys) of the server, which is also the broker and the result
  backend, so every kind pays the same Celery traffic on top of its own;
- sender CPU: this process's CPU time (``time.process_time``), where the peers take their lock;
- throughput: tasks per second of wall time.

Ratios are against the no-option task of the same round; the table gives their median over
rounds and their spread (lowest-highest). Round trips per task are counted afterwards in a
separate probe (MONITOR costs the server too much to run while CPU is measured): every command
any client sent (sender, worker, broker and backend traffic; each command of a pipeline counts;
an EVALSHA counts once, the commands it runs inside do not), per task.

Targets: each option's worker CPU ratio and Redis CPU ratio at or below both peers' (required);
``singleton=True`` at or below 1.05x the no-option task in worker CPU (aimed for).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import IGNORED_COMMANDS, BenchEnv, SectionResult, Target, median

N = 300  # tasks per kind per round (times BENCH_SCALE, at least 60)
SLICES = 6  # a round runs each kind in this many slices, each pass in a new shuffled order
PROBE_TASKS = 40  # tasks per kind in the round-trip probe
HERE = Path(__file__).resolve().parent

LABELS = {
    "plain": "no options (RedisKit app)",
    "celery": "base=celery.Task",
    "single": "singleton=True",
    "single_q": "singleton, queued scope",
    "limited": "concurrency_limit",
    "cached": "cache_ttl (miss)",
    "once": "celery-once QueueOnce",
    "csingleton": "celery-singleton Singleton",
}
OPTIONS = ("single", "single_q", "limited", "cached")
AIMED = 1.05  # singleton=True: worker CPU per task vs the no-option task


# -- CPU of a process tree ---------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return out


def _process_ns(pid: int) -> int:
    """CPU ns of every live thread of ``pid`` (schedstat: ns resolution, unlike stat's ticks)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total


def tree_cpu(pid: int) -> float:
    """CPU seconds used so far by process ``pid`` and all its descendants (live threads)."""
    todo, total = [pid], 0
    while todo:
        p = todo.pop()
        total += _process_ns(p)
        todo += _children(p)
    return total / 1e9


def redis_cpu(admin: Any) -> float:
    cpu = admin.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


# -- running tasks -----------------------------------------------------------------------------


def _run_batch(app: Any, kind: str, tag: str, n: int) -> None:
    task = app.tasks[kind]
    results = [task.delay(f"{tag}-{i}") for i in range(n)]
    for r in results:
        r.get(timeout=120)


class _Meter:
    """Worker tree CPU, Redis CPU, sender CPU and wall time around a batch."""

    def __init__(self, pid: int, admin: Any) -> None:
        self.pid, self.admin = pid, admin

    def read(self) -> tuple[float, float, float, float]:
        return (tree_cpu(self.pid), redis_cpu(self.admin), time.process_time(),
                time.perf_counter())


# -- round trips: a MONITOR probe --------------------------------------------------------------


def _probe_round_trips(env: BenchEnv, app: Any, kinds: list[str],
                       log: Callable[[str], None]) -> dict[str, float]:
    """Commands sent by any client (not run inside a script) per task, for each kind."""
    monitor_client = env.client()
    lines: list[tuple[str, str]] = []  # (client type, command line)
    ready = threading.Event()

    def listen() -> None:
        with monitor_client.monitor() as m:
            ready.set()
            for cmd in m.listen():
                text = cmd["command"]
                lines.append((cmd.get("client_type", ""), text))
                if text.startswith("ECHO rkb-probe-end"):
                    return

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    ready.wait(10)
    env.admin.echo("rkb-probe-start")
    for kind in kinds:
        env.admin.echo(f"rkb-probe-kind {kind}")
        _run_batch(app, kind, f"{env.prefix}-probe", PROBE_TASKS)
    env.admin.echo("rkb-probe-kind -")
    env.admin.echo("rkb-probe-end")
    thread.join(30)
    monitor_client.close()
    counts: dict[str, int] = {}
    current: str | None = None
    for client_type, text in lines:
        if text.startswith("ECHO rkb-probe-kind"):
            current = text.split()[-1]
            current = None if current == "-" else current
            continue
        if current is None or client_type == "lua":
            continue
        name = text.split(" ", 1)[0].strip('"').lower()
        if name in IGNORED_COMMANDS or name == "echo":
            continue
        counts[current] = counts.get(current, 0) + 1
    log(f"peers round-trip probe: {len(lines)} commands seen")
    return {k: counts.get(k, 0) / PROBE_TASKS for k in kinds}


# -- the section -------------------------------------------------------------------------------


def _ratio_text(values: list[float]) -> str:
    return f"{median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


def run(env: BenchEnv, log: Callable[[str], None]) -> SectionResult:
    from .peers_app import KINDS, PEERS, build

    res = SectionResult("peers", "Task options vs celery-once and celery-singleton: CPU per "
                                 "task")
    worker_env = dict(os.environ, RKB_URL=env.url, RKB_PREFIX=env.prefix,
                      PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    cmd = [sys.executable, "-m", "celery", "-A", "bench.peers_app", "worker", "-P", "prefork",
           "-c", "2", "-Q", f"pq-{env.prefix}", "-n", f"peers-{env.prefix}@%h", "-l", "error",
           "--without-gossip", "--without-mingle", "--without-heartbeat"]
    proc = subprocess.Popen(cmd, env=worker_env, cwd=HERE.parent,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    app = build(env.url, env.prefix)
    kinds = [k for k in KINDS if k in app.tasks]
    missing = [k for k in PEERS if k not in kinds]
    if missing:
        res.skipped = (f"peer libraries not installed ({', '.join(missing)}): "
                       f"pip install -e '.[bench]'")
        proc.kill()
        proc.wait()
        app.close()
        return res
    try:
        deadline = time.monotonic() + 60
        while not app.control.ping(timeout=0.5):
            if proc.poll() is not None or time.monotonic() > deadline:
                res.skipped = "the bench worker did not start"
                return res
        n = max(SLICES * 10, int(N * env.scale))
        size = n // SLICES
        for kind in kinds:  # warm-up: connections, scripts, imports in both children
            _run_batch(app, kind, f"{env.prefix}-warm", 40)
        meter = _Meter(proc.pid, env.admin)
        rounds = 3 * env.rounds
        shuffle = random.Random(16)
        # per kind, per round: (worker s, redis s, sender s, wall s) for n tasks
        spent: dict[str, list[list[float]]] = {k: [] for k in kinds}
        for round_no in range(rounds):
            totals = {k: [0.0, 0.0, 0.0, 0.0] for k in kinds}
            for slice_no in range(SLICES):
                order = list(kinds)
                shuffle.shuffle(order)
                for kind in order:
                    before = meter.read()
                    _run_batch(app, kind, f"{env.prefix}-{round_no}-{slice_no}", size)
                    after = meter.read()
                    for j in range(4):
                        totals[kind][j] += after[j] - before[j]
            for kind in kinds:
                spent[kind].append(totals[kind])
            log(f"peers round {round_no + 1}/{rounds}: " + ", ".join(
                f"{k} {totals[k][0] / (SLICES * size) * 1e3:.2f} ms" for k in kinds))
        tasks = SLICES * size

        def per_task(kind: str, j: int) -> list[float]:
            return [r[j] / tasks for r in spent[kind]]

        def ratios(kind: str, j: int) -> list[float]:
            return [a[j] / b[j] for a, b in zip(spent[kind], spent["plain"], strict=True)
                    if b[j] > 0]

        trips = _probe_round_trips(env, app, kinds, log)
        rows = []
        for kind in kinds:
            rate = [1 / (r[3] / tasks) for r in spent[kind]]
            rows.append([
                LABELS[kind],
                f"{median(per_task(kind, 0)) * 1e3:.2f} ms", _ratio_text(ratios(kind, 0)),
                f"{median(per_task(kind, 1)) * 1e6:.0f} us", _ratio_text(ratios(kind, 1)),
                f"{median(per_task(kind, 2)) * 1e6:.0f} us",
                f"{trips[kind]:.1f}", f"{trips[kind] - trips['plain']:+.1f}",
                f"{median(rate):,.0f}",
            ])
        res.tables.append((
            f"per task, {tasks} tasks per kind per round, {rounds} shuffled rounds, 1 worker x 2 "
            f"processes; ratios: vs the no-option task of the same round, median (lowest-highest)",
            ["task", "worker CPU", "vs none", "Redis CPU", "vs none", "sender CPU", "cmds/task",
             "cmds vs none", "tasks/s"],
            rows,
        ))
        worker = {k: median(ratios(k, 0)) for k in kinds}
        server = {k: median(ratios(k, 1)) for k in kinds}
        peer_worker = min(worker[p] for p in PEERS)
        peer_server = min(server[p] for p in PEERS)
        peers_text = " / ".join(f"{LABELS[p].split()[0]} {worker[p]:.2f}x" for p in PEERS)
        peers_redis = " / ".join(f"{LABELS[p].split()[0]} {server[p]:.2f}x" for p in PEERS)
        for kind in OPTIONS:
            res.targets.append(Target(
                f"{LABELS[kind]}: worker CPU/task vs none", f"{worker[kind]:.2f}x", peers_text,
                None, f"<= {peer_worker:.2f}x", worker[kind] <= peer_worker))
            res.targets.append(Target(
                f"{LABELS[kind]}: Redis CPU/task vs none", f"{server[kind]:.2f}x", peers_redis,
                None, f"<= {peer_server:.2f}x", server[kind] <= peer_server))
        res.targets.append(Target(
            "aimed: singleton=True worker CPU/task vs none", f"{worker['single']:.2f}x",
            peers_text, None, f"<= {AIMED:.2f}x", worker["single"] <= AIMED))
        res.notes.append(
            "worker CPU: the worker's process tree (main process and pool children, all "
            "threads); Redis CPU: the server is also the broker and result backend; sender CPU: "
            "the process calling delay() (where the peers take their lock); cmds/task: commands "
            "sent by any client per task (broker and backend included; each command of a "
            "pipeline counts, an EVALSHA counts once), from a MONITOR probe of "
            f"{PROBE_TASKS} tasks per kind run after the measured rounds")
        return res
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        app.close()
