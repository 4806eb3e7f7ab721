"""The cluster section: uncontended locks over many independent keys, 3 masters against 1.

Two private Redis Clusters are started for the section (``devserver.PrivateCluster``: one of 1
master, one of 3), and the same workload runs on each in interleaved rounds (the order rotates,
so drift between rounds cancels in the paired ratio): ``WORKERS`` processes, each with its own
``RedisCluster`` client and mutex, acquiring and releasing locks on ``KEYS`` names of its own in
turn (no two workers share a name: nothing is contended). For context, the same runs against
the bench's single server with a plain ``redis.Redis`` client (the cluster client's own cost).

Reported per topology: grants/s, and per master its share of the scripts run and its server
CPU (INFO cpu, user + sys) over the window, as a share of one core; and the CPU the client
processes used (in cores). Throughput can only scale
with masters while the masters are the bottleneck: on a machine with few cores the Python
clients use most of the CPU, and the masters share the same cores; the per-master CPU shows
how much of the server work each master carries.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from typing import Any

import redis

from .common import (
    BenchEnv,
    SectionResult,
    Target,
    at_most,
    fmt_num,
    info,
    median,
    paired_ratio,
    rotated,
)

KEYS = 512  # lock names per worker
WARMUP, WINDOW = 0.5, 2.0  # seconds per run (times BENCH_SCALE)
LEASE = 30.0
_JOIN_GRACE = 15.0


def _workers() -> int:
    return max(4, 2 * (os.cpu_count() or 1))


def _worker(kind: str, url: str, prefix: str, index: int, ready: Any, go: Any, times: Any,
            out: Any) -> None:
    from redis.cluster import RedisCluster

    from celery_rediskit import RedisMutexStorage, create_mutex

    client: Any = RedisCluster.from_url(url) if kind == "cluster" else redis.Redis.from_url(url)
    mutex = create_mutex(storage=RedisMutexStorage(client, prefix=prefix), lease=LEASE)
    names = [f"w{index}-{k}" for k in range(KEYS)]
    for name in names:  # warm up: connections, scripts on every master, the renewer thread
        mutex.acquire(name).release()
    ready.put(index)
    go.wait()
    start, end = times[0], times[1]
    count = 0
    i = 0
    now = time.monotonic
    cpu_from: float | None = None
    while True:
        t = now()
        if t >= end:
            break
        if t >= start:
            if cpu_from is None:
                cpu_from = time.process_time()
            count += 1
        mutex.acquire(names[i % KEYS]).release()
        i += 1
    out.put((index, count, time.process_time() - (cpu_from or time.process_time())))


def _node_stats(admins: list[Any]) -> list[tuple[int, float]]:
    """(EVALSHA calls, CPU seconds) of each node."""
    stats = []
    for admin in admins:
        calls = admin.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
        cpu = admin.info("cpu")
        stats.append((int(calls), float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])))
    return stats


def _run(env: BenchEnv, kind: str, url: str, admins: list[Any],
         tag: str) -> tuple[float, list[float], list[float], float]:
    """One run: (grants/s, each master's share of the scripts, each master's CPU share of one
    core, the clients' CPU in cores)."""
    ctx = multiprocessing.get_context("spawn")
    ready, out = ctx.Queue(), ctx.Queue()
    go = ctx.Event()
    times = ctx.Array("d", 2)
    prefix = f"{env.prefix}-{tag}"
    workers = _workers()
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(kind, url, prefix, i, ready, go, times, out))
             for i in range(workers)]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            ready.get(timeout=120)
        start = time.monotonic() + env.seconds(WARMUP)
        end = start + env.seconds(WINDOW)
        times[0], times[1] = start, end
        go.set()
        time.sleep(max(0.0, start - time.monotonic()))
        before = _node_stats(admins)
        time.sleep(max(0.0, end - time.monotonic()))
        after = _node_stats(admins)
        total = 0
        client_cpu = 0.0
        deadline = time.monotonic() + _JOIN_GRACE
        for _ in procs:
            _, count, cpu_used = out.get(timeout=max(0.01, deadline - time.monotonic()))
            total += count
            client_cpu += cpu_used
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.terminate()
                p.join(1)
    window = end - start
    calls = [a[0] - b[0] for a, b in zip(after, before, strict=True)]
    cpu = [(a[1] - b[1]) / window for a, b in zip(after, before, strict=True)]
    shares = [c / sum(calls) if sum(calls) else float("nan") for c in calls]
    return total / window, shares, cpu, client_cpu / window


def run(env: BenchEnv, log: Callable[[str], None] = print) -> SectionResult:
    from celery_rediskit.devserver import PrivateCluster

    result = SectionResult("cluster", "Cluster")
    with PrivateCluster(masters=1) as one, PrivateCluster(masters=3) as three:
        topologies: dict[str, tuple[str, str, list[Any]]] = {
            "plain server (redis.Redis)": ("plain", env.url, [env.admin]),
            "cluster, 1 master": ("cluster", one.url, [n.client() for n in one.nodes]),
            "cluster, 3 masters": ("cluster", three.url, [n.client() for n in three.nodes]),
        }
        labels = list(topologies)
        rates: dict[str, list[float]] = {label: [] for label in labels}
        shares: dict[str, list[list[float]]] = {label: [] for label in labels}
        cpus: dict[str, list[list[float]]] = {label: [] for label in labels}
        clients: dict[str, list[float]] = {label: [] for label in labels}
        for rnd in range(env.rounds):
            for label in rotated(labels, rnd):
                kind, url, admins = topologies[label]
                rate, share, cpu, used = _run(env, kind, url, admins,
                                              f"r{rnd}{labels.index(label)}")
                rates[label].append(rate)
                clients[label].append(used)
                shares[label].append(share)
                cpus[label].append(cpu)
            log(f"cluster round {rnd + 1}/{env.rounds}: "
                + ", ".join(f"{k} {v[-1]:,.0f}/s" for k, v in rates.items()))
        for _, _, admins in topologies.values():
            for admin in admins:
                if admin is not env.admin:
                    admin.close()
    one_label, three_label = labels[1], labels[2]
    ratio = paired_ratio(rates[three_label], rates[one_label])
    rows = []
    for label in labels:
        per_master = len(shares[label][0])
        share = [median(r[i] for r in shares[label]) for i in range(per_master)]
        cpu = [median(r[i] for r in cpus[label]) for i in range(per_master)]
        rows.append([
            label, f"{median(rates[label]):,.0f}",
            fmt_num(paired_ratio(rates[label], rates[one_label])),
            " / ".join(f"{s:.0%}" for s in share),
            " / ".join(f"{c:.0%}" for c in cpu),
            f"{median(clients[label]):.2f}",
        ])
    result.tables.append((
        f"uncontended acquire+release, {_workers()} processes x {KEYS} keys each, "
        f"{env.seconds(WINDOW):g} s window, median of {env.rounds} interleaved rounds "
        f"({os.cpu_count()} cpus)",
        ["topology", "grants/s", "vs 1 master", "scripts per master", "CPU per master",
         "clients' CPU (cores)"],
        rows,
    ))
    busiest = median(max(r) for r in shares[three_label])
    busiest_cpu = median(max(r) for r in cpus[three_label])
    one_cpu = median(max(r) for r in cpus[one_label])
    targets: list[Target] = [
        info("3 masters vs 1 master (grants/s)", median(rates[three_label]),
             median(rates[one_label]), "1 master", ratio=ratio),
        at_most("3 masters: busiest master's share of the scripts", busiest, 0.45, "{:.2f}",
                "even: 0.33"),
        info("server CPU of the busiest master, 3 vs 1", busiest_cpu * 100, one_cpu * 100,
             "1 master", unit="% core", ratio=busiest_cpu / one_cpu if one_cpu else None),
    ]
    # What the masters could serve if each had a core of its own: grants/s per core of the
    # busiest master (a projection for server-bound deployments, not a measurement).
    three_cap = median(rates[three_label]) / busiest_cpu if busiest_cpu else float("nan")
    one_cap = median(rates[one_label]) / one_cpu if one_cpu else float("nan")
    targets.append(info("projected server-bound capacity, 3 vs 1", three_cap, one_cap,
                        "1 master", unit="/s per core"))
    result.targets += targets
    result.notes.append(
        "near-linear scaling needs the masters to be the bottleneck: when the clients' CPU "
        "plus the masters' fills the machine's cores (see the table), throughput cannot grow "
        "with masters, and what the run shows is each master's share of the work; the "
        "projected capacity divides grants/s by the busiest master's CPU"
    )
    return result
