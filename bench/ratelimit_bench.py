"""The ratelimit section: a rate limiter check against the raw fixed-window floor.

The floor is what a rate limiter costs at the least on Redis: ``INCR key`` and ``PEXPIRE key``
in one round trip (a non-transactional redis-py pipeline), the usual fixed-window counter,
which lets twice the rate through around each window's edge. Ours is ``try_acquire`` on a
``RedisRateLimitStorage``: one ``EVALSHA`` of ``rate_check.lua`` (GCRA on the server's clock,
no window edge). Each side has its own client of the same kind; each of ``2 * rounds + 1``
rounds times ``N`` calls per side in halves ordered floor, ours, ours, floor. The limiter's rate
is high enough that every check is granted (a grant writes; a refusal only reads, so it is the
cheaper case, measured too, for information). Ratio: median over rounds of ours/floor within
the round.

Round trips are counted on the connection (every packed send is one, a pipeline included).

Targets: granted checks at least 0.9x the floor's throughput; 1 round trip per check.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis

from celery_rediskit import RedisRateLimitStorage, create_rate_limiter

from .common import BenchEnv, SectionResult, at_least, at_most, info, median, paired_ratio

N = 3000


class _TripConnection(redis.Connection):
    """A real connection counting its round trips (packed sends) and the commands sent."""

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
    cls = type("Trips", (_TripConnection,), {"trips": trips, "commands": commands})
    pool = redis.ConnectionPool.from_url(url, connection_class=cls)
    return redis.Redis(connection_pool=pool), trips, commands


def _rate(call: Callable[[], Any], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        call()
    return n / (time.perf_counter() - start)


def run(env: BenchEnv, log: Callable[[str], None]) -> SectionResult:
    res = SectionResult("ratelimit", "Rate limiter: check vs raw INCR+PEXPIRE; round trips "
                                     "per check")
    raw_client, ours_client = env.client(), env.client()
    count_client, trips, commands = _counting_client(env.url)
    storage = RedisRateLimitStorage(ours_client, prefix=env.prefix)
    granted = create_rate_limiter("1000000/s", storage=storage)
    refused = create_rate_limiter("1/h", storage=storage)
    refused.try_acquire("refused")
    n = max(300, int(N * env.scale))
    rounds = 2 * env.rounds + 1
    floor_key = env.key("floor")
    try:
        def floor() -> Any:
            pipe = raw_client.pipeline(transaction=False)
            pipe.incr(floor_key)
            pipe.pexpire(floor_key, 60_000)
            return pipe.execute()

        def ours() -> Any:
            return granted.try_acquire("granted")

        def ours_refused() -> Any:
            return refused.try_acquire("refused")

        assert ours()[0] and not ours_refused()[0]
        floor_rates: list[float] = []
        ours_rates: list[float] = []
        refused_rates: list[float] = []
        for round_no in range(rounds):
            half = n // 2
            t_floor = half / _rate(floor, half)
            t_ours = 2 * half / _rate(ours, 2 * half)
            t_floor += half / _rate(floor, half)
            floor_rates.append(2 * half / t_floor)
            ours_rates.append(2 * half / t_ours)
            refused_rates.append(_rate(ours_refused, half))
            log(f"ratelimit round {round_no + 1}/{rounds}: "
                f"{ours_rates[-1] / floor_rates[-1]:.2f}x")
        assert all(granted.try_acquire("granted")[0] for _ in range(10)), "checks must pass"
        ratio = paired_ratio(ours_rates, floor_rates)
        res.tables.append((
            f"calls/s, one client, {n} calls per side per round, {rounds} rounds "
            f"(floor, ours, ours, floor halves)",
            ["call", "calls/s", "vs floor"],
            [["INCR+PEXPIRE (pipeline, fixed window)", f"{median(floor_rates):,.0f}", "1.00"],
             ["try_acquire, granted", f"{median(ours_rates):,.0f}", f"{ratio:.2f}"],
             ["try_acquire, refused", f"{median(refused_rates):,.0f}",
              f"{paired_ratio(refused_rates, floor_rates):.2f}"]],
        ))
        res.targets.append(at_least("granted check throughput", median(ours_rates),
                                    median(floor_rates), "INCR+PEXPIRE", 0.9, ratio=ratio))
        res.targets.append(info("refused check throughput", median(refused_rates),
                                median(floor_rates), "INCR+PEXPIRE",
                                ratio=paired_ratio(refused_rates, floor_rates)))

        # Round trips, on a counting connection (warmed up: connection set-up not counted).
        counted = create_rate_limiter("1000000/s", storage=RedisRateLimitStorage(
            count_client, prefix=env.prefix))
        counted.try_acquire("counted")
        checks = 500
        trips[0] = 0
        commands.clear()
        for _ in range(checks):
            counted.try_acquire("counted")
        for _ in range(checks):
            counted.acquire("counted")
        per_check = trips[0] / (2 * checks)
        res.tables.append(("round trips, counted on the connection",
                           ["call", "round trips", "commands sent"],
                           [["try_acquire / acquire", f"{per_check:.2f}",
                             " ".join(sorted(set(commands)))]]))
        res.targets.append(at_most("round trips per check", per_check, 1.0, "{:.2f}",
                                   "EVALSHA"))
        return res
    finally:
        for c in (raw_client, ours_client, count_client):
            c.close()
