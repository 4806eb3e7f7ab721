"""``RedisKit(app)``: installs the integration on a Celery app.

It reads the settings once (``settings.py``), makes every task of the app accept the
integration's options (by setting ``app.task_cls``), checks those options where the task is
decorated, and connects the signal handlers that release a task's claims from the worker's
main process (revoke, hard time limit, lost child). Redis clients and storages are built lazily
in each process (a prefork child gets its own after ``fork``).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import redis
from celery import signals
from celery.utils.imports import symbol_by_name

from ..errors import ConfigurationError
from ..lease import Lease
from ..mutex import Mutex, create_mutex
from ..mutex_redis import RedisMutexStorage
from ..semaphore import Semaphore, create_semaphore
from ..semaphore_redis import RedisSemaphoreStorage
from .claims import ClaimStore, Releaser
from .options import TaskPolicy, digest, parse_policy, safe_name
from .settings import Settings, read_settings
from .signals import lease_lost

__all__ = ["RedisKit", "Runtime"]

log = logging.getLogger("celery_rediskit")

_ATTR = "_rediskit"


class Runtime:
    """The Redis objects of one process: client, storages, claims and the lease owners."""

    def __init__(self, kit: RedisKit) -> None:
        s = kit.settings
        self.settings = s
        self.client = redis.Redis.from_url(
            s.url, socket_timeout=s.socket_timeout, socket_connect_timeout=s.socket_timeout,
        )
        self.mutex_storage = RedisMutexStorage(self.client, prefix=s.prefix)
        self.semaphore_storage = RedisSemaphoreStorage(self.client, prefix=s.prefix)
        self.mutex: Mutex = create_mutex(
            timeout=None, lease=s.lease, storage=self.mutex_storage, on_lost=self._on_lost
        )
        self._semaphores: dict[int, Semaphore] = {}
        self.claims = ClaimStore(self.client, s.prefix, s.claims_ttl)
        self.storages: dict[str, Releaser] = {
            "m": self.mutex_storage, "s": self.semaphore_storage,
        }
        # lease owner id -> (task, task id): who to tell when the renewer finds a lease lost
        self.owners: dict[str, tuple[Any, str]] = {}
        self._cache: Any = None

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
            getattr(task, "name", "?"), task_id, lease.kind, lease.key, reason,
        )
        lease_lost.send(sender=task, task_id=task_id, lease=lease, reason=reason)

    # -- cached results --------------------------------------------------------------------
    @property
    def cache(self) -> Any:
        """The app's ``RedisCacheProvider`` (results stored with the ``json`` serializer)."""
        provider = self._cache
        if provider is None:
            from ..cache import RedisCacheProvider

            provider = self._cache = RedisCacheProvider(self.client, prefix=self.settings.prefix)
        return provider

    @staticmethod
    def cache_name(task: Any, policy: TaskPolicy, arguments: Any, args: Any,
                   kwargs: Any) -> str:
        return f"task:{safe_name(task.name)}:{digest(policy.cache_data(arguments, args, kwargs))}"

    def cache_lookup(self, task: Any, policy: TaskPolicy, arguments: Any, args: Any,
                     kwargs: Any) -> tuple[bool, Any]:
        """(True, value) when the call's result is cached. An outage counts as a miss."""
        from ..cache import MISSING, CacheUnavailable

        try:
            value = self.cache.get(self.cache_name(task, policy, arguments, args, kwargs),
                                   MISSING)
        except CacheUnavailable:
            return False, None
        except Exception:
            log.exception("rediskit: reading the cached result of %s failed", task.name)
            return False, None
        return (False, None) if value is MISSING else (True, value)

    def cache_store(self, task: Any, policy: TaskPolicy, arguments: Any, args: Any,
                    kwargs: Any, value: Any) -> None:
        from ..cache import CacheUnavailable

        try:
            self.cache.set(self.cache_name(task, policy, arguments, args, kwargs), value,
                           policy.cache_ttl, tags=policy.tags(arguments))
        except CacheUnavailable:
            pass
        except Exception:
            log.exception("rediskit: caching the result of %s failed", task.name)

    def cache_invalidate(self, task: Any, policy: TaskPolicy, arguments: Any, args: Any,
                         kwargs: Any) -> bool:
        return bool(self.cache.delete(self.cache_name(task, policy, arguments, args, kwargs)))

    def release_task(self, task_id: str) -> int:
        """Release everything ``task_id`` holds, from any process (owner-checked)."""
        return self.claims.release_all(task_id, self.storages)


class RedisKit:
    """The integration, installed on ``app``: ``RedisKit(app)`` or ``RedisKit(app, url=...)``.

    Keyword settings override ``app.conf.rediskit_*`` (see :class:`Settings`). Define tasks
    after installing: tasks created before keep their old base class.
    """

    def __init__(self, app: Any, url: str | None = None, prefix: str | None = None,
                 **settings: Any) -> None:
        if getattr(app, _ATTR, None) is not None:
            raise ConfigurationError(f"RedisKit is already installed on app {app.main!r}")
        self.app = app
        self.settings: Settings = read_settings(app, url=url, prefix=prefix, **settings)
        self._runtime: Runtime | None = None
        self._pid = 0
        self._lock = threading.Lock()
        setattr(app, _ATTR, self)
        self._install_task_class()
        self._wrap_task_decorator()
        self._connect_signals()
        from . import control  # noqa: F401  registers `celery inspect rediskit_leases`

    @classmethod
    def of(cls, app: Any) -> RedisKit:
        """The extension installed on ``app``, installing it with ``app.conf`` settings if none."""
        kit = getattr(app, _ATTR, None)
        if kit is None:
            kit = cls(app)
        assert isinstance(kit, RedisKit)
        return kit

    def runtime(self) -> Runtime:
        """This process's Redis objects (rebuilt after ``fork``)."""
        pid = os.getpid()
        rt = self._runtime
        if rt is None or self._pid != pid:
            with self._lock:
                if self._runtime is None or self._pid != pid:
                    self._runtime = Runtime(self)
                    self._pid = pid
                rt = self._runtime
        return rt

    @property
    def client(self) -> Any:
        return self.runtime().client

    # -- installation -------------------------------------------------------------------
    def _install_task_class(self) -> None:
        from .task import RedisKitTask

        app = self.app
        current = symbol_by_name(app.task_cls)
        if not (isinstance(current, type) and issubclass(current, RedisKitTask)):
            from celery import Task

            if current is Task or getattr(current, "__module__", "") == "celery.app.task":
                app.task_cls = RedisKitTask
            else:
                app.task_cls = type(
                    f"RedisKit{current.__name__}", (current, RedisKitTask),
                    {"__module__": current.__module__},
                )
        app.__dict__.pop("Task", None)  # app.Task is cached from task_cls

    def _wrap_task_decorator(self) -> None:
        app = self.app
        original: Callable[..., Any] = app.task

        @functools.wraps(original)
        def task(*args: Any, **opts: Any) -> Any:
            if len(args) == 1 and callable(args[0]):
                check_options(app, args[0], opts)
                return original(*args, **opts)

            def decorate(fun: Callable[..., Any]) -> Any:
                check_options(app, fun, opts)
                return original(*args, **opts)(fun)

            return decorate

        app.task = task

    def _connect_signals(self) -> None:
        app = self.app

        def mine(sender: Any) -> bool:
            try:
                return sender is not None and sender.app is app
            except Exception:
                return False

        def on_revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
            task_id = getattr(request, "id", None)
            if task_id and mine(sender):
                n = self.runtime().release_task(task_id)
                if n:
                    log.info("rediskit: released %d claim(s) of revoked task %s", n, task_id)

        def on_failure(sender: Any = None, task_id: str | None = None,
                       exception: BaseException | None = None, **_: Any) -> None:
            # Only failures the main process sees for a child that did not finish its own
            # cleanup: a hard time limit, a killed or lost child.
            if task_id and isinstance(exception, _KILLED) and mine(sender):
                n = self.runtime().release_task(task_id)
                if n:
                    log.info("rediskit: released %d claim(s) of task %s (%s)",
                             n, task_id, type(exception).__name__)

        def on_worker_init(sender: Any = None, **_: Any) -> None:
            if getattr(sender, "app", None) is app:  # the node name for lock reports
                from . import claims

                claims.node_name = getattr(sender, "hostname", None)

        signals.task_revoked.connect(on_revoked, weak=False)
        signals.task_failure.connect(on_failure, weak=False)
        signals.worker_init.connect(on_worker_init, weak=False)
        self._handlers = (on_revoked, on_failure, on_worker_init)


def _killed_types() -> tuple[type[BaseException], ...]:
    from billiard.exceptions import Terminated, TimeLimitExceeded, WorkerLostError

    return (Terminated, TimeLimitExceeded, WorkerLostError)


_KILLED = _killed_types()


def check_options(app: Any, fun: Callable[..., Any], opts: dict[str, Any]) -> None:
    """Check the integration's options of ``@app.task(**opts)`` where the task is decorated."""
    from .options import OPTION_NAMES
    from .task import RedisKitTask

    base = opts.get("base")
    if base is None:
        base = symbol_by_name(app.task_cls)
    elif isinstance(base, str):
        base = symbol_by_name(base)
    given = sorted(name for name in OPTION_NAMES if opts.get(name) is not None)
    if given and isinstance(base, type) and not issubclass(base, RedisKitTask):
        name = getattr(fun, "__qualname__", repr(fun))
        raise ConfigurationError(
            f"task {name}: option {given[0]!r} needs a task class derived from "
            f"celery_rediskit.integration.RedisKitTask, but base={base.__qualname__} is not; "
            f"derive {base.__qualname__} from RedisKitTask (or SingletonTask) or drop base="
        )
    options = {name: opts[name] if name in opts else getattr(base, name, None)
               for name in OPTION_NAMES}
    options = {k: v for k, v in options.items() if v is not None}
    try:
        parse_policy(options, fun, bool(opts.get("bind")))
    except ConfigurationError as exc:
        name = getattr(fun, "__qualname__", repr(fun))
        raise ConfigurationError(f"task {name}: {exc}") from None
