"""``RedisKit(app)``: installs the integration on a Celery app.

It reads the settings once (``settings.py``), makes every task of the app accept the
integration's options (by setting ``app.task_cls``), checks those options where the task is
decorated, and connects the signal handlers that release a task's claims from the worker's
main process (revoke, hard time limit, lost child). Those fire while the child may still be
running the body: a terminate or hard time limit is released only once that child has
stopped or moved on (``children.py``). Redis clients and storages are built lazily in each
process (a prefork child gets its own after ``fork``).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable
from importlib import import_module
from importlib.util import find_spec
from typing import Any
from weakref import WeakSet

from billiard.exceptions import Terminated, TimeLimitExceeded, WorkerLostError
from celery import Task, signals
from celery.utils.imports import symbol_by_name

from .._redis.clients import check_client
from ..errors import ConfigurationError
from . import claims, control, parking
from .children import ChildWatch, ChildWatchStep
from .options import OPTION_NAMES, parse_policy
from .runtime import APP_ATTRIBUTE, Runtime, check_client_options, set_installer
from .settings import Settings, read_settings
from .task import RedisKitTask

__all__ = ["RedisKit", "check_options"]

log = logging.getLogger("celery_rediskit")

# Failures the main process reports once the child running the task is gone.
_GONE = (Terminated, WorkerLostError)

# Every extension, for the fork handler below.
_KITS: WeakSet[RedisKit] = WeakSet()


def _new_locks_in_child() -> None:
    # A thread of the parent (the worker's park sweeper, building the runtime at startup)
    # may hold a kit's lock as the pool forks: the child would wait on it forever at its
    # first runtime(). The child has only the forking thread: a new lock is safe.
    for kit in list(_KITS):
        kit._lock = threading.Lock()


os.register_at_fork(after_in_child=_new_locks_in_child)


class RedisKit:
    """The integration, installed on ``app``: ``RedisKit(app)`` or ``RedisKit(app, url=...)``.

    Keyword settings override ``app.conf.rediskit_*`` (see :class:`Settings`). ``client``: a
    ready redis-py client to use instead of one made from the settings (``redis.Redis``,
    ``RedisCluster``, or ``Sentinel.master_for(...)``); it is shared by every process the
    worker forks (redis-py's pools reconnect after ``fork``). Define tasks after installing:
    tasks created before keep their old base class.
    """

    def __init__(self, app: Any, url: str | None = None, prefix: str | None = None, *,
                 client: Any = None, **settings: Any) -> None:
        if getattr(app, APP_ATTRIBUTE, None) is not None:
            raise ConfigurationError(f"RedisKit is already installed on app {app.main!r}")
        if client is not None and url is not None:
            raise ConfigurationError("RedisKit: pass either url= or client=, not both")
        self.app = app
        self.ready_client: Any = (None if client is None
                                  else check_client("RedisKit(client=...)", client))
        self.settings: Settings = read_settings(
            app, need_url=client is None, url=url, prefix=prefix, **settings
        )
        if client is None:
            check_client_options(self.settings)
        self._runtime: Runtime | None = None
        self._pid = 0
        self._lock = threading.Lock()  # made anew in a forked child (_new_locks_in_child)
        _KITS.add(self)
        self.child_watch = ChildWatch(self._release_after_child)
        self.sweeper = parking.Sweeper(self)  # re-sends parked tasks (worker main process)
        self._metrics: Any = None  # the worker's metrics endpoint (worker_metrics.py)
        self._metrics_error = ""
        if self.settings.metrics_port is not None and find_spec("prometheus_client") is None:
            raise ConfigurationError(
                "rediskit_metrics_port needs prometheus_client: pip install "
                "'celery-rediskit[metrics]'")
        setattr(app, APP_ATTRIBUTE, self)
        self._install_task_class()
        self._wrap_task_decorator()
        self._connect_signals()
        control.register()  # `celery inspect rediskit_leases`
        parking.install_revoke_hook()  # revoke() takes a task out of the parked queues

    @classmethod
    def of(cls, app: Any) -> RedisKit:
        """The extension installed on ``app``, installing it with ``app.conf`` settings if none."""
        kit = getattr(app, APP_ATTRIBUTE, None)
        if kit is None:
            kit = cls(app)
        if not isinstance(kit, RedisKit):
            raise ConfigurationError(f"app {app.main!r} holds {kit!r} where RedisKit belongs")
        return kit

    def runtime(self) -> Runtime:
        """This process's Redis objects (rebuilt after ``fork``)."""
        pid = os.getpid()
        rt = self._runtime
        if rt is None or self._pid != pid:
            with self._lock:
                if self._runtime is None or self._pid != pid:
                    self._runtime = Runtime(self.settings, self.ready_client)
                    runtime = self._runtime
                    self._runtime.after_release = (
                        lambda released: parking.dispatch(self.app, runtime, released))
                    self._pid = pid
                rt = self._runtime
        return rt

    @property
    def client(self) -> Any:
        return self.runtime().client

    # -- installation -------------------------------------------------------------------
    def _install_task_class(self) -> None:
        app = self.app
        current = symbol_by_name(app.task_cls)
        if not (isinstance(current, type) and issubclass(current, RedisKitTask)):
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

        def on_revoked(sender: Any = None, request: Any = None, terminated: bool = False,
                       **_: Any) -> None:
            task_id = getattr(request, "id", None)
            if not (task_id and mine(sender)):
                return
            if terminated:  # signalled, still running: released once its child stops
                self._release_when_stopped(task_id, "revoked")
                return
            n = self.runtime().release_task(task_id)  # revoked before it started
            if n:
                log.info("rediskit: released %d claim(s) of revoked task %s", n, task_id)

        def on_failure(sender: Any = None, task_id: str | None = None,
                       exception: BaseException | None = None, **_: Any) -> None:
            # Only failures the main process sees for a child that did not finish its own
            # cleanup. A hard time limit is reported before billiard stops the child.
            if not (task_id and mine(sender)):
                return
            if isinstance(exception, TimeLimitExceeded):
                self._release_when_stopped(task_id, "hard time limit")
            elif isinstance(exception, _GONE):
                n = self.runtime().release_task(task_id)
                if n:
                    log.info("rediskit: released %d claim(s) of task %s (%s)",
                             n, task_id, type(exception).__name__)

        def on_worker_init(sender: Any = None, **_: Any) -> None:
            if getattr(sender, "app", None) is app:  # the node name for lock reports
                claims.node_name = getattr(sender, "hostname", None)
                if self.settings.metrics_port is not None:  # before the pool forks
                    self._start_metrics()

        signals.task_revoked.connect(on_revoked, weak=False)
        signals.task_failure.connect(on_failure, weak=False)
        signals.worker_init.connect(on_worker_init, weak=False)
        signals.worker_shutdown.connect(self._stop_metrics, weak=False)
        signals.worker_ready.connect(self._announce_metrics, weak=False)
        self._handlers = (on_revoked, on_failure, on_worker_init)
        app.steps["worker"].add(ChildWatchStep)  # the worker's timer, for the child watch
        app.steps["worker"].add(parking.SweeperStep)  # re-sends parked tasks

    def _start_metrics(self) -> None:
        if self._metrics is None:
            # the [metrics] extra (prometheus_client) is loaded only when asked for
            served = import_module(f"{__package__}.worker_metrics")
            try:
                self._metrics = served.WorkerMetrics(self.settings)
            except OSError as exc:  # the port is taken: the worker runs on without metrics
                self._metrics_error = (
                    f"rediskit: cannot serve metrics on {self.settings.metrics_address}:"
                    f"{self.settings.metrics_port}: {exc}")
                log.error("%s", self._metrics_error)

    def _announce_metrics(self, sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not self.app:
            return
        if self._metrics is not None:
            self._metrics.announce()
        elif self._metrics_error:  # again, now that Celery's logging is set up
            log.error("%s", self._metrics_error)

    def _stop_metrics(self, sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is self.app:
            served, self._metrics = self._metrics, None
            if served is not None:
                served.stop()

    def _release_when_stopped(self, task_id: str, why: str) -> None:
        """The main process signalled the child running ``task_id`` (terminate, hard time
        limit): release its claims once that child has exited or started another task.

        The child is known from the pool's acknowledgement (``TrackedRequest``), else from
        the pid in the task's claims record; with neither (no record: nothing to release,
        or a queued claim not yet taken up), the claims are released now.
        """
        pid = self.child_watch.pid_of(task_id)
        if pid is None:
            try:
                pid = self.runtime().claims.holder_pid(task_id)
            except Exception:
                log.exception("rediskit: reading the claims of task %s failed", task_id)
        if pid is None:
            n = self.runtime().release_task(task_id)
            if n:
                log.info("rediskit: released %d claim(s) of task %s (%s)", n, task_id, why)
            return
        log.debug("rediskit: task %s (%s): released once its process %d stops",
                  task_id, why, pid)
        self.child_watch.defer(task_id, pid)

    def _release_after_child(self, task_id: str, pid: int) -> None:
        n = self.runtime().release_task(task_id, pid)
        if n:
            log.info("rediskit: released %d claim(s) of task %s: its process %d stopped "
                     "without releasing them", n, task_id, pid)


def check_options(app: Any, fun: Callable[..., Any], opts: dict[str, Any]) -> None:
    """Check the integration's options of ``@app.task(**opts)`` where the task is decorated."""
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


set_installer(RedisKit)
