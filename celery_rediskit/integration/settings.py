"""Settings of the Celery integration, read once from ``app.conf`` under ``rediskit_*``.

Django-style ``CELERY_REDISKIT_*`` names work through Celery's own namespace handling
(``app.config_from_object("django.conf:settings", namespace="CELERY")``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import unquote, urlsplit

from .._redis.keys import IDLE_TTL, KeySpace
from ..durations import parse_duration
from ..errors import ConfigurationError

__all__ = [
    "DURATIONS",
    "PARK_AHEAD_HOLD",
    "PARK_AHEAD_WAIT",
    "REDIS_SCHEMES",
    "SENTINEL_SCHEME",
    "SentinelAddress",
    "Settings",
    "read_settings",
]

DURATIONS = ("lease", "queued_ttl", "retry_delay", "retry_delay_max", "limit_timeout",
             "socket_timeout", "claims_ttl", "idle_ttl", "park_ahead_wait")
"""The settings that are durations (seconds)."""

PARK_AHEAD_HOLD = 1.0
"""Default of ``rediskit_park_ahead_hold``, seconds."""

PARK_AHEAD_WAIT = 5.0
"""Default of ``rediskit_park_ahead_wait``, seconds."""

REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+socket://", "valkey://", "valkeys://")
"""URL schemes of one Redis server (or, with ``rediskit_cluster``, of a cluster's seed node)."""

SENTINEL_SCHEME = "sentinel://"
"""The scheme of a Sentinel URL, in kombu's form: ``sentinel://h1:26379;sentinel://h2:26379``."""

SENTINEL_PORT = 26379
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class SentinelAddress:
    """A ``sentinel://`` URL taken apart: the sentinels, and what the first URL says about the
    master (credentials and database number go to the master, as kombu does)."""

    sentinels: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    db: int = 0


@dataclass(frozen=True)
class Settings:
    """Every ``rediskit_*`` setting. Times are seconds: numbers, or text in the library's one
    duration grammar (``"30"``, ``"30s"``, ``"5m"``; see :mod:`celery_rediskit.durations`),
    as environment variables and Django settings give them.

    - ``url``: Redis for locks, permits, claims and the cache: ``redis://``, ``rediss://``
      (TLS), ``unix://``, or Sentinel in kombu's form (``sentinel://h1:26379;sentinel://...``,
      with ``sentinel_master``). Default: the broker URL when it is a Redis or Sentinel URL,
      else the result backend URL when that is (a RabbitMQ broker with a Redis result backend
      is common). None only when ``RedisKit(app, client=...)`` was given a ready client.
    - ``ssl``: TLS options of the client (``ssl_ca_certs``, ``ssl_cert_reqs``,
      ``ssl_certfile``, ``ssl_keyfile``, as redis-py names them), used with a ``rediss://``
      URL, and with a ``sentinel://`` URL (TLS to the master) whenever set. Default: those of
      the URL taken, ``broker_use_ssl`` or ``redis_backend_use_ssl``.
    - ``sentinel_master``: the master's name with a ``sentinel://`` URL. Default, for a URL
      taken from the broker (result backend): ``broker_transport_options["master_name"]``
      (``result_backend_transport_options["master_name"]``).
    - ``cluster``: True when ``url`` is a node of a Redis Cluster (``redis://`` or
      ``rediss://``); the client is then a ``redis.cluster.RedisCluster``.
    - ``redis_options``: keyword arguments passed to the client as they are (redis-py's
      names: ``health_check_interval``, ``socket_keepalive``, ``retry``, ``ssl_*``, ...; with
      Sentinel, ``sentinel_kwargs`` for the connections to the sentinels). They win over the
      library's own (``socket_timeout``, the TLS options). Default: for a Sentinel URL taken
      from the broker, ``sentinel_kwargs`` of its transport options.
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
    - ``limit_timeout``: how long ``on_limited="wait"`` blocks for a permit, and
      ``on_rate_limited="wait"`` for a rate slot, by default.
    - ``socket_timeout``: socket and connect timeout of the integration's Redis client.
    - ``claims_ttl``: lifetime of the record of what a task holds (task id → keys), which lets
      any process release by task id (revoke, hard time limit).
    - ``idle_ttl``: how long the keys of a lock, semaphore or cache entry outlive their last
      use (default a week), so names used once (per-user locks, ``tenant:{id}`` templates)
      leave nothing behind; a semaphore idle that long starts again from its declared permits.
    - ``metrics_port``: serve the worker's Prometheus metrics (``pip install
      celery-rediskit[metrics]``) on this TCP port, aggregated over its pool processes
      (``integration/worker_metrics.py``); 0 picks a free port (logged). Default None: off.
    - ``metrics_address``: the address that server listens on (default ``"0.0.0.0"``).
    - ``park_ahead_hold``: parked tasks (``"park"``): a run that held its lock or permit at
      most this long also sends, at its release, the next parked messages *ahead* of their
      turn, to wait in a worker for it (see the README's "Parked tasks"); ``0`` sends nothing
      ahead. Default 1 s.
    - ``park_ahead_wait``: how long a message sent ahead waits in its worker slot for its
      turn before it ends, its entry still parked at its turn. Default 5 s.
    - ``trace_commands``: True sends the library's commands through redis-py's
      ``execute_command`` and pipelines, where OpenTelemetry's redis instrumentation sees
      them (:func:`celery_rediskit.trace_commands`); it costs some speed (``make bench``).
    """

    url: str | None
    ssl: Mapping[str, Any] | None = None
    sentinel_master: str | None = None
    cluster: bool = False
    redis_options: Mapping[str, Any] = field(default_factory=dict)
    prefix: str = "rediskit"
    lease: float = 30.0
    queued_ttl: float = 3600.0
    retry_delay: float = 1.0
    retry_delay_max: float = 30.0
    limit_timeout: float = 60.0
    socket_timeout: float = 5.0
    claims_ttl: float = 86400.0
    idle_ttl: float = IDLE_TTL
    metrics_port: int | None = None
    metrics_address: str = "0.0.0.0"
    park_ahead_hold: float = PARK_AHEAD_HOLD
    park_ahead_wait: float = PARK_AHEAD_WAIT
    trace_commands: bool = False

    def __post_init__(self) -> None:
        url = self.url
        if url is not None and not (
            isinstance(url, str) and url.startswith((*REDIS_SCHEMES, SENTINEL_SCHEME))
        ):
            raise ConfigurationError(
                f"rediskit_url must be a Redis URL (redis://, rediss:// or unix://) or "
                f"Sentinel URLs (sentinel://host:26379;sentinel://host2:26379), got {url!r}"
            )
        object.__setattr__(self, "cluster", _flag(self.cluster, "rediskit_cluster"))
        object.__setattr__(self, "trace_commands",
                           _flag(self.trace_commands, "rediskit_trace_commands"))
        if self.redis_options is None:
            object.__setattr__(self, "redis_options", {})
        if not isinstance(self.redis_options, Mapping) or not all(
            isinstance(k, str) for k in self.redis_options
        ):
            raise ConfigurationError(
                f"rediskit_redis_options must be a mapping of redis-py keyword arguments "
                f"(e.g. {{'health_check_interval': 10}}), got {self.redis_options!r}"
            )
        object.__setattr__(self, "redis_options", dict(self.redis_options))
        if self.ssl is not None and not isinstance(self.ssl, Mapping):
            raise ConfigurationError(
                f"rediskit_ssl must be a mapping of redis-py TLS options "
                f"(e.g. {{'ssl_ca_certs': '/path/ca.pem'}}), got {self.ssl!r}"
            )
        if self.is_sentinel:
            if self.cluster:
                raise ConfigurationError(
                    "rediskit_cluster is True but rediskit_url is a sentinel:// URL: a "
                    "cluster is reached through one of its nodes (redis:// or rediss://)"
                )
            if not isinstance(self.sentinel_master, str) or not self.sentinel_master:
                raise ConfigurationError(
                    f"rediskit_sentinel_master must name the Sentinel master (as in "
                    f"'sentinel monitor NAME ...') for a sentinel:// rediskit_url, got "
                    f"{self.sentinel_master!r}"
                )
            self.sentinel_address()  # validates the URL
        elif self.cluster and url is not None and not url.startswith(
            ("redis://", "rediss://", "valkey://", "valkeys://")
        ):
            raise ConfigurationError(
                f"rediskit_cluster needs a redis:// or rediss:// rediskit_url (a node of the "
                f"cluster), got {url!r}"
            )
        try:
            KeySpace(self.prefix)  # validates the prefix
        except ConfigurationError as exc:
            raise ConfigurationError(f"rediskit_{exc}") from None  # "rediskit_prefix must be..."
        object.__setattr__(self, "metrics_port", _port(self.metrics_port))
        if not isinstance(self.metrics_address, str):
            raise ConfigurationError(
                f"rediskit_metrics_address must be an address to listen on, such as "
                f"'0.0.0.0' or '127.0.0.1', got {self.metrics_address!r}")
        for name in DURATIONS:
            object.__setattr__(
                self, name, parse_duration(getattr(self, name), f"rediskit_{name}")
            )
        object.__setattr__(self, "park_ahead_hold", _off_or_duration(
            self.park_ahead_hold, "rediskit_park_ahead_hold", "nothing is sent ahead"))

    @property
    def is_sentinel(self) -> bool:
        """True when ``url`` is a ``sentinel://`` URL."""
        return self.url is not None and self.url.startswith(SENTINEL_SCHEME)

    def tls_options(self) -> dict[str, Any]:
        """Keyword arguments for the client: the TLS options, for a TLS URL; for a Sentinel
        URL, ``ssl=True`` and the options whenever TLS options are set."""
        if self.is_sentinel:
            return {"ssl": True, **self.ssl} if self.ssl is not None else {}
        if self.url is not None and self.url.startswith(TLS_SCHEMES):
            return dict(self.ssl or {})
        return {}

    def sentinel_address(self) -> SentinelAddress:
        """The sentinels and the master's credentials of a ``sentinel://`` URL."""
        if self.url is None or not self.is_sentinel:
            raise ConfigurationError(f"rediskit_url is not a sentinel:// URL: {self.url!r}")
        return parse_sentinel_url(self.url)


def parse_sentinel_url(url: str) -> SentinelAddress:
    """Take apart ``sentinel://[user:password@]host[:port][/db];sentinel://host2...``.

    A missing port is 26379. Credentials and the database number are the master's, taken
    from the first URL that has them (kombu reads them from the first)."""
    sentinels: list[tuple[str, int]] = []
    username = password = None
    db: int | None = None
    for part in (p.strip() for p in url.split(";")):
        if not part:
            continue
        bad = ConfigurationError(
            f"rediskit_url: each part of a Sentinel URL must be sentinel://host:port, "
            f"got {part!r} in {url!r}"
        )
        if not part.startswith(SENTINEL_SCHEME):
            raise bad
        try:
            parts = urlsplit(part)
            host, port = parts.hostname, parts.port or SENTINEL_PORT
        except ValueError:
            raise bad from None
        if not host:
            raise bad
        sentinels.append((host, port))
        if parts.password is not None and password is None:
            username = unquote(parts.username) if parts.username else None
            password = unquote(parts.password)
        path = parts.path.strip("/")
        if path and db is None:
            if not path.isdigit():
                raise bad
            db = int(path)
    if not sentinels:
        raise ConfigurationError(f"rediskit_url names no sentinel: {url!r}")
    return SentinelAddress(tuple(sentinels), username, password, db or 0)


def _flag(value: Any, name: str) -> bool:
    # A boolean setting: True/False, or text from environment variables and Django settings.
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigurationError(f"{name} must be True or False, got {value!r}")


def _off_or_duration(value: Any, name: str, off: str) -> float:
    # A duration, or 0 (what ``off`` says); text from environment variables and Django.
    if not isinstance(value, bool) and (value == 0 or (isinstance(value, str)
                                                        and value.strip() == "0")):
        return 0.0
    try:
        return parse_duration(value, name)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{exc} (or 0: {off})") from None


def _port(value: Any) -> int | None:
    # A TCP port, or None; text from environment variables and Django settings.
    if value is None:
        return None
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or not 0 <= int(text) <= 65535:
        raise ConfigurationError(
            f"rediskit_metrics_port must be a TCP port number (0 to 65535; 0 picks a free "
            f"one), got {value!r}")
    return int(text)


TLS_SCHEMES = ("rediss://", "valkeys://")


def _redis_url(value: Any) -> str | None:
    """The URL of a broker/backend setting when it is a Redis or Sentinel URL: the first of
    ``;``-separated (or listed) failover Redis URLs, or every ``sentinel://`` URL (kombu's
    form)."""
    if isinstance(value, (list, tuple)):
        value = ";".join(str(v) for v in value)
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(";") if p.strip()]
        if parts and parts[0].startswith(SENTINEL_SCHEME):
            return ";".join(p for p in parts if p.startswith(SENTINEL_SCHEME))
        if parts and parts[0].startswith(REDIS_SCHEMES):
            return parts[0]
    return None


@dataclass(frozen=True)
class _Inherited:
    url: str
    ssl: Mapping[str, Any] | None
    transport_options: Mapping[str, Any]


def _inherited_url(conf: Any) -> _Inherited | None:
    """The broker's URL, TLS and transport options if it is Redis, else the result
    backend's."""
    broker = _redis_url(conf.get("broker_url"))
    if broker is not None:
        return _Inherited(broker, _ssl_options(conf.get("broker_use_ssl")),
                          conf.get("broker_transport_options") or {})
    backend = _redis_url(conf.get("result_backend"))
    if backend is not None:
        return _Inherited(backend, _ssl_options(conf.get("redis_backend_use_ssl")),
                          conf.get("result_backend_transport_options") or {})
    return None


def _ssl_options(value: Any) -> Mapping[str, Any] | None:
    # Celery takes True for "TLS with defaults": a rediss:// URL already says so; a Sentinel
    # URL does not, so True is kept as "TLS, no options" ({}).
    if value is True:
        return {}
    return dict(value) if isinstance(value, Mapping) and value else None


def read_settings(app: Any, *, need_url: bool = True, **overrides: Any) -> Settings:
    """Read ``rediskit_*`` from ``app.conf``; keyword ``overrides`` (not None) win.

    ``need_url=False`` (a ready client was given): no URL is looked for unless one is set."""
    conf = app.conf
    values: dict[str, Any] = {}
    for f in fields(Settings):
        value = overrides.get(f.name)
        if value is None:
            value = conf.get(f"rediskit_{f.name}")
        if value is not None:
            values[f.name] = value
    unknown = set(overrides) - {f.name for f in fields(Settings)}
    if unknown:
        raise ConfigurationError(f"unknown RedisKit setting(s): {', '.join(sorted(unknown))}")
    if "url" not in values and need_url:
        inherited = _inherited_url(conf)
        if inherited is None:
            raise ConfigurationError(
                "rediskit_url is not set and neither the broker nor the result backend is a "
                "Redis URL: set app.conf.rediskit_url = 'redis://host:6379/0' "
                "(CELERY_REDISKIT_URL in Django settings) or pass RedisKit(app, url=...)"
            )
        values["url"] = inherited.url
        if "ssl" not in values:
            values["ssl"] = inherited.ssl
        if inherited.url.startswith(SENTINEL_SCHEME):
            options = inherited.transport_options
            if "sentinel_master" not in values and options.get("master_name"):
                values["sentinel_master"] = options["master_name"]
            redis_options = dict(values.get("redis_options") or {})
            if "sentinel_kwargs" not in redis_options and options.get("sentinel_kwargs"):
                redis_options["sentinel_kwargs"] = options["sentinel_kwargs"]
                values["redis_options"] = redis_options
    url = values.pop("url", None)
    return Settings(url=url, **values)
