"""Cache hit throughput vs a raw redis-py GET of the same stored value (same run, interleaved).

``python tests/cache/bench_cache.py`` (starts a private server unless REDIS_URL is set), or
``run(client, prefix)`` from a benchmark harness. Returns ops/s per value kind and the ratio.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import uuid
from typing import Any

import redis

from celery_rediskit.cache import RedisCacheProvider, cached

VALUES: dict[str, Any] = {
    "int": 12345,
    "str(40)": "x" * 40,
    "dict(3 fields)": {"id": 5, "name": "alice", "tags": [1, 2, 3]},
}


def run(client: redis.Redis, prefix: str, n: int = 4000, rounds: int = 7) -> dict[str, Any]:
    provider = RedisCacheProvider(client, prefix=prefix)
    out: dict[str, Any] = {}
    try:
        for label, stored in VALUES.items():
            @cached(ttl=600, provider=provider, name=f"bench.{label}")
            def fn(x: int, _v: Any = stored) -> Any:
                return _v

            fn(5)
            entry = provider.entry_key(fn.key_for(5))
            raw_rates, hit_rates = [], []
            for _ in range(rounds):
                t0 = time.perf_counter()
                for _ in range(n):
                    client.get(entry)
                t1 = time.perf_counter()
                for _ in range(n):
                    fn(5)
                t2 = time.perf_counter()
                raw_rates.append(n / (t1 - t0))
                hit_rates.append(n / (t2 - t1))
            ratios = [h / r for h, r in zip(hit_rates, raw_rates, strict=True)]
            out[label] = {
                "raw_get_ops": statistics.median(raw_rates),
                "hit_ops": statistics.median(hit_rates),
                "ratio": statistics.median(ratios),
            }
    finally:
        provider.clear()
    return out


def main() -> None:
    url = os.environ.get("REDIS_URL")
    if url:
        results = run(redis.Redis.from_url(url), f"bench-{uuid.uuid4().hex[:8]}")
    else:
        from celery_rediskit.devserver import PrivateServer

        with PrivateServer() as server:
            results = run(redis.Redis.from_url(server.url), "bench")
    for label, r in results.items():
        print(f"{label:16} raw GET {r['raw_get_ops']:8.0f}/s  hit {r['hit_ops']:8.0f}/s  "
              f"ratio {r['ratio']:.3f} (target >= 0.9)", file=sys.stdout)


if __name__ == "__main__":
    main()
