"""What the integration keeps per app and per process.

:class:`Runtime` is one process's Redis objects for an app (client, storages, claims, the
cache provider), built from the app's :class:`Settings`; a prefork child builds its own after
``fork``. :func:`kit_of` finds the installed integration of an app (``RedisKit``), which the
task class, the control commands and the CLI reach through here rather than by importing
``extension.py`` (which imports them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import redis

from ..cache import MISSING, CacheUnavailable, RedisCacheProvider
from ..lease import Lease, LeaseKind
from ..mutex import Mutex, create_mutex
from ..mutex.redis import RedisMutexStorage
from ..semaphore import Semaphore, create_semaphore
from ..semaphore.redis import RedisSemaphoreStorage
from .claims import ClaimStore, Releaser
from .settings import Settings
from .signals import lease_lost

__all__ = ["APP_ATTRIBUTE", "Kit", "Runtime", "kit_of", "set_installer"]

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


class Runtime:
    """The Redis objects of one process: client, storages, claims and the lease owners."""

    def __init__(self, settings: Settings, client: Any = None) -> None:
        s = settings
        self.settings = s
        self.client = client if client is not None else redis.Redis.from_url(
            s.url, socket_timeout=s.socket_timeout, socket_connect_timeout=s.socket_timeout,
            **s.tls_options(),
        )
        self.mutex_storage = RedisMutexStorage(self.client, prefix=s.prefix, idle_ttl=s.idle_ttl)
        self.semaphore_storage = RedisSemaphoreStorage(
            self.client, prefix=s.prefix, idle_ttl=s.idle_ttl
        )
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
        lease_lost.send(sender=task, task_id=task_id, lease=lease, reason=reason)

    # -- cached results --------------------------------------------------------------------
    @property
    def cache(self) -> RedisCacheProvider:
        """The app's ``RedisCacheProvider`` (results stored with the ``json`` serializer)."""
        provider = self._cache
        if provider is None:
            provider = self._cache = RedisCacheProvider(
                self.client, prefix=self.settings.prefix, idle_ttl=self.settings.idle_ttl
            )
        return provider

    def cache_lookup(self, task_name: str, name: str) -> tuple[bool, Any]:
        """(True, value) when entry ``name`` is cached. An outage counts as a miss."""
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
        try:
            self.cache.set(name, value, ttl, tags=tags)
        except CacheUnavailable:
            pass
        except Exception:
            log.exception("rediskit: caching the result of %s failed", task_name)

    def release_task(self, task_id: str, pid: int | None = None) -> int:
        """Release everything ``task_id`` holds, from any process (owner-checked); with
        ``pid``, only what process ``pid`` recorded (``ClaimStore.release_all``)."""
        return self.claims.release_all(task_id, self.storages, pid)
