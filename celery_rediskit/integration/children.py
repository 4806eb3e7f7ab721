"""The worker's main process releases a task's leases only once its child has stopped.

A prefork worker's main process hears of ``revoke(terminate=True)`` and of a hard time limit
when it sends the signal: ``task_revoked`` / ``task_failure(TimeLimitExceeded)`` fire in the
main process while the child is still running the body (billiard sends the hard limit's
SIGTERM, and 0.1 s later SIGKILL, *after* reporting the failure). A body may handle the
signal (SIGTERM trapped, SIGUSR1 turned into ``SoftTimeLimitExceeded``) and go on cleaning
up, or ignore it altogether. Releasing at the signal would let a duplicate run beside it.

So the main process defers the release (:class:`ChildWatch`):

- It knows which child runs which task from the pool's acknowledgement
  (``Request.on_accepted(pid)``, :mod:`.request`); failing that (a task with its own
  ``Request`` class), from the pid in the task's claims record.
- The release happens when that child has **exited** (checked from the main process on the
  worker's timer, at 0.05 s, then doubling to 1 s while anything is pending: a killed child
  is released within a second, not after the pool's own exit detection, which can take 5 s)
  or has **moved on**: the pool reports it started another task, so the body has ended.
- A child that survives the signal releases its leases itself when its body ends (the
  task's ``finally``); the main process's later release is then a no-op (owner-checked).
- A child killed outright (SIGKILL) runs nothing: the main process releases once it sees it
  gone; if the main process is gone too, the leases expire within one lease.

The release is keyed by the task id and owner-checked, and only acts on a claims record
written by that very child (a record of another run of the same task id is left alone).
Everything here runs in the main process, on the worker's event loop (timer callbacks, pool
acknowledgements, control commands); a lock guards the state for pools that use threads.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import bootsteps

from .runtime import APP_ATTRIBUTE

__all__ = ["ChildWatch", "ChildWatchStep", "child_watch_of"]

log = logging.getLogger("celery_rediskit")

FIRST_CHECK = 0.05
"""Seconds from a deferred release to the first look at its child."""
LAST_CHECK = 1.0
"""The longest interval between two looks (the interval doubles up to it)."""
_REMEMBERED = 4096
"""How many child pids the main process remembers the current task of."""


def _identity(pid: int) -> str | None:
    """Something that tells this process apart from a later one with the same pid (its
    start time on Linux), or None when ``pid`` has exited (a zombie counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
    except FileNotFoundError:
        return None
    except OSError:
        fields = []
    if len(fields) > 19:
        return None if fields[0] in (b"Z", b"X") else fields[19].decode()
    try:  # no /proc: alive until its parent (the pool) has reaped it
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return ""


class _Pending:
    __slots__ = ("identity", "task_ids")

    def __init__(self, identity: str) -> None:
        self.identity = identity
        self.task_ids: set[str] = set()


class ChildWatch:
    """Deferred releases of tasks whose child process may still be running them.

    ``release(task_id, pid)`` releases what the claims record of ``task_id``, written by
    process ``pid``, names. The worker feeds :meth:`accepted` (pool acknowledgements) and
    :meth:`attach` (its timer); the signal handlers call :meth:`defer`.
    """

    def __init__(self, release: Callable[[str, int], Any]) -> None:
        self._release = release
        self._lock = threading.Lock()
        self._running: dict[int, str] = {}  # child pid -> the task it started last
        self._pending: dict[int, _Pending] = {}  # child pid -> releases waiting for it
        self._timer: Any = None
        self._due: float | None = None  # monotonic time of the next look, if one is set
        self._token = 0  # names the look that is due; superseded looks run but keep _due
        self._interval = FIRST_CHECK

    # -- fed by the worker ------------------------------------------------------------------
    def attach(self, timer: Any) -> None:
        """Use ``timer`` (the worker's: ``call_after(seconds, fun)``) to look at children."""
        with self._lock:
            self._timer = timer
            self._due = None
            pending = bool(self._pending)
        if pending:
            self._schedule(reset=True)

    def detach(self) -> None:
        """The worker stops: release for children already gone, stop looking."""
        self.check()
        with self._lock:
            self._timer = None

    def accepted(self, pid: int, task_id: str) -> None:
        """The pool's child ``pid`` has started ``task_id``: any task it ran before has
        ended, so releases waiting for that child happen now."""
        with self._lock:
            self._running.pop(pid, None)
            self._running[pid] = task_id
            if len(self._running) > _REMEMBERED:
                del self._running[next(iter(self._running))]
            entry = self._pending.pop(pid, None)
        if entry is not None:
            # the same task id again (a redelivery or retry on this child) is a new run
            # whose leases are not to be touched
            self._release_all(pid, entry.task_ids - {task_id})

    def pid_of(self, task_id: str) -> int | None:
        """The child that started ``task_id`` last, as far as the pool told us."""
        with self._lock:
            for pid, running in reversed(self._running.items()):
                if running == task_id:
                    return pid
        return None

    # -- deferring ------------------------------------------------------------------------
    def defer(self, task_id: str, pid: int) -> None:
        """Release ``task_id`` once child ``pid`` has exited or started another task."""
        if pid == os.getpid():
            return  # the body runs in this process (solo/threads): it releases itself
        identity = _identity(pid)
        if identity is None:
            self._release_all(pid, {task_id})
            return
        with self._lock:
            entry = stale = self._pending.get(pid)
            if entry is None or entry.identity != identity:
                entry = self._pending[pid] = _Pending(identity)
            else:
                stale = None
            entry.task_ids.add(task_id)
            timer = self._timer
        if stale is not None:  # that pid's earlier process is gone
            self._release_all(pid, stale.task_ids)
        if timer is None:
            log.debug("rediskit: no worker timer: task %s is released by its child %d, or "
                      "when its leases expire", task_id, pid)
            return
        self._schedule(reset=True)

    def pending(self) -> dict[int, set[str]]:
        """Child pid -> task ids whose release waits for that child."""
        with self._lock:
            return {pid: set(entry.task_ids) for pid, entry in self._pending.items()}

    def check(self) -> None:
        """Release for every pending child that has exited."""
        with self._lock:
            entries = list(self._pending.items())
        for pid, entry in entries:
            if _identity(pid) == entry.identity:
                continue
            with self._lock:
                if self._pending.get(pid) is not entry:
                    continue
                del self._pending[pid]
            self._release_all(pid, entry.task_ids)

    # -- internals --------------------------------------------------------------------------
    def _schedule(self, reset: bool = False) -> None:
        """Look again after the current interval (doubling it), unless a look is already
        due by then; ``reset`` starts over from :data:`FIRST_CHECK` (a new deferral)."""
        with self._lock:
            if reset:
                self._interval = FIRST_CHECK
            if self._timer is None or not self._pending:
                return
            timer, delay = self._timer, self._interval
            when = time.monotonic() + delay
            if self._due is not None and self._due <= when:
                return
            self._due = when
            self._interval = min(LAST_CHECK, self._interval * 2)
            self._token += 1
            token = self._token
        try:
            timer.call_after(delay, self._tick, (token,))
        except Exception:
            with self._lock:
                self._due = None
            log.exception("rediskit: scheduling the check of terminated children failed")

    def _tick(self, token: int) -> None:
        with self._lock:
            if token == self._token:  # the look that was due (not one superseded by it)
                self._due = None
        try:
            self.check()
        except Exception:
            log.exception("rediskit: checking terminated children failed")
        self._schedule()

    def _release_all(self, pid: int, task_ids: set[str]) -> None:
        for task_id in task_ids:
            try:
                self._release(task_id, pid)
            except Exception:
                log.exception("rediskit: releasing task %s after its child %d stopped "
                              "failed (its leases expire)", task_id, pid)


def child_watch_of(app: Any) -> ChildWatch | None:
    """The :class:`ChildWatch` of the integration installed on ``app``, if any."""
    watch = getattr(getattr(app, APP_ATTRIBUTE, None), "child_watch", None)
    return watch if isinstance(watch, ChildWatch) else None


class ChildWatchStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker bootstep: hands the worker's timer to the app's :class:`ChildWatch`."""

    label = "rediskit child watch"
    requires = ("celery.worker.components:Pool",)

    def start(self, parent: Any) -> None:
        watch = child_watch_of(parent.app)
        timer = getattr(parent, "timer", None)
        if watch is not None and timer is not None:
            watch.attach(timer)

    def stop(self, parent: Any) -> None:
        watch = child_watch_of(parent.app)
        if watch is not None:
            watch.detach()
