"""Signals of the integration: what happens to tasks, leases and cached results.

Each is a Celery :class:`~celery.utils.dispatch.Signal`: ``lease_acquired.connect(handler)``
(``weak=False`` for a handler defined inside a function). ``sender`` is the task (the task
object, as Celery's own task signals send it; None where no task is known). Every handler
also receives ``signal`` and must take ``**kwargs``: later versions may add arguments.

They are sent in the process where the thing happens: a prefork child for what happens
around a task's run, the sending process for what ``apply_async`` decides, the renewer
thread for ``lease_lost``. Nothing is built or sent while a signal has no receivers, so an
unwatched signal costs one attribute test.

Common arguments (seconds are floats):

- ``task_id``: the id of the task concerned.
- ``key``: the resource name in Redis (what ``celery rediskit locks`` lists), e.g.
  ``tenant:42`` or ``singleton:proj.tasks.sync:<digest>``.
- ``name``: the resource name as declared, the same for every call of the task: the
  template of a ``concurrency_limit`` (``tenant:{tenant_id}``), ``singleton:<task name>``
  for a singleton lock, ``queued:singleton:<task name>`` for a queued-scope claim. Bounded,
  so fit for metric labels (:mod:`celery_rediskit.integration.naming`).
- ``kind``: ``"lock"`` or ``"semaphore"``.
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

__all__ = [
    "acquire_timeout",
    "cache_hit",
    "cache_miss",
    "lease_acquired",
    "lease_lost",
    "lease_released",
    "task_duplicate",
    "task_parked",
    "task_requeued",
    "task_skipped",
]

task_skipped = Signal(name="rediskit_task_skipped")
"""A run ended without running the body (``on_locked="skip"``, or a queued-scope duplicate
met in the worker); it finishes SUCCESS with the result None. In the process that ran it.

``reason``: ``"locked"`` (its singleton lock is held) or ``"duplicate"`` (another message
of the same call holds its queued-scope claim). ``key``/``name``: the lock or claim.
``holder``: the owner id holding the lock, or the task id holding the claim (None if it was
released meanwhile)."""

task_requeued = Signal(name="rediskit_task_requeued")
"""A run met its lock held (``on_locked="retry"``) or its limit full (``on_limited="retry"``)
or its global rate limit spent (``on_rate_limited="retry"``), and the task was sent again,
keeping its id, to run in ``countdown`` seconds (the backoff, or exactly the wait for the
rate slot).

``reason``: ``"locked"``, ``"limited"`` or ``"rate_limited"``. ``key``/``name``: the lock,
semaphore or (first) rate limiter met.
``requeues``: how many times this message had been re-queued before (0 for the first)."""

task_parked = Signal(name="rediskit_task_parked")
"""A run met its lock held (``on_locked="park"``) or its limit full (``on_limited="park"``)
and its message was parked in Redis, to be re-sent when its turn comes (see the README's
"Parked tasks"). In the process that ran it.

``reason``: ``"locked"`` or ``"limited"``. ``key``/``name``: the lock or semaphore it waits
for. ``turn``: Unix time (seconds) it first parked, None for a first park (now)."""

task_duplicate = Signal(name="rediskit_task_duplicate")
"""A ``singleton_scope="queued"`` call found another message of the same call queued or
running (its claim held).

``where="send"``: in ``apply_async``, which then sends nothing (it returns the existing
task's result, or raises ``TaskDuplicated``); ``task_id`` is the id the call would have had.
``where="run"``: in the worker, a duplicate message that got past the check (sent before the
claim existed, or redelivered); it is skipped (``task_skipped`` follows), raises
``TaskLocked`` (``on_locked="raise"``), or is dropped when its own id is already running.
``existing``: the task id holding the claim (None if unknown). ``key``/``name``: the claim."""

cache_hit = Signal(name="rediskit_cache_hit")
"""A call of a task with ``cache_ttl`` found its result cached. ``key``: the cache entry's
name. ``where``: ``"send"`` (``apply_async`` returned the cached result: no message was
sent; ``task_id`` is the id of the result it made) or ``"run"`` (the worker returned it
without running the body). A miss at send time has ``task_id`` None unless the caller
chose the id (it is made after the lookup)."""

cache_miss = Signal(name="rediskit_cache_miss")
"""A call of a task with ``cache_ttl`` found no cached result (or Redis could not be read,
which counts as a miss). Same arguments as ``cache_hit``. A call that misses when it is sent
misses again when the worker runs it (each lookup is one signal)."""

lease_acquired = Signal(name="rediskit_lease_acquired")
"""A task got a lock or permit before running its body. ``lease``: the
:class:`~celery_rediskit.lease.Lease`. ``wait``: seconds from this run's first attempt at it
to the grant (one round trip when it was free; the blocking wait of
``on_limited="wait"``). Time spent re-queued before this run is not included (see
``task_requeued``)."""

lease_released = Signal(name="rediskit_lease_released")
"""A task gave back a lock or permit it had got (body done, failed, retried, or re-queued
for the next limit). ``held``: seconds from the grant to the release. ``lost``: True when
the lease had been lost meanwhile (``lease_lost`` was sent); it then ended earlier.
Not sent for what the worker's main process releases by task id after a revoke, a hard time
limit or a killed child."""

acquire_timeout = Signal(name="rediskit_acquire_timeout")
"""A blocking wait for a permit (``on_limited="wait"``), or of a map/starmap item for its
lock, ran out of time (``limit_timeout``); the task then fails with ``LockTimeout``.
``wait``: seconds waited."""

lease_lost = Signal(name="rediskit_lease_lost")
"""Sent from the renewer thread when a running task's lock or permit is found gone.

Handlers receive ``sender`` (the task; None for a queued-scope claim), ``task_id``, ``lease``
(its ``lost_reason`` says why), ``reason``, and ``kind``, ``key``, ``name``. The task also
sees ``self.lease.lost`` turn True, and a warning is logged.
"""
