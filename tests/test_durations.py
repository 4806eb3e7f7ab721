"""One duration grammar: every entry point that takes a duration accepts and refuses the same
inputs, and a refusal names the option and the accepted form."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from celery import Celery

from celery_rediskit import (
    ConfigurationError,
    MemoryCacheProvider,
    RedisCacheProvider,
    cache_life,
    cached,
)
from celery_rediskit.integration.options import parse_policy
from celery_rediskit.integration.settings import DURATIONS, Settings, read_settings

VALID: list[tuple[Any, float]] = [
    (300, 300.0),
    (1.5, 1.5),
    ("300", 300.0),
    ("1.5", 1.5),
    ("30s", 30.0),
    ("500ms", 0.5),
    ("5m", 300.0),
    ("2h", 7200.0),
    ("1d", 86400.0),
    ("1w", 604800.0),
    (" 5 m ", 300.0),
    ("5M", 300.0),
]
INVALID: list[Any] = [0, -1, 0.0, "0", "-5", "", "  ", "abc", "5y", "1e3", "5 m s", True,
                      math.nan, math.inf, "inf", [5]]


class _Recording(MemoryCacheProvider):
    """A memory provider that remembers the lifetime each stored entry was given."""

    def __init__(self) -> None:
        super().__init__()
        self.lifetimes: list[float | str | None] = []

    def set(self, key: str, value: Any, ttl: float | str | None = None, **kw: Any) -> None:
        super().set(key, value, ttl, **kw)
        self.lifetimes.append(ttl)


def _cached_ttl(value: Any) -> float:
    return float(cached(ttl=value, provider=MemoryCacheProvider())(lambda: 1).ttl)


def _cache_life(value: Any) -> float:
    provider = _Recording()

    @cached(provider=provider)
    def compute() -> int:
        cache_life(value)
        return 1

    compute()
    (ttl,) = provider.lifetimes
    assert isinstance(ttl, float)
    return ttl


def _provider_set(provider: MemoryCacheProvider) -> Callable[[Any], float]:
    def run(value: Any) -> float:
        provider.set("k", 1, value)
        expires = provider._data["k"][1]  # type: ignore[attr-defined]
        assert expires is not None
        return expires - time.monotonic()

    return run


def _task_option(option: str) -> Callable[[Any], float]:
    def run(value: Any) -> float:
        options = {option: value}
        if option == "limit_timeout":
            options["concurrency_limit"] = "db:2"
        seconds = getattr(parse_policy(options, lambda x: x, False), option)
        assert isinstance(seconds, float)
        return seconds

    return run


def _setting(name: str) -> Callable[[Any], float]:
    def run(value: Any) -> float:
        app = Celery("durations", broker="redis://127.0.0.1:1/0", set_as_current=False)
        app.conf[f"rediskit_{name}"] = value  # as an environment variable or Django gives it
        return float(getattr(read_settings(app), name))

    return run


ENTRY_POINTS: dict[str, Callable[[Any], float]] = {
    "cached(ttl=)": _cached_ttl,
    "cache_life()": _cache_life,
    "MemoryCacheProvider.set(ttl)": _provider_set(MemoryCacheProvider()),
    "cache_ttl=": _task_option("cache_ttl"),
    "limit_timeout=": _task_option("limit_timeout"),
    **{f"rediskit_{name}": _setting(name) for name in DURATIONS},
}
NAMES = {  # what each entry point's error names
    "cached(ttl=)": "ttl", "cache_life()": "cache_life", "MemoryCacheProvider.set(ttl)": "ttl",
    "cache_ttl=": "cache_ttl", "limit_timeout=": "limit_timeout",
    **{f"rediskit_{name}": f"rediskit_{name}" for name in DURATIONS},
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize(("value", "seconds"), VALID, ids=[repr(v) for v, _ in VALID])
def test_every_entry_point_accepts_the_same_durations(entry: str, value: Any,
                                                      seconds: float) -> None:
    assert ENTRY_POINTS[entry](value) == pytest.approx(seconds, abs=0.05)


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("value", INVALID, ids=[repr(v) for v in INVALID])
def test_every_entry_point_refuses_the_same_inputs_naming_itself(entry: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=f"{NAMES[entry]} must be a number of seconds "
                                                 r"greater than 0 or a text like '30'"):
        ENTRY_POINTS[entry](value)


@pytest.mark.parametrize(("value", "seconds"), VALID, ids=[repr(v) for v, _ in VALID])
def test_the_redis_provider_parses_the_same_durations(client: redis.Redis, prefix: str,
                                                      value: Any, seconds: float) -> None:
    provider = RedisCacheProvider(client, prefix=prefix)
    provider.set("k", 1, value)
    assert provider.client.pttl(f"{prefix}:cache:e:{{cache/k}}") / 1000 == pytest.approx(
        seconds, abs=0.05)


def test_settings_given_as_text_are_seconds(redis_url: str) -> None:
    settings = Settings(url=redis_url, lease="30", queued_ttl="1h", retry_delay="500ms")
    assert (settings.lease, settings.queued_ttl, settings.retry_delay) == (30.0, 3600.0, 0.5)
