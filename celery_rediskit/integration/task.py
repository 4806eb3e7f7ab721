"""The task base class: singleton locks, concurrency limits, global rate limits and cached
results around ``run``.

Everything happens inside the task's own call path (``__call__``, in the process that runs
the body), so leases are released on success, failure, retry, ``Ignore`` and soft time limits
before the result is stored. What only the worker's main process sees (revoke, hard time limit,
a killed child) is released by task id from the claims recorded in Redis (``claims.py``).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from functools import cache, partial
from typing import Any, ClassVar, NoReturn

from celery import Task, states
from celery._state import _task_stack
from celery.exceptions import Ignore, Reject, Retry
from celery.result import EagerResult
from celery.utils import uuid

from .._redis.batch import PreparedRelease, ScriptCall, run_scripts
from .._redis.scripts import call
from .._validate import resource_key, to_ms
from ..errors import ConfigurationError, LockError, LockTimeout, RateLimited
from ..lease import Grant, Lease, LeaseKind, new_owner_id
from ..mutex import MutexLease
from ..ratelimit import RateDecision
from ..renewal import renewer
from ..semaphore import Permit
from . import observe, parking, with_result
from .backoff import requeue_countdown
from .claims import holder_line
from .events import REQUEUED_EVENT, SKIPPED_EVENT, send_task_event
from .fused import with_claim, with_claim_record, with_forget, with_record
from .naming import declared_name
from .options import OPTION_NAMES, TaskPolicy, parse_policy
from .runtime import Kit, Runtime, kit_of
from .signals import (
    cache_hit,
    cache_miss,
    lease_acquired,
    lease_released,
    task_duplicate,
    task_requeued,
    task_skipped,
)

__all__ = ["RedisKitTask", "SingletonTask", "TaskDuplicated", "TaskLocked"]

log = logging.getLogger("celery_rediskit")

SKIPPED = "SKIPPED"
"""State a monitor (``celery.events.State``, Flower) gives a task on its ``task-skipped``
event. The task itself ends SUCCESS with the result None: see ``_rk_skip``."""

CLAIM_ATTEMPTS = 50
"""How many times ``apply_async`` tries to take a queued-scope claim that others keep
taking and releasing, before it gives up with ``TaskLocked`` (having published nothing)."""

_CALLBACK_OPTIONS = ("link", "link_error", "chain", "chord", "group_id")

_INLINE_RUNNERS = frozenset({"celery.map", "celery.starmap"})
"""Celery's builtin tasks that run their items as direct calls, ``task(*item)``: ``map``,
``starmap`` and ``chunks`` (a group of ``starmap`` tasks). Such a call honours the options."""


@cache
def _eager_result_takes_name() -> bool:
    """``EagerResult(name=...)`` exists from Celery 5.4 on."""
    return "name" in inspect.signature(EagerResult.__init__).parameters


class TaskLocked(LockError):
    """A singleton task met its lock held (``on_locked="raise"``); or a task that cannot be
    re-queued (``apply()``, eager mode) met its lock held or its limit full with
    ``on_locked``/``on_limited="retry"``; or ``apply_async`` could not take a queued-scope
    claim that kept changing hands. ``key`` names the lock, claim or semaphore."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message, key)
        # Every field in args: a result backend stores an exception only if
        # ``type(exc)(*exc.args)`` rebuilds it (else Celery stores a base class instead).
        self.args = (message, key)

    def __str__(self) -> str:
        return str(self.args[0])


class _Skipped(Exception):
    """Raised inside ``_rk_execute`` to end a skipped run with the result None."""


class TaskDuplicated(LockError):
    """A ``singleton_scope="queued"`` task with callbacks (chain, group, chord, link) is a
    duplicate of a task already queued or running. ``task_id`` is that task's id.

    Raised instead of returning the existing task's result, because the callbacks of the
    duplicate would otherwise be silently dropped.
    """

    def __init__(self, message: str, key: str | None = None, task_id: str | None = None) -> None:
        super().__init__(message, key)
        self.task_id = task_id
        self.args = (message, key, task_id)  # see TaskLocked

    def __str__(self) -> str:
        return str(self.args[0])


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
        when = datetime.fromisoformat(eta) if isinstance(eta, str) else eta
        now = datetime.now(when.tzinfo or UTC) if when.tzinfo else datetime.now()
        return max(0.0, (when - now).total_seconds())
    return 0.0


def _try_acquire(rt: Runtime, record: tuple[Any, ...] | None, kind: LeaseKind, name: str,
                 owner: str, permits: int, seconds: float, *, if_free: bool = False) -> int:
    """One attempt (without queueing) to take lock (``kind`` "m") or permit ("s") ``name``
    for ``owner``: the token (>= 1) when granted, else <= -1. ``record`` (the claims record's
    command) is written in the same round trip: on one server inside the acquire script
    (``fused.py``; with ``if_free``, only while the lock is free or the caller's), else sent
    first (never with ``if_free``). A limit's ``permits`` are declared: they become the
    semaphore's total at this attempt, unless an operator set it (``rediskit permits``)."""
    wrap = None
    if record is not None and rt.one_server:
        wrap, record = with_record(record, only_if_free=if_free), None
    if kind is LeaseKind.MUTEX:
        return rt.mutex_storage.try_acquire(name, owner, seconds, before=record, wrap=wrap)
    return rt.semaphore_storage.try_acquire(name, owner, permits, seconds, before=record,
                                            declared=True, wrap=wrap)


def _ignores_result(task: Any, request: Any) -> bool:
    """Whether Celery stores no result for this run (so no store can carry its releases)."""
    ignore = getattr(request, "ignore_result", None)
    return bool(task.ignore_result if ignore is None else ignore)


def _sleep_until(rt: Runtime, at: Any) -> None:
    """Sleep until ``at`` (Unix seconds on the Redis server's clock), if it is still ahead: a
    re-queued run that a worker whose clock runs ahead of the sender's starts early (Celery's
    ETA is on the workers' clocks) waits for its slot instead of starting before it."""
    if not isinstance(at, (int, float)):
        return
    seconds, micros = call(rt.client, "TIME")
    ahead = at - (int(seconds) + int(micros) / 1e6)
    if ahead > 0:
        time.sleep(ahead)


class RedisKitTask(Task):  # type: ignore[misc]
    """Base of every task of an app with ``RedisKit(app)`` installed.

    Options (class attributes, or ``@app.task(...)`` keywords): ``singleton``,
    ``singleton_key``, ``singleton_scope``, ``on_locked``, ``concurrency_limit``,
    ``on_limited``, ``limit_timeout``, ``global_rate_limit``, ``global_rate_burst``,
    ``on_rate_limited``, ``cache_ttl``, ``cache_key``, ``cache_tags``.
    A task with none of them runs exactly like a plain Celery task.
    """

    singleton: ClassVar[bool] = False
    singleton_key: ClassVar[Any] = None
    singleton_scope: ClassVar[str] = "running"
    on_locked: ClassVar[str] = "retry"
    concurrency_limit: ClassVar[Any] = None
    on_limited: ClassVar[str] = "retry"
    limit_timeout: ClassVar[Any] = None
    global_rate_limit: ClassVar[Any] = None
    global_rate_burst: ClassVar[Any] = None
    on_rate_limited: ClassVar[str] = "retry"
    cache_ttl: ClassVar[Any] = None
    cache_key: ClassVar[Any] = None
    cache_tags: ClassVar[Any] = None

    _rk_policy: ClassVar[TaskPolicy] = TaskPolicy()

    #: tells the worker's main process which child runs which task (``children.py``)
    Request = "celery_rediskit.integration.request:TrackedRequest"
    #: parks a blocked message on receipt, in the worker's main process (``request.py``)
    Strategy = "celery_rediskit.integration.request:strategy"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._rk_policy = _policy_of_class(cls)

    @classmethod
    def bind(cls, app: Any) -> Any:
        if cls._rk_policy.active:
            kit_of(app)  # SingletonTask used on an app without RedisKit(app): install
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
            # A direct call ``task(...)`` is a plain function call (no lock, permit or
            # cache), except the items of map/starmap/chunks, which Celery runs that way.
            runner = self.app.current_task if policy.active else None
            if (runner is not None and runner.name in _INLINE_RUNNERS
                    and not runner.request.called_directly):
                return self._rk_run_inline(policy, runner.request, args, kwargs)
            return super().__call__(*args, **kwargs)
        if not policy.active:
            return self.run(*args, **kwargs)
        return self._rk_execute(policy, request, args, kwargs)

    def _rk_kit(self) -> Kit:
        return kit_of(self.app)

    def _rk_run_inline(self, policy: TaskPolicy, outer: Any, args: tuple[Any, ...],
                       kwargs: dict[str, Any]) -> Any:
        """Run one item of a map/starmap/chunks task under the options, as part of that
        task: its leases are recorded under the outer task's id (so a revoke or hard time
        limit of it releases them), and it cannot be re-queued on its own, so where a
        message would be re-queued (``on_locked``/``on_limited="retry"``) the item waits
        for the lock or permit, up to ``limit_timeout``. It stays a direct call for the
        body (``self.request.called_directly``; ``self.retry()`` raises at once)."""
        _task_stack.push(self)
        self.push_request(args=args, kwargs=kwargs, id=outer.id, hostname=outer.hostname,
                          is_eager=outer.is_eager, rediskit_inline=True)
        try:
            return self._rk_execute(policy, self.request, args, kwargs)
        finally:
            self.pop_request()
            _task_stack.pop()

    def _rk_execute(self, policy: TaskPolicy, request: Any, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        kit = self._rk_kit()
        rt = kit.runtime()
        task_id: str = request.id
        arguments = policy.bind(args, kwargs)
        cache_name = None
        if policy.cache_ttl is not None:
            cache_name = policy.cache_name(self.name, arguments, args, kwargs)
            found, value = rt.cache_lookup(self.name, cache_name)
            if cache_hit.receivers or cache_miss.receivers:
                observe.cache_looked_up(self, task_id, cache_name, found, "run")
            if found:
                return value
        held: list[Lease] = []
        claim: MutexLease | None = None
        request.rediskit_leases = held
        request.rediskit_claim = None
        request.rediskit_keep = False
        request.rediskit_record = None  # the claims record this run wrote (a SET command)
        request.rediskit_rate_grants = []
        request.rediskit_held_since = None
        request.rediskit_cache_write = None  # the cache entry's store, sent with the releases
        try:
            try:
                # The rate first: a rate-limited run holds no lock or permit while it waits
                # or is re-queued (see _rk_take_rates).
                if policy.rate_limits:
                    self._rk_take_rates(rt, policy, request, arguments)
                plan: list[tuple[LeaseKind, str, int]] = []  # (kind, name, permits), in order
                claim_name = None  # a queued claim taken with the lock's first try
                if policy.singleton:
                    name = policy.singleton_name(self.name, arguments, args, kwargs)
                    if policy.scope == "queued" and rt.one_server and not policy.parks:
                        claim_name = _queued_name(name)
                    elif policy.scope == "queued":
                        claim = self._rk_take_claim(rt, name, task_id)
                        request.rediskit_claim = claim
                    plan.append((LeaseKind.MUTEX, name, 0))
                if policy.limits:
                    plan.extend((LeaseKind.SEMAPHORE, sem_name, permits)
                                for sem_name, permits in policy.limit_names(arguments))
                if plan:
                    self._rk_acquire(rt, policy, request, plan, claim, held, claim_name)
            except BaseException:
                self._rk_give_back_rates(rt, request)  # the body does not start now
                raise
            result = self.run(*args, **kwargs)
            if cache_name is not None:
                self._rk_cache_result(rt, policy, request, cache_name, result, arguments)
            return result
        except _Skipped:
            return None
        finally:
            try:
                self._rk_finish(rt, request, keep_claim=getattr(request, "rediskit_keep", False))
            finally:
                self._rk_forget_record(rt, request)

    def _rk_cache_result(self, rt: Runtime, policy: TaskPolicy, request: Any, name: str,
                         result: Any, arguments: Mapping[str, Any]) -> None:
        """Cache the run's result: where its store can take it (``with_result.py``), handed
        to the end of the run (:meth:`_rk_release_all`) to be written in the store's
        transaction, before the result; else now."""
        tags = policy.tags(arguments)
        if self._rk_store_backend(rt, request) is None:
            rt.cache_store(self.name, name, result, policy.cache_ttl, tags)
            return
        request.rediskit_cache_write = rt.cache_store_call(self.name, name, result,
                                                           policy.cache_ttl, tags)

    def _rk_store_backend(self, rt: Runtime, request: Any) -> Any | None:
        """The result backend whose store of this run's result can carry its releases and
        its cache entry (``with_result.backend_for``), or None: they are sent on their own."""
        if (request.is_eager or self._rk_policy.parks
                or rt.settings.trace_commands  # every command through rt.client
                or getattr(request, "rediskit_inline", False)
                or _ignores_result(self, request)):
            return None
        return with_result.backend_for(self, rt.client)

    def _rk_acquire(self, rt: Runtime, policy: TaskPolicy, request: Any,
                    plan: list[tuple[LeaseKind, str, int]], claim: MutexLease | None,
                    held: list[Lease], claim_name: str | None = None) -> None:
        """Take every lock and permit of ``plan`` (in its order) and record them by task id.

        The owner ids are chosen up front, so the claims record is sent together with the
        first attempt, in one round trip (on one server, in its very script). (A record naming
        a lock this run did not get is harmless: every release by task id is owner-checked.)
        A queued-scope run must not overwrite the record of another run of the same task id,
        which holds its lock when it meets it held: on one server its first attempt writes
        the record only while the lock is free or its own; on a cluster it writes the record
        after its acquisitions.

        ``claim_name`` (queued scope, one server, ``claim`` None): the claim to take in the same
        round trip as the lock's first try (:meth:`_rk_claim_and_try`).

        Every lease names the record as a companion key, so the renewals that keep the leases
        alive keep the record too (in the same round trip), however long the task runs.
        """
        settings = rt.settings
        seconds = settings.lease
        task_id: str = request.id
        inline = bool(getattr(request, "rediskit_inline", False))
        owners = [new_owner_id() for _ in plan]
        resent = parking.resent_of(request) if policy.parks else None
        turn = None if resent is None else resent.turn
        adopt_at = -1  # the plan's index of the resource this message was re-sent for
        if resent is not None:
            adopt_at = next((i for i, (k, n, _) in enumerate(plan)
                             if k == resent.kind and resource_key(n) == resent.name), -1)
            if adopt_at >= 0:
                owners[adopt_at] = resent.owner  # the reservation's owner id
        records = [(kind, name, owner) for (kind, name, _), owner in zip(plan, owners,
                                                                         strict=True)]
        if claim is not None:
            records.append((LeaseKind.MUTEX, claim.key, claim.owner))
        elif claim_name is not None:
            records.append((LeaseKind.MUTEX, claim_name, "q:" + task_id))
        queued = claim is not None or claim_name is not None
        record = rt.claims.record_command(task_id, records, 2 * seconds,
                                          holder_line(self.name, request.hostname))
        companions = (record[1],)  # the record's key (SET key text EX seconds)
        pending: tuple[Any, ...] | None = record if not queued or rt.one_server else None
        if not queued:
            request.rediskit_record = record
        if (resent is None and policy.parks and not inline
                and parking.redelivered_copy(self, rt, request, plan)):
            parking.drop_copy(self, rt, request, "a redelivered copy of a parked message")
        lease: Lease
        if adopt_at >= 0 and resent is not None:
            # First the reservation this message was re-sent with: held (so released) if the
            # task parks again at a resource before it in the plan. The claims record goes
            # with the next try (or after the plan): a copy dropped here must not overwrite
            # the record of the run that adopted it.
            got = parking.adopt(self, rt, request, resent, None)  # a Grant: dated by its call
            if got >= 1:
                adopted_kind, adopted_name, _ = plan[adopt_at]
                lease = (MutexLease if adopted_kind is LeaseKind.MUTEX else Permit)(
                    rt.mutex_storage if adopted_kind is LeaseKind.MUTEX
                    else rt.semaphore_storage, resource_key(adopted_name), resent.owner,
                    seconds, fencing_token=got, on_lost=rt.mutex.on_lost,
                    companion_keys=companions)
                lease.start_renewal()
                held.append(lease)
                rt.owners[resent.owner] = (self, task_id)
                if lease_acquired.receivers:
                    observe.acquired(self, task_id, lease, 0.0)
            else:
                adopt_at = -1
        for index, ((kind, name, permits), owner) in enumerate(zip(plan, owners, strict=True)):
            if index == adopt_at:
                continue
            name = resource_key(name)
            started = time.monotonic()
            if kind is LeaseKind.MUTEX:
                if claim_name is not None and pending is not None:
                    claim, token = self._rk_claim_and_try(rt, request, claim_name, pending,
                                                          name, owner, seconds)
                else:
                    token = _try_acquire(rt, pending, kind, name, owner, 0, seconds,
                                         if_free=claim is not None)
                if claim is not None and pending is not None and token >= 1:
                    request.rediskit_record = record  # written: the lock was free
                pending = None
                if (token < 1 and policy.on_locked == "park" and claim is None and not inline
                        and not request.is_eager):
                    token = parking.park(self, rt, request, kind, name, owner, 0, turn)
                if token >= 1:
                    # A Grant, dated from the request of the try (or the park) that granted:
                    # never longer than the server's lease, however late the reply came.
                    lease = MutexLease(rt.mutex_storage, name, owner, seconds,
                                       fencing_token=token, on_lost=rt.mutex.on_lost,
                                       companion_keys=companions)
                    lease.start_renewal()
                elif inline and policy.on_locked in ("retry", "park"):
                    with observe.waiting(self, task_id, kind, name):
                        lease = rt.mutex.acquire(name, timeout=policy.limit_timeout
                                                 or settings.limit_timeout, lease=seconds,
                                                 owner=owner, companion_keys=companions)
                else:
                    self._rk_locked(rt, policy, request, name, None if inline else claim)
            else:
                wait = policy.on_limited == "wait" or inline
                got = _try_acquire(rt, pending, kind, name, owner, permits, seconds)
                if (got < 1 and policy.on_limited == "park" and not inline
                        and not request.is_eager):
                    got = parking.park(self, rt, request, kind, name, owner, permits, turn)
                if got >= 1:  # 1, a Grant dated as above
                    lease = Permit(rt.semaphore_storage, name, owner, seconds,
                                   fencing_token=got, on_lost=rt.mutex.on_lost,
                                   companion_keys=companions)
                    lease.start_renewal()
                elif not wait:
                    self._rk_release_leases(rt, request)
                    self._rk_requeue(request, f"concurrency limit {name!r} is full",
                                     "limited", name)
                else:
                    # The try above applied the declared permits: wait with the total as is.
                    timeout = policy.limit_timeout or settings.limit_timeout
                    with observe.waiting(self, task_id, kind, name):
                        lease = rt.semaphore(permits).acquire(
                            name, timeout=timeout, lease=seconds, owner=owner,
                            companion_keys=companions,
                        )
                pending = None
            held.append(lease)
            rt.owners[owner] = (self, task_id)
            if lease_acquired.receivers:
                observe.acquired(self, task_id, lease, time.monotonic() - started)
        if adopt_at > 0:  # the plan's order: the singleton lock first (``self.lease``)
            held.insert(adopt_at, held.pop(0))
        if pending is not None:  # only the adopted reservation: no try carried the record
            call(rt.client, *pending)
        if claim is not None and request.rediskit_record is None:
            call(rt.client, *record)
            request.rediskit_record = record
        request.rediskit_held_since = time.monotonic()  # how long it held: see after_release

    def _rk_take_rates(self, rt: Runtime, policy: TaskPolicy, request: Any,
                       arguments: Mapping[str, Any]) -> None:
        """Take a slot of every global rate limit of this call before anything else.

        Each limiter reserves its next free slot in one round trip (:mod:`..ratelimit`).
        When every slot is free now, the run goes on. Otherwise the run starts at the latest
        of its slots: with ``on_rate_limited="retry"`` the task is re-queued with a countdown
        of exactly that wait (its slots travel with the message, in the
        ``rediskit_rate_paid`` header, so the re-sent run starts without another check: at
        most one extra message per task; if it comes early, it sleeps until its slot on the
        server's clock); with ``"wait"`` (and for map/starmap items, which
        cannot be re-queued) the worker sleeps until then, and a slot further away than
        ``limit_timeout`` fails the run with ``RateLimited``, taking nothing.

        A run whose body then does not start (a lock held, a limit full, a skip) gives its
        slots back when no later slot was taken since (:meth:`_rk_give_back_rates`), else
        they stay spent: a rate counts starts, never more.
        """
        headers = request.headers or {}
        paid_header = headers.get("rediskit_rate_paid") or {}
        paid: set[str] = set()
        if isinstance(paid_header, dict) and paid_header.get("retries") == request.retries:
            paid = set(paid_header.get("names") or ())  # reserved by the run that re-queued us
            _sleep_until(rt, paid_header.get("at"))
        inline = bool(getattr(request, "rediskit_inline", False))
        wait = policy.on_rate_limited == "wait" or inline
        timeout = (policy.limit_timeout or rt.settings.limit_timeout) if wait else None
        grants: list[tuple[str, Any, RateDecision]] = request.rediskit_rate_grants
        longest = 0.0
        for name, rate in policy.rate_names(arguments):
            name = resource_key(name)
            if name in paid:
                continue
            decision = rt.rate_storage.check(name, rate, policy.rate_burst, 1, timeout)
            if not decision.allowed:
                raise RateLimited(
                    f"{self.name}: global rate limit {name!r} ({rate.text}): the next slot is "
                    f"{decision.retry_after:.3f} s away, beyond limit_timeout ({timeout} s)",
                    name, decision.retry_after,
                )
            grants.append((name, rate, decision))
            longest = max(longest, decision.retry_after)
        if longest <= 0:
            return
        if wait:
            time.sleep(longest)  # exactly until the latest slot starts
            return
        names = [name for name, _, _ in grants]
        at = max(d.now + d.retry_after for _, _, d in grants)  # the latest slot, server clock
        self._rk_requeue(request, f"global rate limit {', '.join(map(repr, names))}",
                         "rate_limited", names[0], countdown=longest,
                         rate_paid={"names": names, "at": round(at, 6)})

    def _rk_give_back_rates(self, rt: Runtime, request: Any) -> None:
        """Give back the rate slots this run took, if still the latest of their limiters."""
        grants: list[tuple[str, Any, RateDecision]] = getattr(
            request, "rediskit_rate_grants", None) or []
        for name, rate, decision in grants:
            try:
                rt.rate_storage.cancel(name, decision, rate)
            except Exception:  # Redis unreachable: the slot stays spent, the rate holds
                log.warning("rediskit: giving back a slot of rate limit %r failed", name,
                            exc_info=True)
        grants.clear()

    def _rk_take_claim(self, rt: Runtime, name: str, task_id: str) -> MutexLease:
        """Hold the queued-scope claim of ``task_id`` while it runs (taking it if free)."""
        qname = _queued_name(name)
        token = rt.mutex_storage.try_acquire(qname, "q:" + task_id, rt.settings.lease)
        if token < 1:  # one try: a claim never waits here
            self._rk_duplicate(rt, qname, task_id)
        return self._rk_hold_claim(rt, qname, task_id, token)

    def _rk_hold_claim(self, rt: Runtime, qname: str, task_id: str, token: int) -> MutexLease:
        """The claim ``qname`` just granted to ``task_id`` (``token``), renewed while held."""
        claim = MutexLease(rt.mutex_storage, qname, "q:" + task_id, rt.settings.lease,
                           fencing_token=token, on_lost=rt.mutex.on_lost,
                           companion_keys=(rt.claims.key(task_id),))
        claim.start_renewal()
        return claim

    def _rk_duplicate(self, rt: Runtime, qname: str, task_id: str) -> NoReturn:
        """The claim ``qname`` is another task's: this run is a duplicate of it, skipped or
        raised per ``on_locked``."""
        holder = rt.mutex_storage.get_lock_info(qname).holder or ""
        other = holder[2:] if holder.startswith("q:") else holder
        if task_duplicate.receivers:
            observe.duplicate(self, task_id, other, qname, "run")
        if self._rk_policy.on_locked == "raise":
            raise TaskLocked(
                f"{self.name}[{task_id}] is a duplicate of task {other}", qname
            ) from None
        self._rk_skip(self.request, "duplicate", qname, other)

    def _rk_claim_and_try(self, rt: Runtime, request: Any, qname: str, record: tuple[Any, ...],
                          name: str, owner: str, seconds: float) -> tuple[MutexLease, int]:
        """Queued scope on one server: renew the claim ``qname`` (or take it, free) and try
        the lock ``name``, in one script; the claim held (``request.rediskit_claim``) and the
        lock's try (a token, as :func:`_try_acquire` with ``if_free``). A duplicate (the
        claim another task's) is skipped or raised as by :meth:`_rk_take_claim`, with the
        lock left alone: the script does nothing then (``with_claim``)."""
        storage = rt.mutex_storage
        task_id: str = request.id
        claim_owner = "q:" + task_id
        wrap = with_claim(record, storage.keys.lock_list(qname), claim_owner,
                          to_ms(rt.settings.lease))
        script, keys, args = wrap(storage.try_call(name, owner, seconds))
        sent = time.monotonic()  # both leases count from here (lease.Grant)
        reply = script.run(rt.client, keys, args)
        claimed, tried = int(reply[0]), int(reply[1])
        if claimed < 1:
            self._rk_duplicate(rt, qname, task_id)
        claim = self._rk_hold_claim(rt, qname, task_id, Grant(claimed, sent))
        request.rediskit_claim = claim
        return claim, Grant(tried, sent) if tried >= 1 else tried

    def _rk_locked(self, rt: Runtime, policy: TaskPolicy, request: Any, name: str,
                   claim: MutexLease | None) -> NoReturn:
        holder = rt.mutex_storage.get_lock_info(name).holder \
            if policy.on_locked in ("skip", "raise") else None
        if claim is not None:
            # Queued scope: the claim is ours, so the lock is held by another run of this
            # very task id (a redelivered message). Never run it twice, never touch its state.
            log.warning("rediskit: %s[%s] is already running (redelivered?): dropped",
                        self.name, request.id)
            if task_duplicate.receivers:
                observe.duplicate(self, request.id, request.id, claim.key, "run")
            self._rk_release_leases(rt, request)
            request.rediskit_keep = True
            raise Ignore()
        if policy.on_locked in ("retry", "park"):  # park: eager runs only (TaskLocked)
            self._rk_release_leases(rt, request)
            self._rk_requeue(request, f"singleton lock {name!r} is held", "locked", name)
        if policy.on_locked == "raise":
            raise TaskLocked(f"{self.name}: singleton lock {name!r} is held by {holder}", name)
        self._rk_skip(request, "locked", name, holder)

    def _rk_skip(self, request: Any, reason: str, key: str, holder: str | None) -> NoReturn:
        """End this run without running the body: it finishes as SUCCESS with the result
        None (raises ``_Skipped``, which ``_rk_execute`` turns into that return).

        SUCCESS is the only ready state that lets the task's group and chord complete and
        its chain go on (a failure would fail them, and a custom state is never ready, so
        ``get()`` would hang). Why it was skipped goes to the log and, for monitors, to a
        ``task-skipped`` event (``reason`` "locked" or "duplicate", the ``lock`` or claim
        name and its ``holder``). The event is sent whether or not task events are on: a
        pool process cannot see ``celery control enable_events`` (which Flower sends), and
        an event nobody listens to is dropped by the broker. Not for eager runs, which send
        no events.
        """
        log.info("rediskit: %s[%s] skipped (%s): %r is held by %s",
                 self.name, request.id, reason, key, holder)
        if task_skipped.receivers:
            observe.skipped(self, request.id, reason, key, holder)
        send_task_event(self, request, SKIPPED_EVENT, reason=reason, lock=key, holder=holder)
        raise _Skipped()

    def _rk_requeue(self, request: Any, why: str, reason: str = "locked", key: str = "", *,
                    countdown: float | None = None,
                    rate_paid: dict[str, Any] | None = None) -> None:
        """Send the task again, keeping its id and its retry count (a re-queue is not a user
        retry), then end this run with ``Retry``. ``reason`` ("locked", "limited",
        "rate_limited") and ``key`` (the resource met) are for monitors.

        The countdown is a backoff (``backoff.py``), counted in the ``rediskit_requeues``
        header; or, for a rate limit, exactly ``countdown``, with the rate slots the re-sent
        run owns in ``rate_paid`` (the header ``rediskit_rate_paid``: the limiters' names and
        the slot's time ``at``, valid for this retry count only, so a later ``retry()`` of the
        task pays again)."""
        settings = self._rk_kit().settings
        if request.is_eager:
            raise TaskLocked(f"{self.name}: {why} (eager tasks cannot be re-queued)")
        headers = dict(request.headers or {})
        headers.pop("rediskit_rate_paid", None)  # a run sent back by a lock pays again
        requeues = int(headers.get("rediskit_requeues") or 0)
        if countdown is None:
            countdown = requeue_countdown(self, requeues, first=settings.retry_delay,
                                          ceiling=settings.retry_delay_max)
            headers["rediskit_requeues"] = requeues + 1
        if rate_paid is not None:
            headers["rediskit_rate_paid"] = {**rate_paid, "retries": request.retries}
        sig = self.signature_from_request(
            request, countdown=countdown, retries=request.retries, headers=headers,
        )
        request.rediskit_keep = True
        sig.apply_async()
        if rate_paid is not None:
            request.rediskit_rate_grants = []  # the slots are the re-sent message's now
        kind = LeaseKind.MUTEX if reason == "locked" else LeaseKind.SEMAPHORE
        if task_requeued.receivers:
            observe.requeued(self, request.id, reason, key, countdown, requeues, kind)
        send_task_event(self, request, REQUEUED_EVENT, reason=reason, key=key,
                        name=declared_name(self, kind, key), countdown=countdown,
                        requeues=requeues)
        raise Retry(f"{why}: re-queued in {countdown:.3f} s", when=countdown, sig=sig)

    def _rk_release_leases(self, rt: Runtime, request: Any) -> None:
        """Release the running leases (lock, permits) now; the queued claim stops renewing."""
        held: list[Lease] = getattr(request, "rediskit_leases", None) or []
        released = list(reversed(held))
        for lease in released:
            try:
                lease.release()
            except Exception:
                log.exception("rediskit: releasing %r failed (it ends with its lease)", lease.key)
            rt.owners.pop(lease.owner, None)
            if lease_released.receivers:
                observe.released(self, request.id, lease)
        held.clear()
        if released and self._rk_policy.parks:
            since = getattr(request, "rediskit_held_since", None)
            parking.after_release(self, rt, released,
                                  None if since is None else time.monotonic() - since)
        claim: MutexLease | None = getattr(request, "rediskit_claim", None)
        if claim is not None:
            renewer().unregister(claim)

    def _rk_release_all(self, rt: Runtime, request: Any, claim: MutexLease | None,
                        keep_claim: bool) -> None:
        """End of a run that re-sends nothing: release its leases (last taken first), then
        its queued claim unless kept, then delete its claims record, in one round trip (on
        one server the record goes in the last release's script, ``fused.py``). In a worker
        whose result backend is on the same server, that round trip is the store of the
        result (``with_result.py``). What fails is logged and ends with its lease; the
        record is then deleted apart."""
        held: list[Lease] = getattr(request, "rediskit_leases", None) or []
        released = held[::-1]
        leases = released
        record: tuple[Any, ...] | None = getattr(request, "rediskit_record", None)
        then = [rt.claims.forget_call(record)] if record is not None else []
        fused = record is not None and rt.one_server
        folded: MutexLease | None = None  # the claim, released in the lock's release script
        if claim is not None:
            if keep_claim:
                renewer().unregister(claim)
            elif fused and released and released[-1].kind is LeaseKind.MUTEX \
                    and not claim.released:
                folded = claim
                renewer().unregister(claim)  # PreparedRelease does it for the leases it ends
            else:
                leases = [*released, claim]
        claim_at = None if folded is None else (
            rt.mutex_storage.renewal_key(folded.key), folded.owner)
        fuse = with_forget(record, claim_at) if fused and record is not None else None
        prepared = PreparedRelease(leases, then, fuse)
        held.clear()
        request.rediskit_claim = None
        for lease in released:
            rt.owners.pop(lease.owner, None)
        task_id: str = request.id
        since: float | None = getattr(request, "rediskit_held_since", None)

        def done(replies: list[Any]) -> None:
            forgotten = prepared.finish(replies)
            if folded is not None and forgotten and not isinstance(forgotten[0], Exception):
                folded.released = True  # with the lock, in its script
            if record is not None and (not forgotten or isinstance(forgotten[0], Exception)):
                self._rk_forget(rt, task_id, record)
            if lease_released.receivers:
                for lease in released:
                    observe.released(self, task_id, lease)
            if released and self._rk_policy.parks:
                parking.after_release(self, rt, released,
                                      None if since is None else time.monotonic() - since)

        request.rediskit_record = None  # deleted with the releases (or apart: done)
        write: ScriptCall | None = getattr(request, "rediskit_cache_write", None)
        request.rediskit_cache_write = None
        first = [] if write is None else [(write, partial(rt.cache_stored, self.name))]
        backend = None
        if prepared or first:
            backend = self._rk_store_backend(rt, request)
        if backend is None:
            with_result.send_now(rt.client, prepared, done, first)
            return
        with_result.defer(backend, task_id, prepared, rt.client, done, first)

    def _rk_forget(self, rt: Runtime, task_id: str, record: tuple[Any, ...]) -> None:
        try:
            rt.claims.forget(record)
        except Exception:  # Redis unreachable: the record expires with the leases
            log.warning("rediskit: deleting the claims record of %s failed", task_id,
                        exc_info=True)

    def _rk_finish(self, rt: Runtime, request: Any, *, keep_claim: bool) -> None:
        """End of a run: release everything, then send the retry ``retry()`` asked for
        (:meth:`_rk_hold_retry`); a queued claim stays for the re-sent message (whose
        ``apply_async`` rewrites the task's claims record)."""
        claim: MutexLease | None = getattr(request, "rediskit_claim", None)
        resend: tuple[Any, Any, str, dict[str, Any]] | None = getattr(
            request, "rediskit_resend", None)
        write: ScriptCall | None = getattr(request, "rediskit_cache_write", None)
        if (not getattr(request, "rediskit_leases", None) and claim is None and resend is None
                and write is None):
            return
        if resend is None:
            self._rk_release_all(rt, request, claim, keep_claim)
            return
        if write is not None:  # a body that returned after retry(throw=False)
            request.rediskit_cache_write = None
            rt.cache_stored(self.name, run_scripts(rt.client, [write])[0])
        self._rk_release_leases(rt, request)
        failed: Exception | None = None
        if resend is not None:
            request.rediskit_resend = None
            args, kwargs, task_id, options = resend
            try:
                self.apply_async(args, kwargs, task_id, **options)
            except Exception as exc:  # as Celery's retry(): a failed publish fails the task
                failed, keep_claim = exc, False
        if claim is not None and not keep_claim:
            try:
                claim.release()
            except Exception:
                log.exception("rediskit: releasing the claim of %s failed", request.id)
        request.rediskit_claim = None
        if failed is not None:
            raise Reject(failed, requeue=False) from failed

    def _rk_forget_record(self, rt: Runtime, request: Any) -> None:
        """The run is over: delete the claims record it wrote (after its releases), unless a
        re-sent message or another delivery of the task id has rewritten it since."""
        record: tuple[Any, ...] | None = getattr(request, "rediskit_record", None)
        if record is None:
            return
        request.rediskit_record = None
        self._rk_forget(rt, request.id, record)

    def retry(self, *args: Any, **kwargs: Any) -> Any:
        """Celery's ``retry``, with the retry sent once this run has released its leases.

        Celery decides first: past ``max_retries`` it raises ``MaxRetriesExceededError`` (or
        ``exc``) and sends nothing, so a fallback in ``except MaxRetriesExceededError`` still
        runs under the lock. When Celery does send the retry (its ``apply_async`` of this
        task id), the message is held back (:meth:`_rk_hold_retry`) and sent at the end of
        the run, right after the leases are released: the retried run (even with
        ``countdown=0``) neither meets its own lock nor overlaps what still runs after
        ``retry()`` here (``finally`` blocks, the rest of a ``throw=False`` body). A failed
        send fails the task, as in Celery (``Reject``). A queued-scope claim is kept for the
        retry. An eager run is re-run by Celery without sending anything.
        """
        request = self.request
        held = bool(getattr(request, "rediskit_leases", None)
                    or getattr(request, "rediskit_claim", None))
        if held:
            request.rediskit_retrying = True  # consumed by _rk_hold_retry
        try:
            result = super().retry(*args, **kwargs)
        except Retry:
            request.rediskit_keep = True
            raise
        finally:
            if held:
                request.rediskit_retrying = False
        request.rediskit_keep = True
        return result

    def _rk_hold_retry(self, args: Any, kwargs: Any, task_id: str | None,
                       options: dict[str, Any]) -> bool:
        """Called first in :meth:`apply_async`: when this is Celery's ``retry()`` sending
        the running task again (same task id) while it holds leases, keep the message on
        the request for :meth:`_rk_finish` to send, and return True."""
        if task_id is None:
            return False
        request = self.request
        if not (getattr(request, "rediskit_retrying", False) and request.id == task_id):
            return False
        request.rediskit_retrying = False
        request.rediskit_resend = (args, kwargs, task_id, options)
        return True

    # -- sending --------------------------------------------------------------------------
    def apply_async(self, args: Any = None, kwargs: Any = None, task_id: str | None = None,
                    *a: Any, **options: Any) -> Any:
        if self._rk_hold_retry(args, kwargs, task_id, options):
            return self.AsyncResult(task_id)  # sent by _rk_finish
        policy = self._rk_policy
        if parking.HEADER in (options.get("headers") or {}):
            return super().apply_async(args, kwargs, task_id, *a, **options)  # a re-send
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
            name = policy.cache_name(self.name, arguments, args or (), kwargs or {})
            found, value = rt.cache_lookup(self.name, name)
            if found:
                task_id = task_id or uuid()
                if cache_hit.receivers:
                    observe.cache_looked_up(self, task_id, name, True, "send")
                return self._rk_cached_result(task_id, value, options)
            if cache_miss.receivers:
                observe.cache_looked_up(self, task_id, name, False, "send")
        if not (policy.singleton and policy.scope == "queued"):
            return super().apply_async(args, kwargs, task_id, **options)
        given = task_id is not None
        task_id = task_id or uuid()
        name = policy.singleton_name(self.name, arguments, args or (), kwargs or {})
        qname = _queued_name(name)
        owner = "q:" + task_id
        ttl = kit.settings.queued_ttl + _delay_of(options)
        storage = rt.mutex_storage
        record = rt.claims.record_command(task_id, [(LeaseKind.MUTEX, qname, owner)], ttl)
        # On one server the claim's try writes the task's claims record in its script, while
        # the claim is free or the task's (one round trip); on a cluster it is sent after.
        wrap = with_claim_record(record) if rt.one_server else None
        # Taking the claim and reading its holder are two round trips: between them the
        # holder may finish ("released meanwhile"), and others may take it again. Try again
        # until the claim is ours or a holder is seen; never publish without the claim.
        for _ in range(CLAIM_ATTEMPTS):
            try:
                storage.acquire(qname, owner, ttl, 0, wrap=wrap)
                break
            except LockTimeout:
                holder = storage.get_lock_info(qname).holder
                if holder is None:
                    continue  # released meanwhile: try again
                existing = holder[2:] if holder.startswith("q:") else holder
                if task_duplicate.receivers:
                    observe.duplicate(self, task_id, existing, qname, "send")
                if has_callbacks or given:
                    # Returning the existing task's result would drop the callbacks, or
                    # leave the id the caller chose (a canvas froze it) unresolved forever.
                    why = ("its callbacks (chain/group/link) would be lost" if has_callbacks
                           else f"its id {task_id} was chosen by the caller (a chain link, or "
                                f"task_id=) and would never get a result")
                    raise TaskDuplicated(
                        f"{self.name}[{task_id}] was not sent: it duplicates task {existing}, "
                        f"queued or running, and {why}", qname, existing,
                    ) from None
                log.info("rediskit: %s not sent: duplicate of %s", self.name, existing)
                res = self.AsyncResult(existing)
                res.rediskit_duplicate = True
                return res
        else:
            raise TaskLocked(
                f"{self.name}[{task_id}] was not sent: its queued-scope claim {qname!r} was "
                f"taken and released by others {CLAIM_ATTEMPTS} times while it tried to take "
                f"it or see who holds it; send it again", qname,
            )
        if given:
            storage.extend(qname, owner, ttl, add=False)  # a re-send (retry) of the holder
        if wrap is None:
            call(rt.client, *record)
        try:
            return super().apply_async(args, kwargs, task_id, **options)
        except BaseException:
            storage.release(qname, owner)
            raise

    def _rk_cached_result(self, task_id: str, value: Any, options: Mapping[str, Any]) -> Any:
        """The result of a call served from the cache at send time: stored in the result
        backend under ``task_id`` (as a worker would store it), so that anyone asking for
        ``AsyncResult(task_id)`` later finds it, and returned ready."""
        ignore = options.get("ignore_result")
        if not (self.ignore_result if ignore is None else ignore):
            self.backend.store_result(task_id, value, states.SUCCESS)
        named = {"name": self.name} if _eager_result_takes_name() else {}
        return EagerResult(task_id, value, states.SUCCESS, **named)

    def invalidate(self, *args: Any, **kwargs: Any) -> bool:
        """Drop the cached result of the call ``task(*args, **kwargs)``; True if one existed."""
        policy = self._rk_policy
        if policy.cache_ttl is None:
            raise ConfigurationError(f"task {self.name} has no cache_ttl: nothing to invalidate")
        arguments = policy.bind(args, kwargs)
        name = policy.cache_name(self.name, arguments, args, kwargs)
        return bool(self._rk_kit().runtime().cache.delete(name))


class SingletonTask(RedisKitTask):
    """Base class of singleton tasks: ``@app.task(base=SingletonTask)``.

    Same as ``@app.task(singleton=True)`` on an app with ``RedisKit(app)``.
    """

    singleton: ClassVar[bool] = True
