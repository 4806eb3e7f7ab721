"""The mutex section: uncontended cycle, 8 threads and 4 processes on one lock.

Contenders (the factories are importable so spawned processes can build them):

- ``ours``: ``create_mutex(storage=RedisMutexStorage(client, prefix=...), lease=30)``,
  ``mutex.acquire(key).release()`` with the default ``auto_renew=True``.
- ``ours, trace_commands``: ``ours`` on a client marked by ``trace_commands`` (what
  ``rediskit_trace_commands`` does), uncontended only: the price of tracing.
- floor ``SET NX PX + DEL``: the least a lock can cost uncontended (two round trips, unsafe:
  no owner check, no wake-up; when contended this floor would spin, so it is not used there).
- floor ``BLPOP token``: a one-token list: BLPOP it, hold, LPUSH it back. Fair and wait-free
  but unsafe (a crashed holder loses the token forever): the contended floor.
- peers: redis-py ``client.lock(name)`` (sleeps 0.1 s between tries) and python-redis-lock
  ``redis_lock.Lock(client, name)`` (BLPOP on a signal list). A new lock object per cycle, as
  these are used (``with client.lock(name):``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .common import (
    DETAIL_LEGEND,
    BenchEnv,
    CommandProfile,
    SectionResult,
    at_least,
    command_calls,
    count_calls,
    fmt_num,
    info,
    median,
    paired_ratio,
    rotated,
)
from .contention import (
    OURS_PROFILE,
    Contender,
    Plan,
    contended_targets,
    detail_rows,
    run_interleaved,
)
from .floors import BLPOP_PROFILE, SETDEL_PROFILE, set_del_cycle

LEASE = 30.0
THREADS, PROCESSES, HOLD = 8, 4, 0.001
WARMUP, WINDOW = 0.3, 2.0  # seconds per contended run (times BENCH_SCALE)
UNCONTENDED_CYCLES = 2000  # per contender per round (not scaled: a round is ~0.2 s)
UNCONTENDED_ROUNDS = 7

REDISPY_PROFILE = CommandProfile(
    client=frozenset({"set", "evalsha", "script|load"}), scripted=frozenset({"get", "del"})
)
PRL_PROFILE = CommandProfile(
    client=frozenset({"set", "blpop", "evalsha", "script|load"}),
    scripted=frozenset({"get", "del", "lpush", "pexpire"}),
)


def _prefix_of(key: str) -> str:
    return key.split(":", 1)[0]


# --- contended factories: factory(client, key) -> acquire() -> release() ----------------------


def ours(client: Any, key: str) -> Callable[[], Callable[[], Any]]:
    from celery_rediskit import RedisMutexStorage, create_mutex

    mutex = create_mutex(storage=RedisMutexStorage(client, prefix=_prefix_of(key)), lease=LEASE)
    name = key.split(":", 1)[1]

    def acquire() -> Callable[[], Any]:
        return mutex.acquire(name).release

    return acquire


def ours_traced(client: Any, key: str) -> Callable[[], Callable[[], Any]]:
    """``ours`` on a client marked by ``trace_commands`` (``rediskit_trace_commands``): its
    commands go through ``execute_command``, where tracers see them."""
    from celery_rediskit import trace_commands

    return ours(trace_commands(client), key)


def redispy_lock(client: Any, key: str) -> Callable[[], Callable[[], Any]]:
    def acquire() -> Callable[[], Any]:
        lock = client.lock(key)
        lock.acquire()
        return lock.release

    return acquire


def python_redis_lock(client: Any, key: str) -> Callable[[], Callable[[], Any]]:
    import redis_lock

    def acquire() -> Callable[[], Any]:
        lock = redis_lock.Lock(client, key)
        lock.acquire()
        return lock.release

    return acquire


CONTENDED = [
    Contender("BLPOP token (floor)", "bench.floors:blpop_tokens", BLPOP_PROFILE,
              prepare="bench.floors:one_token"),
    Contender("ours", "bench.mutex_bench:ours", OURS_PROFILE),
    Contender("redis-py Lock", "bench.mutex_bench:redispy_lock", REDISPY_PROFILE),
    Contender("python-redis-lock", "bench.mutex_bench:python_redis_lock", PRL_PROFILE),
]
FLOOR, OURS, REDISPY, PRL = (c.label for c in CONTENDED)


# --- uncontended: one thread, acquire + release in a loop -------------------------------------


def _cycle_from(factory: Callable[[Any, str], Callable[[], Callable[[], Any]]]) -> Any:
    def make(client: Any, key: str) -> Callable[[], None]:
        acquire = factory(client, key)
        return lambda: acquire()() and None

    return make


TRACED = "ours, trace_commands"

UNCONTENDED: list[tuple[str, Any, CommandProfile]] = [
    ("SET NX PX + DEL (floor)", set_del_cycle, SETDEL_PROFILE),
    ("ours", _cycle_from(ours), OURS_PROFILE),
    (TRACED, _cycle_from(ours_traced), OURS_PROFILE),
    ("redis-py Lock", _cycle_from(redispy_lock), REDISPY_PROFILE),
    ("python-redis-lock", _cycle_from(python_redis_lock), PRL_PROFILE),
]


def _uncontended(
    env: BenchEnv, log: Callable[[str], None]
) -> dict[str, tuple[float, float, float]]:
    """Median cycles/s, round trips per cycle and paired ratio ours/it of each contender."""
    clients = {label: env.client() for label, _, _ in UNCONTENDED}
    cycles = {label: make(clients[label], env.key("u", i)) for i, (label, make, _) in
              enumerate(UNCONTENDED)}
    for cycle in cycles.values():  # warm up: connections, script loading, renewer thread
        for _ in range(200):
            cycle()
    rates: dict[str, list[float]] = {label: [] for label, _, _ in UNCONTENDED}
    trips: dict[str, list[float]] = {label: [] for label, _, _ in UNCONTENDED}
    for rnd in range(UNCONTENDED_ROUNDS):
        for label, _, profile in rotated(UNCONTENDED, rnd):
            cycle = cycles[label]
            before = command_calls(env.admin)
            t0 = time.perf_counter()
            for _ in range(UNCONTENDED_CYCLES):
                cycle()
            elapsed = time.perf_counter() - t0
            after = command_calls(env.admin)
            rates[label].append(UNCONTENDED_CYCLES / elapsed)
            trips[label].append(count_calls(before, after, profile).round_trips
                                / UNCONTENDED_CYCLES)
        log(f"uncontended round {rnd + 1}/{UNCONTENDED_ROUNDS}: "
            + ", ".join(f"{k} {v[-1]:,.0f}/s" for k, v in rates.items()))
    mine = rates["ours"]
    return {label: (median(rates[label]), median(trips[label]), paired_ratio(mine, rates[label]))
            for label in rates}


def run(env: BenchEnv, log: Callable[[str], None] = print) -> SectionResult:
    result = SectionResult("mutex", "Mutex")

    unc = _uncontended(env, log)
    result.tables.append((
        f"uncontended acquire+release, 1 thread, median of {UNCONTENDED_ROUNDS} interleaved rounds",
        ["contender", "cycles/s", "RT/cycle", "ours / it"],
        [[label, f"{rate:,.0f}", fmt_num(rt), fmt_num(ratio)]
         for label, (rate, rt, ratio) in unc.items()],
    ))
    floor_label = UNCONTENDED[0][0]
    result.targets += [
        at_least("uncontended: vs SET NX PX + DEL", unc["ours"][0], unc[floor_label][0],
                 "floor", 0.90, ratio=unc[floor_label][2]),
        at_least("uncontended: vs redis-py Lock", unc["ours"][0], unc["redis-py Lock"][0],
                 "redis-py", 1.00, strict=True, ratio=unc["redis-py Lock"][2]),
        info("uncontended: vs python-redis-lock", unc["ours"][0], unc["python-redis-lock"][0],
             "p-r-lock", ratio=unc["python-redis-lock"][2]),
        # the cost of rediskit_trace_commands: traced / lean, paired per round
        info("uncontended: trace_commands on vs off", unc[TRACED][0], unc["ours"][0],
             "off", ratio=1 / unc[TRACED][2]),
    ]

    for scope, plan in (
        (f"{THREADS} threads", Plan(THREADS, HOLD, WARMUP, WINDOW)),
        (f"{PROCESSES} processes", Plan(PROCESSES, HOLD, WARMUP, WINDOW, processes=True)),
    ):
        runs = run_interleaved(env, scope.replace(" ", ""), CONTENDED, plan, progress=log)
        result.tables.append((
            f"{scope} on one lock, {HOLD * 1000:g} ms hold, {env.seconds(WINDOW):g} s window, "
            f"median of {env.rounds} interleaved rounds",
            *detail_rows(runs),
        ))
        contended_targets(result, scope, runs, OURS, FLOOR, "BLPOP", (REDISPY, PRL))
    result.notes.append(DETAIL_LEGEND)
    return result
