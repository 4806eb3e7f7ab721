"""The contended harness: N workers (threads of one process, or processes) share one resource.

Each worker loops: ask, get it, hold ``hold`` seconds (``time.sleep``), give it back. After a
warm-up, a measuring window counts the grants that fall in it, the wait of each (request to
grant), per-worker counts (fairness) and, from INFO commandstats taken by the main process at
the window's edges, the round trips the contender's clients made. Grant/release instants of
every worker (``time.monotonic``: one clock for all processes on Linux) are swept afterwards to
check that no more than ``capacity`` workers ever held the resource at once.

A contender is named by import paths (``"module:function"``) so a spawned process can build it:
``factory(client, key) -> acquire`` where ``acquire()`` blocks, then returns the release
callable; ``prepare(client, key)``, if given, runs once in the main process before the workers
start (e.g. to fill a token list).
"""

from __future__ import annotations

import importlib
import math
import multiprocessing
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from .common import (
    BenchEnv,
    CommandProfile,
    SectionResult,
    at_least,
    at_most,
    command_calls,
    count_calls,
    fmt_ms,
    fmt_num,
    fmt_us,
    info,
    median,
    paired_ratio,
    percentile,
    rotated,
)

# Our library's clients send only EVALSHA (EVAL / SCRIPT LOAD after a script flush, SUBSCRIBE
# once per process): every other command counted on the server ran inside one of its scripts.
OURS_PROFILE = CommandProfile(
    client=frozenset({"evalsha", "eval", "script|load", "subscribe"}), scripted=None
)

Acquire = Callable[[], Callable[[], Any]]

FLOOR_RATIO = 0.95  # contended throughput: at least this share of the floor's, same run
MAX_WAIT_MS = 20.0  # the longest wait of a round (median over rounds), 1 ms holds
_JOIN_GRACE = 10.0  # seconds after the window for stragglers to finish before they are abandoned


@dataclass(frozen=True)
class Contender:
    label: str
    factory: str
    profile: CommandProfile
    prepare: str | None = None


@dataclass(frozen=True)
class Plan:
    workers: int
    hold: float
    warmup: float
    window: float
    capacity: int = 1
    processes: bool = False


@dataclass
class RunStats:
    grants: int
    rate: float  # grants per second in the window
    wait_p50: float
    wait_max: float
    fairness: float  # max / min per-worker grants (inf when a worker got none)
    trips_per_grant: float
    handoff_p50: float  # from one holder's release call to the next holder's grant
    handoff_p90: float
    overlaps: int  # grants that found ``capacity`` holders already
    hung: int  # workers that never finished (abandoned)
    unexpected: dict[str, int]


def resolve(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


WorkResult = tuple[int, list[float], list[tuple[float, float]]]
RunResult = tuple[list[WorkResult], float, float, dict[str, int], dict[str, int], int]


def _work(acquire: Acquire, hold: float, start: float, end: float) -> WorkResult:
    """One worker's loop; returns (grants in window, their waits, every (grant, release))."""
    now = time.monotonic
    sleep = time.sleep
    count = 0
    waits: list[float] = []
    held: list[tuple[float, float]] = []
    while True:
        asked = now()
        if asked >= end:
            break
        release = acquire()
        granted = now()
        sleep(hold)
        freed = now()
        release()
        held.append((granted, freed))
        if start <= granted < end:
            count += 1
            waits.append(granted - asked)
    return count, waits, held


def _handoffs(intervals: list[tuple[float, float]], start: float, end: float) -> list[float]:
    """Gaps from a release call to the next grant (mutex: capacity 1), within the window."""
    ordered = sorted(intervals)
    return [b[0] - a[1] for a, b in zip(ordered, ordered[1:], strict=False)
            if start <= b[0] < end and b[0] >= a[1]]


def _overlaps(intervals: list[tuple[float, float]], capacity: int) -> int:
    events = [(g, 1) for g, _ in intervals] + [(f, -1) for _, f in intervals]
    events.sort(key=lambda e: (e[0], e[1]))  # releases first at equal instants
    holders = bad = 0
    for _, step in events:
        holders += step
        if step == 1 and holders > capacity:
            bad += 1
    return bad


def _run_threads(env: BenchEnv, contender: Contender, key: str, plan: Plan,
                 clients: dict[str, Any]) -> RunResult:
    client = clients.get(contender.label)
    if client is None:
        client = clients[contender.label] = env.client()
    acquire = resolve(contender.factory)(client, key)
    go = threading.Event()
    times: list[float] = []
    results: list[WorkResult | None] = [None] * plan.workers

    def worker(i: int) -> None:
        go.wait()
        results[i] = _work(acquire, plan.hold, times[0], times[1])

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(plan.workers)]
    for t in threads:
        t.start()
    start = time.monotonic() + env.seconds(plan.warmup)
    end = start + env.seconds(plan.window)
    times[:] = [start, end]
    go.set()
    before, after = _window_stats(env, start, end)
    deadline = time.monotonic() + _JOIN_GRACE
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    hung = sum(t.is_alive() for t in threads)
    return [r for r in results if r is not None], start, end, before, after, hung


def _window_stats(env: BenchEnv, start: float, end: float) -> tuple[dict[str, int], dict[str, int]]:
    time.sleep(max(0.0, start - time.monotonic()))
    before = command_calls(env.admin)
    time.sleep(max(0.0, end - time.monotonic()))
    after = command_calls(env.admin)
    return before, after


def _process_main(url: str, factory: str, key: str, hold: float, ready: Any, go: Any,
                  times: Any, out: Any, index: int) -> None:
    client = redis.Redis.from_url(url)
    client.ping()
    acquire = resolve(factory)(client, key)
    ready.put(index)
    go.wait()
    start, end = times[0], times[1]
    out.put((index, _work(acquire, hold, start, end)))


def _run_processes(env: BenchEnv, contender: Contender, key: str,
                   plan: Plan) -> RunResult:
    ctx = multiprocessing.get_context("spawn")
    ready, out = ctx.Queue(), ctx.Queue()
    go = ctx.Event()
    times = ctx.Array("d", 2)
    procs = [
        ctx.Process(target=_process_main, daemon=True,
                    args=(env.url, contender.factory, key, plan.hold, ready, go, times, out, i))
        for i in range(plan.workers)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=60)
    start = time.monotonic() + env.seconds(plan.warmup)
    end = start + env.seconds(plan.window)
    times[0], times[1] = start, end
    go.set()
    before, after = _window_stats(env, start, end)
    results: list[WorkResult] = []
    deadline = time.monotonic() + _JOIN_GRACE
    while len(results) < len(procs):
        try:
            results.append(out.get(timeout=max(0.01, deadline - time.monotonic()))[1])
        except queue.Empty:
            break
    hung = len(procs) - len(results)
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()) if not hung else 0.1)
        if p.is_alive():
            p.terminate()
            p.join(1.0)
    return results, start, end, before, after, hung


def run_once(env: BenchEnv, contender: Contender, key: str, plan: Plan,
             clients: dict[str, Any]) -> RunStats:
    """One measured run of ``contender`` on a fresh ``key``."""
    if contender.prepare:
        resolve(contender.prepare)(env.admin, key)
    if plan.processes:
        results, start, end, before, after, hung = _run_processes(env, contender, key, plan)
    else:
        results, start, end, before, after, hung = _run_threads(env, contender, key, plan, clients)
    counts = [r[0] for r in results]
    waits = [w for r in results for w in r[1]]
    intervals = [iv for r in results for iv in r[2]]
    grants = sum(counts)
    handoffs = _handoffs(intervals, start, end) if plan.capacity == 1 else []
    calls = count_calls(before, after, contender.profile)
    low = min(counts) if len(counts) == plan.workers else 0
    return RunStats(
        grants=grants,
        rate=grants / (end - start),
        wait_p50=percentile(waits, 0.5),
        wait_max=max(waits) if waits else math.nan,
        fairness=(max(counts) / low) if low else math.inf,
        trips_per_grant=calls.round_trips / grants if grants else math.nan,
        handoff_p50=percentile(handoffs, 0.5),
        handoff_p90=percentile(handoffs, 0.9),
        overlaps=_overlaps(intervals, plan.capacity),
        hung=hung,
        unexpected=calls.unexpected,
    )


@dataclass
class Summary:
    label: str
    runs: list[RunStats]

    @property
    def rate(self) -> float:
        return median(r.rate for r in self.runs)

    @property
    def wait_p50(self) -> float:
        return median(r.wait_p50 for r in self.runs)

    @property
    def wait_max(self) -> float:
        """Median over rounds of each round's longest wait (one outlier round doesn't decide)."""
        return median(r.wait_max for r in self.runs)

    @property
    def wait_worst(self) -> float:
        return max((r.wait_max for r in self.runs), default=math.nan)

    @property
    def handoff_p50(self) -> float:
        return median(r.handoff_p50 for r in self.runs)

    @property
    def handoff_p90(self) -> float:
        return median(r.handoff_p90 for r in self.runs)

    @property
    def fairness(self) -> float:
        return median(r.fairness for r in self.runs)

    @property
    def trips(self) -> float:
        return median(r.trips_per_grant for r in self.runs)

    @property
    def overlaps(self) -> int:
        return sum(r.overlaps for r in self.runs)

    @property
    def hung(self) -> int:
        return sum(r.hung for r in self.runs)

    @property
    def unexpected(self) -> dict[str, int]:
        merged: dict[str, int] = {}
        for r in self.runs:
            for k, v in r.unexpected.items():
                merged[k] = merged.get(k, 0) + v
        return merged


def run_interleaved(env: BenchEnv, tag: str, contenders: list[Contender], plan: Plan,
                    progress: Callable[[str], None] = lambda s: None) -> dict[str, Summary]:
    """Run every contender ``env.rounds`` times, rotating the order each round."""
    summaries = {c.label: Summary(c.label, []) for c in contenders}
    clients: dict[str, Any] = {}
    for rnd in range(env.rounds):
        for i, contender in enumerate(rotated(contenders, rnd)):
            key = env.key(tag, rnd, i)
            stats = run_once(env, contender, key, plan, clients)
            summaries[contender.label].runs.append(stats)
            progress(f"{tag} round {rnd + 1}/{env.rounds}: {contender.label} "
                     f"{stats.rate:,.0f}/s max wait {stats.wait_max * 1000:.1f} ms")
    # The clients stay open: closing one would break the wake-up listener the library keeps on
    # it (there is no API to stop that thread); they go with the process.
    return summaries


def detail_rows(summaries: dict[str, Summary]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of a contended benchmark's detail table (handoff only for a mutex)."""
    handoff = any(not math.isnan(s.handoff_p50) for s in summaries.values())
    headers = ["contender", "grants/s", "wait p50", "max wait", "worst max"]
    headers += ["handoff p50", "p90"] if handoff else []
    headers += ["max/min", "RT/grant", "overlaps", "hung"]
    rows = []
    for s in summaries.values():
        row = [s.label, f"{s.rate:,.0f}", fmt_ms(s.wait_p50), fmt_ms(s.wait_max),
               fmt_ms(s.wait_worst)]
        row += [fmt_us(s.handoff_p50), fmt_us(s.handoff_p90)] if handoff else []
        row += [fmt_num(s.fairness), fmt_num(s.trips), str(s.overlaps), str(s.hung)]
        rows.append(row)
    return headers, rows


def contended_targets(result: SectionResult, scope: str, runs: dict[str, Summary], ours: str,
                      floor: str, floor_name: str, peers: tuple[str, ...]) -> None:
    """The verdict lines shared by every contended benchmark, and notes on anomalies."""
    ours_s, floor_s = runs[ours], runs[floor]
    result.targets += [
        at_least(f"{scope}: throughput vs floor", ours_s.rate, floor_s.rate, floor_name,
                 FLOOR_RATIO,
                 ratio=paired_ratio([r.rate for r in ours_s.runs], [r.rate for r in floor_s.runs])),
        at_most(f"{scope}: max wait", ours_s.wait_max * 1000, MAX_WAIT_MS, "{:.1f} ms",
                f"worst round {ours_s.wait_worst * 1000:.1f} ms; {floor_name} "
                f"{floor_s.wait_max * 1000:.1f} ms"),
        at_most(f"{scope}: fairness max/min", ours_s.fairness, 2.0, "{:.2f}",
                f"{floor_name} {fmt_num(floor_s.fairness)}"),
        at_most(f"{scope}: round trips/grant", ours_s.trips, 3.0, "{:.2f}",
                f"{floor_name} {fmt_num(floor_s.trips)}"),
        at_most(f"{scope}: overlapping holders", float(ours_s.overlaps), 0.0, "{:.0f}",
                "all rounds"),
    ]
    for peer in peers:
        p = runs[peer]
        ratio = paired_ratio([r.rate for r in ours_s.runs], [r.rate for r in p.runs])
        result.targets.append(info(f"{scope}: vs {peer}", ours_s.rate, p.rate, peer, ratio=ratio))
    for s in runs.values():
        if s.unexpected:
            result.notes.append(f"{scope} {s.label}: unexpected commands counted as round trips: "
                                + ", ".join(f"{k} x{v}" for k, v in sorted(s.unexpected.items())))
        if s.hung:
            result.notes.append(f"{scope} {s.label}: {s.hung} worker(s) never finished "
                                f"(abandoned after the grace period)")
