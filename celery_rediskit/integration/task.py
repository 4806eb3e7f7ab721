"""The task base class: singleton locks, concurrency limits and cached results around ``run``.

Everything happens inside the task's own call path (``__call__``, in the process that runs
the body), so leases are released on success, failure, retry, ``Ignore`` and soft time limits
before the result is stored. What only the worker's main process sees (revoke, hard time limit,
a killed child) is released by task id from the claims recorded in Redis (``claims.py``).
"""

from __future__ import annotations

import inspect
import logging
import random
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC
from functools import cache
from typing import Any, ClassVar

from celery import Task
from celery.exceptions import Ignore, Retry
from celery.utils import uuid

from .._validate import resource_key
from ..errors import LockError, LockTimeout
from ..lease import Lease
from ..mutex import MutexLease
from ..renewal import renewer
from ..scripts import call
from ..semaphore import Permit
from ..wakeup import new_owner_id
from .claims import holder_line
from .options import OPTION_NAMES, TaskPolicy, parse_policy

__all__ = ["RedisKitTask", "SingletonTask", "TaskDuplicated", "TaskLocked"]

log = logging.getLogger("celery_rediskit")

SKIPPED = "SKIPPED"
"""State of a task that finished without running because its singleton lock was held."""

_CALLBACK_OPTIONS = ("link", "link_error", "chain", "chord", "group_id")


def _hit_result(task_id: str, value: Any, name: str) -> Any:
    """A cache hit as an already-finished result (carrying the task name on Celery 5.4+)."""
    from celery import states
    from celery.result import EagerResult

    named = {"name": name} if _eager_result_takes_name() else {}
    return EagerResult(task_id, value, states.SUCCESS, **named)


@cache
def _eager_result_takes_name() -> bool:
    from celery.result import EagerResult

    return "name" in inspect.signature(EagerResult.__init__).parameters


class TaskLocked(LockError):
    """A singleton task met its lock held (``on_locked="raise"``)."""


class TaskDuplicated(LockError):
    """A ``singleton_scope="queued"`` task with callbacks (chain, group, chord, link) is a
    duplicate of a task already queued or running. ``task_id`` is that task's id.

    Raised instead of returning the existing task's result, because the callbacks of the
    duplicate would otherwise be silently dropped.
    """

    def __init__(self, message: str, key: str, task_id: str) -> None:
        super().__init__(message, key)
        self.task_id = task_id


def _policy_of_class(cls: type) -> TaskPolicy:
    options = {name: getattr(cls, name, None) for name in OPTION_NAMES}
    options = {k: v for k, v in options.items() if v is not None}
    run = cls.__dict__.get("run")
    if isinstance(run, staticmethod):
        fun, bound = run.__func__, False
    elif callable(run):
        fun, bound = run, True
    else:
        fun, bound = None, False
    policy = parse_policy(options, fun, bound)
    if fun is None:
        inherited: TaskPolicy | None = getattr(cls, "_rk_policy", None)
        if inherited is not None and inherited.signature is not None:
            policy = replace(parse_policy(options, None, False), signature=inherited.signature)
    return policy


def _queued_name(name: str) -> str:
    return "queued:" + name


def _delay_of(options: Mapping[str, Any]) -> float:
    countdown = options.get("countdown")
    if countdown:
        return max(0.0, float(countdown))
    eta = options.get("eta")
    if eta is not None:
        from datetime import datetime

        when = datetime.fromisoformat(eta) if isinstance(eta, str) else eta
        now = datetime.now(when.tzinfo or UTC) if when.tzinfo else datetime.now()
        return max(0.0, (when - now).total_seconds())
    return 0.0


def _try_acquire(rt: Any, record: tuple[Any, ...] | None, kind: str, name: str, owner: str,
                 permits: int, seconds: float) -> int:
    """One attempt (without queueing) to take lock (``kind`` "m") or permit ("s") ``name``
    for ``owner``: the token (>= 1) when granted, else <= -1. ``record`` (a command) is sent
    first in the same round trip."""
    if kind == "m":
        return int(rt.mutex_storage.try_acquire(name, owner, seconds, before=record))
    return int(rt.semaphore_storage.try_acquire(name, owner, permits, seconds, before=record))


class RedisKitTask(Task):  # type: ignore[misc]
    """Base of every task of an app with ``RedisKit(app)`` installed.

    Options (class attributes, or ``@app.task(...)`` keywords): ``singleton``,
    ``singleton_key``, ``singleton_scope``, ``on_locked``, ``concurrency_limit``,
    ``on_limited``, ``limit_timeout``, ``cache_ttl``, ``cache_key``, ``cache_tags``.
    A task with none of them runs exactly like a plain Celery task.
    """

    singleton: ClassVar[bool] = False
    singleton_key: ClassVar[Any] = None
    singleton_scope: ClassVar[str] = "running"
    on_locked: ClassVar[str] = "retry"
    concurrency_limit: ClassVar[Any] = None
    on_limited: ClassVar[str] = "retry"
    limit_timeout: ClassVar[Any] = None
    cache_ttl: ClassVar[Any] = None
    cache_key: ClassVar[Any] = None
    cache_tags: ClassVar[Any] = None

    _rk_policy: ClassVar[TaskPolicy] = TaskPolicy()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._rk_policy = _policy_of_class(cls)

    @classmethod
    def bind(cls, app: Any) -> Any:
        from .extension import RedisKit

        if cls._rk_policy.active:
            RedisKit.of(app)  # SingletonTask used on an app without RedisKit(app): install
        return super().bind(app)

    # -- what the body can see ------------------------------------------------------------
    @property
    def leases(self) -> list[Lease]:
        """The leases the running task holds: its singleton lock first, then its permits."""
        return list(getattr(self.request, "rediskit_leases", None) or ())

    @property
    def lease(self) -> Lease | None:
        """The running task's singleton lock (with ``fencing_token``), else its first permit."""
        held = getattr(self.request, "rediskit_leases", None)
        return held[0] if held else None

    # -- running --------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        policy = self._rk_policy
        request = self.request
        if request.called_directly:
            return super().__call__(*args, **kwargs)
        if not policy.active:
            return self.run(*args, **kwargs)
        return self._rk_execute(policy, request, args, kwargs)

    def _rk_kit(self) -> Any:
        from .extension import RedisKit

        return RedisKit.of(self.app)

    def _rk_execute(self, policy: TaskPolicy, request: Any, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        kit = self._rk_kit()
        rt = kit.runtime()
        task_id: str = request.id
        arguments = policy.bind(args, kwargs)
        if policy.cache_ttl is not None:
            found, value = rt.cache_lookup(self, policy, arguments, args, kwargs)
            if found:
                return value
        held: list[Lease] = []
        claim: MutexLease | None = None
        request.rediskit_leases = held
        request.rediskit_claim = None
        request.rediskit_keep = False
        try:
            plan: list[tuple[str, str, int]] = []  # (kind, resource name, permits), in order
            if policy.singleton:
                name = policy.singleton_name(self.name, arguments, args, kwargs)
                if policy.scope == "queued":
                    claim = self._rk_take_claim(rt, name, task_id)
                    request.rediskit_claim = claim
                plan.append(("m", name, 0))
            if policy.limits:
                plan.extend(("s", sem_name, permits)
                            for sem_name, permits in policy.limit_names(arguments))
            if plan:
                self._rk_acquire(rt, policy, request, plan, claim, held)
            result = self.run(*args, **kwargs)
            if policy.cache_ttl is not None:
                rt.cache_store(self, policy, arguments, args, kwargs, result)
            return result
        finally:
            self._rk_finish(rt, request, keep_claim=getattr(request, "rediskit_keep", False))

    def _rk_acquire(self, rt: Any, policy: TaskPolicy, request: Any,
                    plan: list[tuple[str, str, int]], claim: MutexLease | None,
                    held: list[Lease]) -> None:
        """Take every lock and permit of ``plan`` (in its order) and record them by task id.

        The owner ids are chosen up front, so the claims record is sent together with the
        first attempt, in one round trip. (A record naming a lock this run did not get is
        harmless: every release by task id is owner-checked.) A queued-scope run writes its
        record after its acquisitions instead: when it meets its own lock held, another run
        of the same task id is running, whose record must not be overwritten.
        """
        settings = rt.settings
        seconds = settings.lease
        task_id: str = request.id
        owners = [new_owner_id() for _ in plan]
        records = [(kind, name, owner) for (kind, name, _), owner in zip(plan, owners,
                                                                         strict=True)]
        if claim is not None:
            records.append(("m", claim.key, claim.owner))
        record = rt.claims.record_command(task_id, records, 2 * seconds,
                                          holder_line(self.name, request.hostname))
        pending: tuple[Any, ...] | None = record if claim is None else None
        for (kind, name, permits), owner in zip(plan, owners, strict=True):
            name = resource_key(name)
            lease: Lease
            if kind == "m":
                token = _try_acquire(rt, pending, kind, name, owner, 0, seconds)
                pending = None
                if token < 1:
                    self._rk_locked(rt, policy, request, name, claim)  # raises
                lease = MutexLease(rt.mutex_storage, name, owner, seconds,
                                   fencing_token=token, on_lost=rt.mutex.on_lost)
                lease.start_renewal()
            else:
                wait = policy.on_limited == "wait"
                if _try_acquire(rt, pending, kind, name, owner, permits, seconds) >= 1:
                    lease = Permit(rt.semaphore_storage, name, owner, seconds,
                                   fencing_token=1, on_lost=rt.mutex.on_lost)
                    lease.start_renewal()
                elif not wait:
                    self._rk_release_leases(rt, request)
                    self._rk_requeue(request, f"concurrency limit {name!r} is full")
                else:
                    timeout = policy.limit_timeout or settings.limit_timeout
                    lease = rt.semaphore(permits).acquire(
                        name, timeout=timeout, lease=seconds, owner=owner,
                    )
                pending = None
            held.append(lease)
            rt.owners[owner] = (self, task_id)
        if claim is not None:
            call(rt.client, *record)

    def _rk_take_claim(self, rt: Any, name: str, task_id: str) -> MutexLease:
        """Hold the queued-scope claim of ``task_id`` while it runs (taking it if free)."""
        qname = _queued_name(name)
        owner = "q:" + task_id
        storage = rt.mutex_storage
        lease = rt.settings.lease
        try:
            token = storage.acquire(qname, owner, lease, 0)
        except LockTimeout:
            holder = storage.get_lock_info(qname).holder or ""
            other = holder[2:] if holder.startswith("q:") else holder
            log.info("rediskit: %s[%s] skipped: a duplicate of %s, queued or running",
                     self.name, task_id, other)
            if self._rk_policy.on_locked == "raise":
                raise TaskLocked(
                    f"{self.name}[{task_id}] is a duplicate of task {other}", qname
                ) from None
            self._rk_skip(task_id, qname, other)
        claim = MutexLease(storage, qname, owner, lease, fencing_token=token,
                           on_lost=rt.mutex.on_lost)
        claim.start_renewal()
        return claim

    def _rk_locked(self, rt: Any, policy: TaskPolicy, request: Any, name: str,
                   claim: MutexLease | None) -> None:
        holder = rt.mutex_storage.get_lock_info(name).holder if policy.on_locked != "retry" \
            else None
        if claim is not None:
            # Queued scope: the claim is ours, so the lock is held by another run of this
            # very task id (a redelivered message). Never run it twice, never touch its state.
            log.warning("rediskit: %s[%s] is already running (redelivered?): dropped",
                        self.name, request.id)
            self._rk_release_leases(rt, request)
            request.rediskit_keep = True
            raise Ignore()
        if policy.on_locked == "retry":
            self._rk_release_leases(rt, request)
            self._rk_requeue(request, f"singleton lock {name!r} is held")
        if policy.on_locked == "raise":
            raise TaskLocked(f"{self.name}: singleton lock {name!r} is held by {holder}", name)
        log.info("rediskit: %s[%s] skipped: singleton lock %r is held by %s",
                 self.name, request.id, name, holder)
        self._rk_skip(request.id, name, holder)

    def _rk_skip(self, task_id: str, key: str, holder: str | None) -> None:
        self.update_state(task_id=task_id, state=SKIPPED,
                          meta={"reason": "locked", "key": key, "holder": holder})
        raise Ignore()

    def _rk_requeue(self, request: Any, why: str) -> None:
        """Send the task again with a jittered countdown, keeping its id and its retry count
        (a re-queue is not a user retry), then end this run with ``Retry``."""
        kit = self._rk_kit()
        if request.is_eager:
            raise TaskLocked(f"{self.name}: {why} (eager tasks cannot be re-queued)")
        countdown = kit.settings.retry_delay * random.uniform(0.5, 1.5)
        headers = dict(request.headers or {})
        headers["rediskit_requeues"] = int(headers.get("rediskit_requeues") or 0) + 1
        sig = self.signature_from_request(
            request, countdown=countdown, retries=request.retries, headers=headers,
        )
        request.rediskit_keep = True
        sig.apply_async()
        raise Retry(f"{why}: re-queued in {countdown:.2f} s", when=countdown, sig=sig)

    def _rk_release_leases(self, rt: Any, request: Any) -> None:
        """Release the running leases (lock, permits) now; the queued claim stops renewing."""
        held: list[Lease] = getattr(request, "rediskit_leases", None) or []
        for lease in reversed(held):
            try:
                lease.release()
            except Exception:
                log.exception("rediskit: releasing %r failed (it ends with its lease)", lease.key)
            rt.owners.pop(lease.owner, None)
        held.clear()
        claim: MutexLease | None = getattr(request, "rediskit_claim", None)
        if claim is not None:
            renewer().unregister(claim)

    def _rk_finish(self, rt: Any, request: Any, *, keep_claim: bool) -> None:
        """End of a run: release everything; a queued claim stays for a re-sent message
        (whose ``apply_async`` has already rewritten the task's claims record)."""
        claim: MutexLease | None = getattr(request, "rediskit_claim", None)
        if not getattr(request, "rediskit_leases", None) and claim is None:
            return
        self._rk_release_leases(rt, request)
        if claim is not None and not keep_claim:
            try:
                claim.release()
            except Exception:
                log.exception("rediskit: releasing the claim of %s failed", request.id)
        request.rediskit_claim = None

    def retry(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if getattr(request, "rediskit_leases", None) or getattr(request, "rediskit_claim", None):
            # Release the running lock before the retry is published: a retry with
            # countdown=0 must not meet its own lock. A queued-scope claim is kept.
            self._rk_release_leases(self._rk_kit().runtime(), request)
        try:
            result = super().retry(*args, **kwargs)
        except Retry:
            request.rediskit_keep = True
            raise
        request.rediskit_keep = True
        return result

    # -- sending --------------------------------------------------------------------------
    def apply_async(self, args: Any = None, kwargs: Any = None, task_id: str | None = None,
                    *a: Any, **options: Any) -> Any:
        policy = self._rk_policy
        if not policy.active or self.app.conf.task_always_eager or a:
            return super().apply_async(args, kwargs, task_id, *a, **options)
        kit = self._rk_kit()
        rt = kit.runtime()
        has_callbacks = any(options.get(name) for name in _CALLBACK_OPTIONS)
        try:
            arguments = policy.bind(args, kwargs)
        except TypeError:
            return super().apply_async(args, kwargs, task_id, **options)  # Celery reports it
        if policy.cache_ttl is not None and not has_callbacks:
            found, value = rt.cache_lookup(self, policy, arguments, args or (), kwargs or {})
            if found:
                return _hit_result(task_id or uuid(), value, self.name)
        if not (policy.singleton and policy.scope == "queued"):
            return super().apply_async(args, kwargs, task_id, **options)
        given = task_id is not None
        task_id = task_id or uuid()
        name = policy.singleton_name(self.name, arguments, args or (), kwargs or {})
        qname = _queued_name(name)
        owner = "q:" + task_id
        ttl = kit.settings.queued_ttl + _delay_of(options)
        storage = rt.mutex_storage
        for _ in range(3):
            try:
                storage.acquire(qname, owner, ttl, 0)
                break
            except LockTimeout:
                holder = storage.get_lock_info(qname).holder
                if holder is None:
                    continue  # released meanwhile: try again
                existing = holder[2:] if holder.startswith("q:") else holder
                if has_callbacks:
                    raise TaskDuplicated(
                        f"{self.name}[{task_id}] was not sent: it duplicates task {existing}, "
                        f"queued or running, and its callbacks (chain/group/link) would be lost",
                        qname, existing,
                    ) from None
                log.info("rediskit: %s not sent: duplicate of %s", self.name, existing)
                res = self.AsyncResult(existing)
                res.rediskit_duplicate = True
                return res
        if given:
            storage.extend(qname, owner, ttl, add=False)  # a re-send (retry) of the holder
        rt.claims.record(task_id, [("m", qname, owner)], ttl)
        try:
            return super().apply_async(args, kwargs, task_id, **options)
        except BaseException:
            storage.release(qname, owner)
            raise

    def invalidate(self, *args: Any, **kwargs: Any) -> bool:
        """Drop the cached result of the call ``task(*args, **kwargs)``; True if one existed."""
        policy = self._rk_policy
        if policy.cache_ttl is None:
            from ..errors import ConfigurationError

            raise ConfigurationError(f"task {self.name} has no cache_ttl: nothing to invalidate")
        arguments = policy.bind(args, kwargs)
        return bool(self._rk_kit().runtime().cache_invalidate(self, policy, arguments, args,
                                                               kwargs))


class SingletonTask(RedisKitTask):
    """Base class of singleton tasks: ``@app.task(base=SingletonTask)``.

    Same as ``@app.task(singleton=True)`` on an app with ``RedisKit(app)``.
    """

    singleton: ClassVar[bool] = True
