"""The renewal section: how long the server spends in each renewal script with many leases held.

Redis runs one script at a time: while a renewal script runs, every other client of the server
waits. The renewer sends every lease of a client in one round trip, split into scripts of a
bounded cost (``_redis/renew_batch.py``). For 5,000 and 50,000 held leases (locks, each with
one companion key, as a Celery task's lock carries its claims record), this renews them all
through the process's renewer (``renew_now``) and reads the server's own time per script from
``SLOWLOG`` (threshold 0 while measuring: the private server only). Reported: scripts per
renewal, the longest and the median script, the server time of the whole renewal, and, for
comparison, one script over the first 5,000 leases (what an unsplit renewal costs).

Targets: the 99th percentile of the renewal scripts at most 1 ms (the longest is printed too);
every lease renewed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from celery_rediskit import RedisMutexStorage
from celery_rediskit._redis.renew_batch import _call_args, _items
from celery_rediskit._redis.scripts import load_script
from celery_rediskit.lease import new_owner_id
from celery_rediskit.mutex import MutexLease
from celery_rediskit.renewal import renewer

from .common import BenchEnv, SectionResult, Target, at_most

COUNTS = (5_000, 50_000)
REPEATS = 3
LEASE = 60.0
LONGEST_MS = 1.0


def _hold(env: BenchEnv, storage: RedisMutexStorage, count: int, tag: str) -> list[MutexLease]:
    """``count`` held locks with one companion key each, written directly (pipelined)."""
    leases: list[MutexLease] = []
    pipe = env.admin.pipeline(transaction=False)
    for i in range(count):
        name = f"{tag}-{i}"
        owner = new_owner_id()
        companion = env.key("rec", tag, i)
        pipe.set(storage.renewal_key(name), owner, px=int(LEASE * 1000))
        pipe.set(companion, "record", px=int(LEASE * 1000))
        leases.append(MutexLease(storage, name, owner, LEASE, companion_keys=(companion,)))
        if len(pipe) >= 2000:
            pipe.execute()
    pipe.execute()
    return leases


class _SlowLog:
    """Every command's server time while active (SLOWLOG with threshold 0)."""

    def __init__(self, admin: Any) -> None:
        self.admin = admin
        self.saved = admin.config_get("slowlog-*")

    def __enter__(self) -> _SlowLog:
        self.admin.config_set("slowlog-max-len", 100_000)
        self.admin.config_set("slowlog-log-slower-than", 0)
        self.admin.slowlog_reset()
        return self

    def script_times(self, sha: str) -> list[float]:
        """Server seconds of each EVALSHA of ``sha`` logged so far."""
        entries = self.admin.slowlog_get(100_000)
        out = []
        for e in entries:
            command = e["command"]
            words = command.split() if isinstance(command, (bytes, str)) else list(command)
            words = [w.decode() if isinstance(w, bytes) else str(w) for w in words]
            if len(words) > 1 and words[0].upper() == "EVALSHA" and words[1] == sha:
                out.append(e["duration"] / 1e6)
        return out

    def __exit__(self, *exc: object) -> None:
        for name, value in self.saved.items():
            self.admin.config_set(name, value)
        self.admin.slowlog_reset()


def run(env: BenchEnv, log: Callable[[str], None]) -> SectionResult:
    res = SectionResult("renewal", "Renewal: server time per script with 5,000 and 50,000 "
                                   "leases held")
    if not env.owns_server:
        res.skipped = "needs the private server (SLOWLOG threshold 0); unset REDIS_URL"
        return res
    client = env.client()
    storage = RedisMutexStorage(client, prefix=env.prefix)
    sha = load_script("renew_batch").sha
    rows = []
    try:
        for count in COUNTS:
            leases = _hold(env, storage, count, f"r{count}")
            renewer().renew_now(leases[:1])  # the renewal connection, the script loaded
            longest, median_ms, scripts, total, walls, renewed = [], [], [], [], [], []
            p99: list[float] = []
            for _ in range(REPEATS):
                with _SlowLog(env.admin) as slow:
                    started = time.perf_counter()
                    renewer().renew_now(leases)
                    walls.append(time.perf_counter() - started)
                    times = slow.script_times(sha)
                longest.append(max(times) * 1000)
                p99.append(sorted(times)[int(0.99 * (len(times) - 1))] * 1000)
                median_ms.append(statistics.median(times) * 1000)
                scripts.append(len(times))
                total.append(sum(times) * 1000)
                renewed.append(sum(not lease.lost for lease in leases))
            rows.append([f"{count:,} leases", f"{statistics.median(scripts):.0f}",
                         f"{statistics.median(longest):.2f} ms",
                         f"{statistics.median(p99):.2f} ms",
                         f"{statistics.median(median_ms):.2f} ms",
                         f"{statistics.median(total):.1f} ms",
                         f"{statistics.median(walls) * 1000:.0f} ms", f"{min(renewed):,}"])
            res.targets.append(at_most(f"{count:,} leases: renewal scripts, p99",
                                       statistics.median(p99), LONGEST_MS, "{:.2f} ms",
                                       f"longest {statistics.median(longest):.2f} ms"))
            res.targets.append(Target(f"{count:,} leases: all renewed", f"{min(renewed):,}",
                                      f"{count:,}", None, "all", min(renewed) == count))
            log(f"renewal {count}: {rows[-1]}")
            if count == COUNTS[0]:
                # One script over all of them: what a renewal cost before it was split.
                chunk = leases[:count]
                keys, args = _call_args(chunk, _items(chunk), list(range(count)))
                with _SlowLog(env.admin) as slow:
                    load_script("renew_batch").run(client, keys, args)
                    one = slow.script_times(sha)
                rows.append([f"{count:,} leases in one script (unsplit)", "1",
                             f"{max(one) * 1000:.2f} ms", "-", "-",
                             f"{max(one) * 1000:.1f} ms", "-", "-"])
            for lease in leases:
                lease.released = True  # the keys go with the prefix's cleanup
            env.cleanup()
    finally:
        client.close()
    res.tables.append((
        f"one renewal of every lease held (renewer().renew_now), median of {REPEATS}; "
        f"server time from SLOWLOG",
        ["held", "scripts", "longest", "p99", "median script", "server total", "wall",
         "renewed"],
        rows,
    ))
    res.notes.append("each lease is a lock with one companion key (a task's claims record); "
                     "every script of a renewal is sent in one round trip; SLOWLOG times are "
                     "wall time on the server: on a loaded machine the longest of hundreds of "
                     "scripts includes the server being descheduled, so the target is on the "
                     "99th percentile and the longest is printed beside it")
    return res
