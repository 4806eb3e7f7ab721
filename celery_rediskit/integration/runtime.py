"""What the integration keeps per app and per process.

:class:`Runtime` is one process's Redis objects for an app (client, storages, claims, the
cache provider), built from the app's :class:`Settings`; a prefork child builds its own after
``fork``. :func:`kit_of` finds the installed integration of an app (``RedisKit``), which the
task class, the control commands and the CLI reach through here rather than by importing
``extension.py`` (which imports them). :func:`make_client` is the one place a Redis client is
built from the settings (the runtime's, and the CLI's with short timeouts and no retries).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import redis
from redis.cluster import REDIS_ALLOWED_KEYS, RedisCluster
from redis.sentinel import Sentinel

from .._redis.clients import check_client
from .._redis.scripts import trace_commands
from .._redis.slots import is_cluster
from ..errors import ConfigurationError
from ..lease import Lease, LeaseKind
from ..mutex import Mutex, create_mutex
from ..mutex.redis import RedisMutexStorage
from ..ratelimit.redis import RedisRateLimitStorage
from ..semaphore import Semaphore, create_semaphore
from ..semaphore.redis import RedisSemaphoreStorage
from . import observe
from .claims import ClaimStore, Releaser
from .settings import Settings
from .signals import lease_lost

if TYPE_CHECKING:
    from .._redis.batch import ScriptCall
    from ..cache import RedisCacheProvider

__all__ = [
    "APP_ATTRIBUTE",
    "Kit",
    "Runtime",
    "check_client_options",
    "kit_of",
    "make_client",
    "set_installer",
]

log = logging.getLogger("celery_rediskit")

APP_ATTRIBUTE = "_rediskit"
"""The attribute of a Celery app that holds its installed integration."""


class Kit(Protocol):
    """The installed integration of one app, as the task class and the commands use it."""

    app: Any
    settings: Settings
    ready_client: Any
    """The client given as ``RedisKit(app, client=...)``, else None."""

    def runtime(self) -> Runtime:
        """This process's Redis objects (rebuilt after ``fork``)."""
        ...


_installer: Callable[[Any], Kit] | None = None


def set_installer(install: Callable[[Any], Kit]) -> None:
    """Register how to install the integration on an app that has none (``RedisKit``)."""
    global _installer
    _installer = install


def kit_of(app: Any) -> Kit:
    """The integration installed on ``app``, installing it from ``app.conf`` if there is none
    (a ``SingletonTask`` used on an app without ``RedisKit(app)``)."""
    kit: Kit | None = getattr(app, APP_ATTRIBUTE, None)
    if kit is None:
        if _installer is None:
            raise RuntimeError("celery_rediskit.integration is not imported")
        kit = _installer(app)
    return kit


def make_client(settings: Settings, *, timeout: float | None = None,
                retry: Any = None) -> Any:
    """The Redis client ``settings`` describe (nothing is connected yet, except for a
    cluster, whose client reads the cluster's layout when made):

    - ``redis://``, ``rediss://``, ``unix://``: ``redis.Redis.from_url``;
    - with ``cluster``: ``redis.cluster.RedisCluster.from_url``;
    - ``sentinel://``: ``Sentinel(sentinels).master_for(sentinel_master)``, a client that
      asks the sentinels for the master's address at each new connection, so it follows a
      failover. The URL's credentials and database are the master's; ``sentinel_kwargs`` in
      ``redis_options`` configure the connections to the sentinels (default: the same
      timeouts as the master's).

    Keyword arguments, from lowest to highest priority: socket and connect timeouts of
    ``timeout`` (default ``settings.socket_timeout``), the TLS options, ``redis_options``,
    and ``retry`` when given (the CLI's "no retries").
    """
    options = _client_options(settings, timeout, retry)
    url = settings.url
    if url is None:
        raise ConfigurationError("rediskit_url is not set (and no ready client was given)")
    try:
        if settings.is_sentinel:
            return _sentinel_client(settings, options)
        if settings.cluster:
            _check_cluster_options(options)
            return RedisCluster.from_url(url, **options)
        return redis.Redis.from_url(url, **options)
    except TypeError as exc:  # an option the client does not take
        raise ConfigurationError(f"rediskit_redis_options: {exc}") from None


def _client_options(settings: Settings, timeout: float | None, retry: Any) -> dict[str, Any]:
    seconds = settings.socket_timeout if timeout is None else timeout
    options: dict[str, Any] = {"socket_timeout": seconds, "socket_connect_timeout": seconds}
    options.update(settings.tls_options())
    options.update(settings.redis_options)
    if timeout is not None:
        options.update(socket_timeout=seconds, socket_connect_timeout=seconds)
    if retry is not None:
        options["retry"] = retry
    return options


def _sentinel_client(settings: Settings, options: dict[str, Any]) -> Any:
    address = settings.sentinel_address()
    sentinel_kwargs = options.pop("sentinel_kwargs", None)
    if sentinel_kwargs is None:
        sentinel_kwargs = {k: v for k, v in options.items() if k.startswith("socket_")}
    else:
        sentinel_kwargs = {"socket_timeout": options["socket_timeout"],
                           "socket_connect_timeout": options["socket_connect_timeout"],
                           **sentinel_kwargs}
    if address.password is not None:
        options.setdefault("username", address.username)
        options.setdefault("password", address.password)
    options.setdefault("db", address.db)
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(address.sentinels), sentinel_kwargs=sentinel_kwargs, **options
    )
    return sentinel.master_for(settings.sentinel_master)  # type: ignore[no-untyped-call]


def _check_cluster_options(options: dict[str, Any]) -> None:
    # RedisCluster drops the keyword arguments it does not know without a word.
    known = set(REDIS_ALLOWED_KEYS) | set(inspect.signature(RedisCluster.__init__).parameters)
    unknown = sorted(set(options) - known - {"self", "kwargs"})
    if unknown:
        raise ConfigurationError(
            f"rediskit_redis_options: redis-py's RedisCluster does not take (it would ignore) "
            f"{', '.join(unknown)}"
        )


def check_client_options(settings: Settings) -> None:
    """Raise ``ConfigurationError`` naming ``rediskit_redis_options`` if the client
    ``settings`` describe would refuse an option at its first connection (redis-py checks a
    connection's arguments only when it makes one). Connects to nothing."""
    if settings.url is None:
        return
    if settings.cluster:  # making a cluster's client would connect: its options are checked
        _check_cluster_options(_client_options(settings, None, None))
        return
    client = make_client(settings)
    pool = client.connection_pool
    try:
        pool.connection_class(**pool.connection_kwargs)
    except TypeError as exc:
        raise ConfigurationError(f"rediskit_redis_options: {exc}") from None
    finally:
        client.close()


class Runtime:
    """The Redis objects of one process: client, storages, claims and the lease owners.

    ``client``: a ready client to use (``RedisKit(app, client=...)``); else one is made
    from the settings (:func:`make_client`)."""

    def __init__(self, settings: Settings, client: Any = None) -> None:
        s = settings
        self.settings = s
        self.client = (make_client(s) if client is None
                       else check_client("RedisKit(client=...)", client))
        if s.trace_commands:
            trace_commands(self.client)
        # One server: a task's claims record rides inside its first acquire and last release
        # script (fused.py); a cluster keeps it in another slot, so it is a command apart.
        self.one_server = not is_cluster(self.client)
        self.mutex_storage = RedisMutexStorage(self.client, prefix=s.prefix, idle_ttl=s.idle_ttl)
        self.semaphore_storage = RedisSemaphoreStorage(
            self.client, prefix=s.prefix, idle_ttl=s.idle_ttl
        )
        self.rate_storage = RedisRateLimitStorage(self.client, prefix=s.prefix)
        self.mutex: Mutex = create_mutex(
            timeout=None, lease=s.lease, storage=self.mutex_storage, on_lost=self._on_lost
        )
        self._semaphores: dict[int, Semaphore] = {}
        self.claims = ClaimStore(self.client, s.prefix, s.claims_ttl)
        self.storages: dict[str, Releaser] = {
            LeaseKind.MUTEX: self.mutex_storage, LeaseKind.SEMAPHORE: self.semaphore_storage,
        }
        # lease owner id -> (task, task id): who to tell when the renewer finds a lease lost
        self.owners: dict[str, tuple[Any, str]] = {}
        self._cache: RedisCacheProvider | None = None
        #: called with the (kind, key) released by :meth:`release_task` (parked tasks)
        self.after_release: Callable[[list[tuple[str, str]]], None] | None = None

    def semaphore(self, permits: int) -> Semaphore:
        sem = self._semaphores.get(permits)
        if sem is None:
            sem = self._semaphores[permits] = create_semaphore(
                permits=permits, timeout=None, lease=self.settings.lease,
                storage=self.semaphore_storage, on_lost=self._on_lost,
            )
        return sem

    def _on_lost(self, lease: Lease, reason: str) -> None:
        task, task_id = self.owners.get(lease.owner, (None, None))
        log.warning(
            "rediskit: task %s[%s] lost its %s %r: %s",
            getattr(task, "name", "?"), task_id, lease.kind.grant, lease.key, reason,
        )
        if lease_lost.receivers:
            observe.lost(task, task_id, lease, reason)

    # -- cached results --------------------------------------------------------------------
    @property
    def cache(self) -> RedisCacheProvider:
        """The app's ``RedisCacheProvider`` (results stored with the ``json`` serializer)."""
        provider = self._cache
        if provider is None:
            from ..cache import RedisCacheProvider  # loaded by the first task with cache_ttl

            provider = self._cache = RedisCacheProvider(
                self.client, prefix=self.settings.prefix, idle_ttl=self.settings.idle_ttl
            )
        return provider

    def cache_lookup(self, task_name: str, name: str) -> tuple[bool, Any]:
        """(True, value) when entry ``name`` is cached. An outage counts as a miss."""
        from ..cache import MISSING, CacheUnavailable

        try:
            value = self.cache.get(name, MISSING)
        except CacheUnavailable:
            return False, None
        except Exception:
            log.exception("rediskit: reading the cached result of %s failed", task_name)
            return False, None
        return (False, None) if value is MISSING else (True, value)

    def cache_store(self, task_name: str, name: str, value: Any, ttl: float | None,
                    tags: list[str]) -> None:
        """Store ``value`` as entry ``name`` for ``ttl`` seconds; failures are logged."""
        self._caching(task_name, lambda: self.cache.set(name, value, ttl, tags=tags))

    def cache_store_call(self, task_name: str, name: str, value: Any, ttl: float | None,
                         tags: list[str]) -> ScriptCall | None:
        """The store of :meth:`cache_store` as a script call, to send with other commands
        (its reply to :meth:`cache_stored`); None when there is nothing to send (an outage,
        a value that cannot be cached: failures are logged as by :meth:`cache_store`)."""
        call: ScriptCall | None = self._caching(
            task_name, lambda: self.cache.set_call(name, value, ttl, tags=tags))
        return call

    def cache_stored(self, task_name: str, reply: Any) -> None:
        """Take the reply of a :meth:`cache_store_call` (an error in place of a reply)."""
        self._caching(task_name, lambda: self.cache.set_reply(reply))

    def _caching(self, task_name: str, step: Callable[[], Any]) -> Any:
        """``step()`` of caching a task's result; None when it failed: an outage silently
        (the breaker has it), anything else logged."""
        from ..cache import CacheUnavailable

        try:
            return step()
        except CacheUnavailable:
            return None
        except Exception:
            log.exception("rediskit: caching the result of %s failed", task_name)
            return None

    def release_task(self, task_id: str, pid: int | None = None) -> int:
        """Release everything ``task_id`` holds, from any process (owner-checked); with
        ``pid``, only what process ``pid`` recorded (``ClaimStore.release_all``)."""
        released: list[tuple[str, str]] = []
        n = self.claims.release_all(task_id, self.storages, pid, released)
        if released and self.after_release is not None:
            try:
                self.after_release(released)  # re-send what is parked there
            except Exception:
                log.warning("rediskit: re-sending parked tasks after releasing %s failed",
                            task_id, exc_info=True)
        return n
