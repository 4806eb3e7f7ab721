"""The cache section: a ``@cached`` hit against a raw redis-py ``GET`` of the same stored value.

For each value kind (int, 40-char string, small dict) a ``@cached`` function on a
``RedisCacheProvider`` is filled once; then each of ``2 * rounds + 1`` rounds times ``N``
hits and ``N`` raw ``client.get(entry key)`` of the very bytes the hit reads, in halves ordered
raw, hit, hit, raw (so a load drifting during the round weighs on both alike). Each side has
its own client of the same kind. Ratio: median over rounds of hit/raw within the round.

Round trips are counted on the connection (every packed send is one round trip, a pipeline
included): a hit must cost 1 (the ``GET``), a miss at most 3 (``GET``, the claim script, the
fill script) beside the function itself.

Targets: hit throughput at least 0.9x the raw ``GET``; 1 round trip per hit; at most 3 per miss.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis

from celery_rediskit.cache import RedisCacheProvider, cached

from .common import BenchEnv, SectionResult, Target, at_least, at_most, median, paired_ratio

N = 2000
MISSES = 200

VALUES: dict[str, Any] = {
    "int": 12345,
    "str(40)": "x" * 40,
    "dict(3 fields)": {"id": 5, "name": "alice", "tags": [1, 2, 3]},
}


class _CountingConnection(redis.Connection):
    """A real connection counting its round trips (each packed send) and the commands sent."""

    trips: list[int] = [0]  # replaced per client by _counting_client()
    commands: list[str] = []

    def send_command(self, *args: Any, **kwargs: Any) -> None:
        self.commands.append(str(args[0]).upper())
        super().send_command(*args, **kwargs)

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        self.trips[0] += 1
        super().send_packed_command(command, check_health)


def _counting_client(url: str) -> tuple[redis.Redis, list[int], list[str]]:
    trips, commands = [0], []
    cls = type("Counting", (_CountingConnection,), {"trips": trips, "commands": commands})
    pool = redis.ConnectionPool.from_url(url, connection_class=cls)
    return redis.Redis(connection_pool=pool), trips, commands


def _rate(call: Callable[[], Any], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        call()
    return n / (time.perf_counter() - start)


def run(env: BenchEnv, log: Callable[[str], None]) -> SectionResult:
    res = SectionResult("cache", "Cache: @cached hit vs raw redis-py GET; round trips per hit "
                                 "and miss")
    raw_client, hit_client = env.client(), env.client()
    provider = RedisCacheProvider(hit_client, prefix=env.prefix)
    count_client, trips, commands = _counting_client(env.url)
    counted = RedisCacheProvider(count_client, prefix=env.prefix)
    n = max(200, int(N * env.scale))
    rounds = 2 * env.rounds + 1
    try:
        funcs: dict[str, Any] = {}
        for label, stored in VALUES.items():
            def body(x: int, _v: Any = stored) -> Any:
                return _v

            fn = cached(ttl=600, provider=provider, name=f"bench.{label}")(body)
            fn(5)  # fill it
            funcs[label] = fn
        raw_rates: dict[str, list[float]] = {k: [] for k in VALUES}
        hit_rates: dict[str, list[float]] = {k: [] for k in VALUES}
        for round_no in range(rounds):
            for label, fn in funcs.items():
                entry = provider.entry_key(fn.key_for(5))
                assert raw_client.get(entry) is not None, "the entry must be stored"

                def raw(e: str = entry) -> Any:
                    return raw_client.get(e)

                def hit(f: Any = fn) -> Any:
                    return f(5)

                half = n // 2
                t_raw = half / _rate(raw, half)
                t_hit = 2 * half / _rate(hit, 2 * half)
                t_raw += half / _rate(raw, half)
                raw_rates[label].append(2 * half / t_raw)
                hit_rates[label].append(2 * half / t_hit)
            log(f"cache round {round_no + 1}/{rounds}: " + ", ".join(
                f"{k} {hit_rates[k][-1] / raw_rates[k][-1]:.2f}x" for k in VALUES))

        rows = []
        for label in VALUES:
            rows.append([label, f"{median(raw_rates[label]):,.0f}",
                         f"{median(hit_rates[label]):,.0f}",
                         f"{paired_ratio(hit_rates[label], raw_rates[label]):.2f}"])
            res.targets.append(at_least(
                f"hit throughput, {label}", median(hit_rates[label]),
                median(raw_rates[label]), "raw GET", 0.9,
                ratio=paired_ratio(hit_rates[label], raw_rates[label]),
            ))
        res.tables.append((f"ops/s, {n} calls per side per round, {rounds} rounds "
                           f"(raw, hit, hit, raw halves)",
                           ["value", "raw GET /s", "@cached hit /s", "hit/raw"], rows))

        # Round trips, on a counting connection (warmed up: connection set-up not counted).
        def ident(x: int) -> int:
            return x

        probe = cached(ttl=600, provider=counted, name="bench.roundtrips")(ident)
        probe(-1)
        probe(-1)
        trips[0] = 0
        commands.clear()
        for _ in range(N // 10):
            probe(-1)
        per_hit = trips[0] / (N // 10)
        hit_cmds = sorted(set(commands))
        trips[0] = 0
        commands.clear()
        for i in range(MISSES):
            probe(i)
        per_miss = trips[0] / MISSES
        miss_cmds = sorted(set(commands))
        res.tables.append(("round trips, counted on the connection", ["call", "round trips",
                                                                      "commands sent"],
                           [["hit", f"{per_hit:.2f}", " ".join(hit_cmds)],
                            ["miss (single-flight fill)", f"{per_miss:.2f}",
                             " ".join(miss_cmds)]]))
        res.targets.append(at_most("round trips per hit", per_hit, 1.0, "{:.2f}",
                                   "GET"))
        res.targets.append(at_most("round trips per miss", per_miss, 3.0, "{:.2f}",
                                   "GET + claim + fill"))
        res.targets.append(Target("hit returns the stored value", "yes" if all(
            funcs[k](5) == v for k, v in VALUES.items()) else "no", "", None, "equal",
            all(funcs[k](5) == v for k, v in VALUES.items())))
        return res
    finally:
        provider.clear()
        for c in (raw_client, hit_client, count_client):
            c.close()
