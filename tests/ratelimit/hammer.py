"""A process hammering one rate limiter (the accuracy test): ``hammer.py URL PREFIX KEY RATE
BURST SECONDS``.

It says it is ready (``RPUSH <prefix>:ready``), waits for the go (``BLPOP <prefix>:go``, whose
value is the start on the server's clock, in us), then checks as fast as it can until the
server's clock passes start + SECONDS, and prints the server times (us) of its grants as JSON.
"""

from __future__ import annotations

import json
import sys

import redis

from celery_rediskit import RedisRateLimitStorage, create_rate_limiter


def main(url: str, prefix: str, key: str, rate: str, burst: str, seconds: str) -> None:
    client = redis.Redis.from_url(url)
    limiter = create_rate_limiter(rate, int(burst), RedisRateLimitStorage(client, prefix=prefix))
    client.rpush(f"{prefix}:ready", 1)
    _, start = client.blpop([f"{prefix}:go"], timeout=60) or (None, b"0")
    end = int(start) + float(seconds) * 1_000_000
    granted: list[int] = []
    while True:
        decision = limiter.check(key)
        now = round(decision.now * 1_000_000)
        if now >= end:
            break
        if decision.allowed:
            granted.append(now)
    print(json.dumps(granted))


if __name__ == "__main__":
    main(*sys.argv[1:])
