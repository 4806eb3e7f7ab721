"""The wait loop shared by the Redis mutex and semaphore: queue in Redis, sleep until woken.

A caller's first attempt already joins the queue (once its process is subscribed to its wake
channel), so a contended acquisition costs this attempt, and the release that hands it over.
Each sleep is bounded by the holder's remaining lease and by the caller's deadline: a lost
wake-up or a crashed holder costs at most one bounded wait before the caller asks again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from threading import Event
from typing import Any

from ..errors import AcquireAborted, LockTimeout
from .scripts import LuaScript
from .wakeup import WaitSlot, WakeupHub, drop_slot, hub_for, register_slot

__all__ = ["WAITER_GRACE_MS", "acquire_queued", "wait_for_grant"]

log = logging.getLogger(__name__)

WAITER_GRACE_MS = 2000  # how long a queued waiter stays live past its bounded wait (ms)
_MARGIN = 0.005  # seconds added to a lease-bounded wait so the lease has surely ended


def acquire_queued(
    kind: str,
    key: str,
    owner: str,
    client: Any,
    script: LuaScript,
    keys: list[str],
    argv: list[Any],
    cancel: Callable[[str, str, bool], int],
    channel_prefix: str,
    timeout: float | None,
    abort: Event | None,
) -> int:
    """Run an acquire ``script`` until granted; ``argv[2]`` is its "join the queue" flag.

    The script returns a token (>= 1) when granted, else ``-1 - bound_ms``. ``timeout`` 0
    means one attempt without queueing (``LockTimeout`` if not granted). ``cancel(key, owner,
    keep)`` leaves the queue (see :func:`wait_for_grant`).
    """
    hub = hub_for(client)
    # Once this process listens for grants, the first attempt already joins the queue (the
    # slot must exist before the script runs, or an instant grant could be missed).
    slot = register_slot(owner) if timeout != 0 and hub.ready(channel_prefix) else None
    argv[2] = "1" if slot is not None else "0"
    try:
        first = int(script.run(client, keys, argv))  # positional arguments: this is hot
    except BaseException:
        # Interrupted, or the reply was lost: the script may have queued the caller or granted
        # it the key. Leave no trace either way.
        if slot is not None:
            drop_slot(owner)
        _leave_quietly(lambda: cancel(key, owner, False), kind, key)
        raise
    if first >= 1:
        if slot is not None:
            drop_slot(owner)
        return first
    if timeout == 0:
        raise LockTimeout(f"{kind} {key!r} is not available", key)
    if slot is None:
        hub.ensure(channel_prefix)  # first contention in this process: subscribe, then queue

    def attempt(join: bool) -> int:
        argv[2] = "1" if join else "0"
        return int(script.run(client, keys, argv))

    return wait_for_grant(
        kind=kind, key=key, owner=owner, attempt=attempt,
        cancel=lambda keep: cancel(key, owner, keep),
        timeout=timeout, abort=abort, hub=hub, slot=slot, first=first if slot else None,
    )


def wait_for_grant(
    *,
    kind: str,
    key: str,
    owner: str,
    attempt: Callable[[bool], int],
    cancel: Callable[[bool], int],
    timeout: float | None,
    abort: Event | None,
    hub: WakeupHub,
    slot: WaitSlot | None = None,
    first: int | None = None,
) -> int:
    """Acquire by calling ``attempt(join_queue)`` until it returns a token (>= 1).

    ``attempt`` returns a token, or ``-1 - bound_ms`` (the holder's remaining lease) when not
    granted. ``cancel(keep)`` leaves the queue; with ``keep``
    it returns a token if a grant raced the give-up (then the caller keeps it).
    ``slot`` and ``first`` carry a first attempt the caller already made (joined to the queue
    when ``slot`` is given), so the uncontended path stays in the caller.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    if slot is None:
        slot = register_slot(owner)
        first = None
    try:
        result = attempt(True) if first is None else first
        while True:
            if result >= 1:
                return result
            if slot.token is not None:
                return slot.token
            bound = (-1 - result) / 1000 + _MARGIN
            wait = bound if deadline is None else min(bound, deadline - time.monotonic())
            if wait <= 0:
                return _give_up(kind, key, timeout, cancel)
            slot.recheck = False
            hub.wait(slot, wait, abort)
            if slot.token is not None:
                return slot.token
            if abort is not None and abort.is_set():
                cancel(False)
                raise AcquireAborted(f"waiting for {kind} {key!r} was aborted", key)
            result = attempt(True)  # bound reached or asked to recheck: ask Redis again
    except (LockTimeout, AcquireAborted):
        raise  # the caller has left the queue already
    except BaseException:
        # Anything else ends the wait (KeyboardInterrupt, SystemExit, a soft time limit, an
        # exception thrown into the thread, a Redis error): leave the queue, or give back a
        # grant made meanwhile, so the next release goes to a live waiter.
        _leave_quietly(lambda: cancel(False), kind, key)
        raise
    finally:
        drop_slot(owner)


def _give_up(kind: str, key: str, timeout: float | None, cancel: Callable[[bool], int]) -> int:
    token = cancel(True)
    if token >= 1:
        return token  # granted in the same instant: keep it rather than waste the handoff
    raise LockTimeout(f"could not acquire {kind} {key!r} within {timeout} s", key)


def _leave_quietly(leave: Callable[[], object], kind: str, key: str) -> None:
    """Run ``leave`` (cancel without keeping a grant) on the way out of a failed wait; its own
    failure is logged, not raised, so the exception that ended the wait is the one seen. If it
    fails, the entry still drops out of the queue by itself once its deadline passes."""
    try:
        leave()
    except BaseException as exc:  # the exception that ended the wait matters more
        log.warning("rediskit: could not leave the queue of %s %r: %r", kind, key, exc)
