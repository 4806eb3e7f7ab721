"""The semaphore section: 16 threads share 4 permits, 1 ms of work each.

Contenders:

- ``ours``: ``create_semaphore(permits=4, storage=RedisSemaphoreStorage(client, prefix=...))``,
  ``sem.acquire(key).release()`` with the default ``auto_renew=True``.
- floor: a 4-token list (BLPOP a token, work, LPUSH it back): fair, unsafe.
- peer: the ``redis-semaphore`` package (``Semaphore(client, count=4, namespace=...)``; BLPOP
  on its token list, a hash of grabbed tokens). One object per acquisition: it keeps the
  tokens it took in a list, so threads must not share one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .common import BenchEnv, CommandProfile, SectionResult
from .contention import (
    OURS_PROFILE,
    Contender,
    Plan,
    contended_targets,
    detail_rows,
    run_interleaved,
)
from .floors import BLPOP_PROFILE

THREADS, PERMITS, WORK = 16, 4, 0.001
WARMUP, WINDOW = 0.3, 2.0

# A MULTI/EXEC pipeline is one round trip: EXEC counts it, the queued commands do not.
REDIS_SEMAPHORE_PROFILE = CommandProfile(
    client=frozenset({"getset", "blpop", "hset", "hexists", "exec", "expire", "persist",
                      "lpop", "llen", "time"}),
    scripted=frozenset({"multi", "hdel", "lpush", "del", "rpush"}),
)


def ours(client: Any, key: str) -> Callable[[], Callable[[], Any]]:
    from celery_rediskit import RedisSemaphoreStorage, create_semaphore

    prefix, name = key.split(":", 1)
    sem = create_semaphore(permits=PERMITS, storage=RedisSemaphoreStorage(client, prefix=prefix))

    def acquire() -> Callable[[], Any]:
        return sem.acquire(name).release  # type: ignore[no-any-return]

    return acquire


def redis_semaphore(client: Any, key: str) -> Callable[[], Callable[[], Any]]:
    from redis_semaphore import Semaphore

    def acquire() -> Callable[[], Any]:
        sem = Semaphore(client, count=PERMITS, namespace=key)
        sem.acquire()
        return sem.release

    return acquire


def init_redis_semaphore(admin: Any, key: str) -> None:
    """Create the peer's token list before the workers race to initialise it."""
    from redis_semaphore import Semaphore

    Semaphore(admin, count=PERMITS, namespace=key)._exists_or_init()


CONTENDED = [
    Contender("4-token BLPOP (floor)", "bench.floors:blpop_tokens", BLPOP_PROFILE,
              prepare="bench.floors:four_tokens"),
    Contender("ours", "bench.semaphore_bench:ours", OURS_PROFILE),
    Contender("redis-semaphore", "bench.semaphore_bench:redis_semaphore",
              REDIS_SEMAPHORE_PROFILE, prepare="bench.semaphore_bench:init_redis_semaphore"),
]
FLOOR, OURS, PEER = (c.label for c in CONTENDED)


def run(env: BenchEnv, log: Callable[[str], None] = print) -> SectionResult:
    result = SectionResult("semaphore", "Semaphore")
    scope = f"{THREADS} threads/{PERMITS} permits"
    plan = Plan(THREADS, WORK, WARMUP, WINDOW, capacity=PERMITS)
    runs = run_interleaved(env, "sem", CONTENDED, plan, progress=log)
    result.tables.append((
        f"{THREADS} threads, {PERMITS} permits, {WORK * 1000:g} ms work, "
        f"{env.seconds(WINDOW):g} s window, median of {env.rounds} interleaved rounds",
        *detail_rows(runs),
    ))
    contended_targets(result, scope, runs, OURS, FLOOR, "BLPOP", (PEER,))
    result.notes.append("overlaps here: grants made while 4 others held permits (must be 0); "
                        "handoff is not measured with more than one permit")
    return result
