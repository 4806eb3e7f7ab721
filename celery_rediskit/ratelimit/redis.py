"""``RedisRateLimitStorage``: rate limiters in Redis, one Lua script and one round trip a check.

Limiter ``K`` is one key, ``<prefix>:rate:{K}`` (its own hash tag, so it works on Redis Cluster),
holding ``"<tat> <interval> <burst> <rate>"``: GCRA's theoretical arrival time on the server's
clock (microseconds), then the last check's rate for reports. Every check reads the server's
clock (``TIME``) in the script, so the clocks of the clients never matter. The key expires at
``tat``, when the bucket is full again (``lua/rate_check.lua``); a refused check writes nothing.

If Redis cannot be reached, a check raises redis-py's ``ConnectionError``/``TimeoutError``
(after the client's own retries): it never answers "allowed" or "refused" without Redis.
"""

from __future__ import annotations

from typing import Any

from .._redis.clients import check_client
from .._redis.keys import KeySpace
from .._redis.scripts import load_script
from .._validate import resource_key
from .base import (
    Rate,
    RateDecision,
    RateInfo,
    RateLimitStorage,
    parse_stored,
    rate_info,
)

__all__ = ["RedisRateLimitStorage"]


class RedisRateLimitStorage(RateLimitStorage):
    """Rate limiter storage on a redis-py client (``redis.Redis`` or ``redis.RedisCluster``).

    ``prefix`` (default ``"rediskit"``) starts every key this storage uses.
    """

    def __init__(self, client: Any, prefix: str = "rediskit") -> None:
        self.client = check_client("client", client)
        self.keys = KeySpace(prefix)
        self._check = load_script("rate_check")
        self._cancel = load_script("rate_cancel")
        self._info = load_script("rate_info")

    def check(self, key: str, rate: Rate, burst: int, cost: int = 1,
              max_wait: float | None = 0.0) -> RateDecision:
        limit = -1 if max_wait is None else int(max_wait * 1_000_000)
        reply = self._check.run(self.client, self.keys.rate_list(key),
                                [rate.interval_us, burst, cost, limit, rate.text])
        allowed, wait, remaining, now, tat = reply
        return RateDecision(allowed == 1, int(wait) / 1_000_000, int(remaining),
                            int(now) / 1_000_000, int(tat))

    def cancel(self, key: str, decision: RateDecision, rate: Rate, cost: int = 1) -> bool:
        reply = self._cancel.run(self.client, self.keys.rate_list(key),
                                 [str(decision.token), cost * rate.interval_us])
        return int(reply) == 1

    def get_rate_info(self, key: str, rate: Rate | None = None,
                      burst: int | None = None) -> RateInfo:
        key = resource_key(key)
        stored, now = self._info.run(self.client, self.keys.rate_list(key), [])
        return rate_info(key, parse_stored(stored), int(now), rate, burst)

    def reset(self, key: str) -> bool:
        return int(self.client.delete(self.keys.rate_limiter(key))) > 0
