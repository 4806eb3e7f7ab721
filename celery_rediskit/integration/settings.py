"""Settings of the Celery integration, read once from ``app.conf`` under ``rediskit_*``.

Django-style ``CELERY_REDISKIT_*`` names work through Celery's own namespace handling
(``app.config_from_object("django.conf:settings", namespace="CELERY")``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from .._redis.keys import KeySpace
from ..durations import parse_duration
from ..errors import ConfigurationError

__all__ = ["DURATIONS", "REDIS_SCHEMES", "Settings", "read_settings"]

DURATIONS = ("lease", "queued_ttl", "retry_delay", "limit_timeout", "socket_timeout",
             "claims_ttl")
"""The settings that are durations (seconds)."""

REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+socket://", "valkey://", "valkeys://")


@dataclass(frozen=True)
class Settings:
    """Every ``rediskit_*`` setting. Times are seconds: numbers, or text in the library's one
    duration grammar (``"30"``, ``"30s"``, ``"5m"``; see :mod:`celery_rediskit.durations`),
    as environment variables and Django settings give them.

    - ``url``: Redis for locks, permits, claims and the cache (default: the broker URL when it
      is a Redis URL).
    - ``prefix``: first part of every key (default ``"rediskit"``).
    - ``lease``: how long a task's lock or permit lives without renewal; the worker renews it
      every ``lease / 3`` while the task runs, so a killed worker frees it within ``lease``.
    - ``queued_ttl``: lifetime of a ``singleton_scope="queued"`` claim while its message waits
      in the queue (countdown/ETA are added). Nothing renews a queued message, so a message
      that is lost blocks duplicates for at most this long.
    - ``retry_delay``: base countdown when a locked or limited task is re-queued; each
      re-queue waits ``retry_delay`` × a random factor in [0.5, 1.5).
    - ``limit_timeout``: how long ``on_limited="wait"`` blocks for a permit by default.
    - ``socket_timeout``: socket and connect timeout of the integration's Redis client.
    - ``claims_ttl``: lifetime of the record of what a task holds (task id → keys), which lets
      any process release by task id (revoke, hard time limit).
    """

    url: str
    prefix: str = "rediskit"
    lease: float = 30.0
    queued_ttl: float = 3600.0
    retry_delay: float = 1.0
    limit_timeout: float = 60.0
    socket_timeout: float = 5.0
    claims_ttl: float = 86400.0

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url.startswith(REDIS_SCHEMES):
            raise ConfigurationError(
                f"rediskit_url must be a Redis URL (redis://, rediss:// or unix://), "
                f"got {self.url!r}"
            )
        try:
            KeySpace(self.prefix)  # validates the prefix
        except ConfigurationError as exc:
            raise ConfigurationError(f"rediskit_{exc}") from None  # "rediskit_prefix must be..."
        for name in DURATIONS:
            object.__setattr__(
                self, name, parse_duration(getattr(self, name), f"rediskit_{name}")
            )


def _broker_redis_url(conf: Any) -> str | None:
    broker = conf.get("broker_url")
    if isinstance(broker, (list, tuple)):
        broker = broker[0] if broker else None
    if isinstance(broker, str):
        first = broker.split(";")[0].strip()
        if first.startswith(REDIS_SCHEMES):
            return first
    return None


def read_settings(app: Any, **overrides: Any) -> Settings:
    """Read ``rediskit_*`` from ``app.conf``; keyword ``overrides`` (not None) win."""
    conf = app.conf
    values: dict[str, Any] = {}
    for f in fields(Settings):
        value = overrides.get(f.name)
        if value is None:
            value = conf.get(f"rediskit_{f.name}")
        if value is not None:
            values[f.name] = value
    if "url" not in values:
        url = _broker_redis_url(conf)
        if url is None:
            raise ConfigurationError(
                "rediskit_url is not set and the broker URL is not a Redis URL: set "
                "app.conf.rediskit_url = 'redis://host:6379/0' (CELERY_REDISKIT_URL in Django "
                "settings) or pass RedisKit(app, url=...)"
            )
        values["url"] = url
    unknown = set(overrides) - {f.name for f in fields(Settings)}
    if unknown:
        raise ConfigurationError(f"unknown RedisKit setting(s): {', '.join(sorted(unknown))}")
    return replace(Settings(url=values.pop("url")), **values)
