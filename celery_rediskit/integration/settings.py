"""Settings of the Celery integration, read once from ``app.conf`` under ``rediskit_*``.

Django-style ``CELERY_REDISKIT_*`` names work through Celery's own namespace handling
(``app.config_from_object("django.conf:settings", namespace="CELERY")``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from .._redis.keys import IDLE_TTL, KeySpace
from ..durations import parse_duration
from ..errors import ConfigurationError

__all__ = ["DURATIONS", "REDIS_SCHEMES", "Settings", "read_settings"]

DURATIONS = ("lease", "queued_ttl", "retry_delay", "retry_delay_max", "limit_timeout",
             "socket_timeout", "claims_ttl", "idle_ttl")
"""The settings that are durations (seconds)."""

REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+socket://", "valkey://", "valkeys://")


@dataclass(frozen=True)
class Settings:
    """Every ``rediskit_*`` setting. Times are seconds: numbers, or text in the library's one
    duration grammar (``"30"``, ``"30s"``, ``"5m"``; see :mod:`celery_rediskit.durations`),
    as environment variables and Django settings give them.

    - ``url``: Redis for locks, permits, claims and the cache. Default: the broker URL when it
      is a Redis URL, else the result backend URL when that is (a RabbitMQ broker with a Redis
      result backend is common).
    - ``ssl``: TLS options of the client (``ssl_ca_certs``, ``ssl_cert_reqs``,
      ``ssl_certfile``, ``ssl_keyfile``, as redis-py names them). Default: those of the URL
      taken, ``broker_use_ssl`` or ``redis_backend_use_ssl``.
    - ``prefix``: first part of every key (default ``"rediskit"``).
    - ``lease``: how long a task's lock or permit lives without renewal; the worker renews it
      every ``lease / 3`` while the task runs, so a killed worker frees it within ``lease``.
    - ``queued_ttl``: lifetime of a ``singleton_scope="queued"`` claim while its message waits
      in the queue (countdown/ETA are added). Nothing renews a queued message, so a message
      that is lost blocks duplicates for at most this long.
    - ``retry_delay``: countdown of the first re-queue of a locked or limited task; each
      further re-queue of the same message doubles it, up to ``retry_delay_max``, jittered
      within the upper half of the step (tasks with Celery's ``retry_backoff`` use theirs).
    - ``retry_delay_max``: the ceiling of that backoff.
    - ``limit_timeout``: how long ``on_limited="wait"`` blocks for a permit by default.
    - ``socket_timeout``: socket and connect timeout of the integration's Redis client.
    - ``claims_ttl``: lifetime of the record of what a task holds (task id → keys), which lets
      any process release by task id (revoke, hard time limit).
    - ``idle_ttl``: how long the keys of a lock, semaphore or cache entry outlive their last
      use (default a week), so names used once (per-user locks, ``tenant:{id}`` templates)
      leave nothing behind; a semaphore idle that long starts again from its declared permits.
    """

    url: str
    ssl: Mapping[str, Any] | None = None
    prefix: str = "rediskit"
    lease: float = 30.0
    queued_ttl: float = 3600.0
    retry_delay: float = 1.0
    retry_delay_max: float = 30.0
    limit_timeout: float = 60.0
    socket_timeout: float = 5.0
    claims_ttl: float = 86400.0
    idle_ttl: float = IDLE_TTL

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

    def tls_options(self) -> dict[str, Any]:
        """Keyword arguments for redis-py's ``from_url``: the TLS options, for a TLS URL."""
        return dict(self.ssl or {}) if self.url.startswith(TLS_SCHEMES) else {}


TLS_SCHEMES = ("rediss://", "valkeys://")


def _redis_url(value: Any) -> str | None:
    """The first URL of a broker/backend setting (a list, or ``;``-separated failover URLs)
    when it is a Redis URL."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if isinstance(value, str):
        first = value.split(";")[0].strip()
        if first.startswith(REDIS_SCHEMES):
            return first
    return None


def _inherited_url(conf: Any) -> tuple[str, Mapping[str, Any] | None] | None:
    """The broker's URL and TLS options if it is Redis, else the result backend's."""
    broker = _redis_url(conf.get("broker_url"))
    if broker is not None:
        return broker, _ssl_options(conf.get("broker_use_ssl"))
    backend = _redis_url(conf.get("result_backend"))
    if backend is not None:
        return backend, _ssl_options(conf.get("redis_backend_use_ssl"))
    return None


def _ssl_options(value: Any) -> Mapping[str, Any] | None:
    # Celery takes True for "TLS with defaults"; the URL scheme (rediss://) already says so.
    return dict(value) if isinstance(value, Mapping) and value else None


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
        inherited = _inherited_url(conf)
        if inherited is None:
            raise ConfigurationError(
                "rediskit_url is not set and neither the broker nor the result backend is a "
                "Redis URL: set app.conf.rediskit_url = 'redis://host:6379/0' "
                "(CELERY_REDISKIT_URL in Django settings) or pass RedisKit(app, url=...)"
            )
        values["url"] = inherited[0]
        if "ssl" not in values:
            values["ssl"] = inherited[1]
    unknown = set(overrides) - {f.name for f in fields(Settings)}
    if unknown:
        raise ConfigurationError(f"unknown RedisKit setting(s): {', '.join(sorted(unknown))}")
    return replace(Settings(url=values.pop("url")), **values)
