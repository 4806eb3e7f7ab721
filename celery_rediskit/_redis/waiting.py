"""The wait loop shared by the Redis mutex and semaphore: queue in Redis, sleep until woken.

A caller's first attempt already joins the queue (once its process is subscribed to its wake
channel), so a contended acquisition costs this attempt, and the release that hands it over.

Failure model:

- A wake-up message can be lost (see ``wakeup.py``). Every sleep is therefore bounded by the
  holder's remaining lease, the caller's deadline, and a short re-check interval (at most
  ``RECHECK_MAX`` seconds, or lease / 3 if smaller) after which the waiter asks Redis again:
  a lost wake-up costs at most one such interval. This is a safety net, not polling: a
  waiter is woken by its grant as soon as it arrives.
- A grant is returned as a :class:`~celery_rediskit.lease.Grant`: its lease counts from when
  the request that made it was sent (the attempt's check-in; for a grant by a release, the
  check-in the grant message names by number, plus how long after it the message says the
  grant was made), never from when the reply or message arrived, so a holder never counts on
  more lease than the server gives, even from a message held up past later check-ins.
- A grant learned late would come with its lease partly spent. Asking Redis again renews a
  grant already made to the caller to its full lease (the acquire scripts' "already granted"
  path): a grant that reaches the waiter more than ``min(FRESH_MAX, deadline_margin(lease) /
  2)`` after its request was sent is asked for again (one round trip) before returning. After
  ``LATE_REPLIES`` late replies in a row it is returned if at least half its lease is left
  (counted from its request), else asked for again within the caller's timeout. The prompt
  hand-off, the common case, costs nothing more.
- Any way out of a wait other than a grant (timeout, abort, KeyboardInterrupt, SystemExit,
  a soft time limit, an exception thrown into the thread, a Redis error) leaves the queue in
  Redis, or gives back a grant made meanwhile, so the next release goes to a live waiter.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from threading import Event
from typing import TYPE_CHECKING, Any

from ..errors import AcquireAborted, LockTimeout
from ..lease import Grant
from ..renewal import deadline_margin, lease_deadline
from .scripts import LuaScript

if TYPE_CHECKING:
    from types import ModuleType

    from .wakeup import WaitSlot, WakeupHub

_wakeup: ModuleType | None = None


def wakeup() -> ModuleType:
    """The wake-up module (``wakeup.py``), imported at the first wait or local hand-over, not
    with the storages: a process that never waits (a worker running singleton tasks) never
    loads its hubs."""
    global _wakeup
    if _wakeup is None:
        from . import wakeup as module

        _wakeup = module
    return _wakeup

__all__ = [
    "FRESH_MAX", "RECHECK_MAX", "WAITER_GRACE_MS", "acquire_queued", "wait_for_grant", "wakeup",
]

log = logging.getLogger(__name__)

WAITER_GRACE_MS = 2000  # how long a queued waiter stays live past its bounded wait (ms)
RECHECK_MAX = 2.0
"""Seconds: the longest a waiter sleeps before asking Redis again (lease / 3 if smaller)."""
FRESH_MAX = 0.05
"""Seconds: a grant learned later than this (or half the renewer's deadline margin, if
smaller) is renewed before acquire returns it."""
LATE_REPLIES = 3
"""How many times in a row a grant that arrived late is asked for again before it is taken
with what is left of its lease, if that is at least half of it (a machine that answers this
slowly all the time still gets its grants; the renewer counts them from their requests)."""


def fresh_for(lease: float) -> float:
    """Seconds within which a grant must reach the caller to be returned as it is: FRESH_MAX,
    or half the renewer's deadline margin for ``lease`` if smaller."""
    return min(FRESH_MAX, deadline_margin(lease) / 2)


def _takeable(since: float, lease: float, late_replies: int) -> bool:
    """Whether a grant whose request was sent at ``since`` (``time.monotonic()``) may be
    returned now: it is fresh, or it came late ``LATE_REPLIES`` times in a row and still has
    half its lease."""
    now = time.monotonic()
    if now - since <= fresh_for(lease):
        return True
    return late_replies >= LATE_REPLIES and lease_deadline(since, lease) - now >= lease / 2


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
    lease: float,
) -> Grant:
    """Run an acquire ``script`` until granted; ``argv[2]`` is its check-in number ("0": just
    try, without joining the queue).

    The script returns a token (>= 1) when granted, else ``-1 - bound_ms``. ``timeout`` 0
    means one attempt without queueing (``LockTimeout`` if not granted). ``cancel(key, owner,
    keep)`` leaves the queue (see :func:`wait_for_grant`); ``lease`` is the lease asked for
    (seconds).
    """
    w = _wakeup or wakeup()
    hub = w.hub_for(client)
    # Once this process listens for grants, the first attempt already joins the queue (the
    # slot must exist before the script runs, or an instant grant could be missed).
    slot = w.register_slot(owner) if timeout != 0 and hub.ready(channel_prefix) else None
    argv[2] = "1" if slot is not None else "0"  # check-in number 1, or just a try
    generation = hub.generation
    checked_in = time.monotonic()
    try:
        first = int(script.run(client, keys, argv))  # positional arguments: this is hot
    except BaseException:
        # Interrupted, or the reply was lost: the script may have queued the caller or granted
        # it the key. Leave no trace either way.
        if slot is not None:
            w.drop_slot(owner)
        _leave_quietly(lambda: cancel(key, owner, False), kind, key)
        raise
    if first >= 1 and _takeable(checked_in, lease, 0):
        if slot is not None:
            w.drop_slot(owner)
        return Grant(first, checked_in)
    if timeout == 0:
        late_replies = 0
        while first >= 1 and not _takeable(checked_in, lease, late_replies):
            # The reply came late (a stalled server, or this process was paused after Redis
            # granted): the grant may be partly spent or gone. Asking again renews it to its
            # full lease, or tells us it ended.
            if late_replies >= LATE_REPLIES:
                _leave_quietly(lambda: cancel(key, owner, False), kind, key)
                raise LockTimeout(f"{kind} {key!r}: every grant came too late to hold", key)
            late_replies += 1
            checked_in = time.monotonic()
            first = int(script.run(client, keys, argv))
        if first >= 1:
            return Grant(first, checked_in)
        raise LockTimeout(f"{kind} {key!r} is not available", key)
    if slot is None:
        hub.ensure(channel_prefix)  # first contention in this process: subscribe, then queue

    def attempt(checkin: int) -> int:
        argv[2] = str(checkin)
        return int(script.run(client, keys, argv))

    # Not granted, or granted late (wait_for_grant asks again, within the timeout).
    return wait_for_grant(
        kind=kind, key=key, owner=owner, attempt=attempt,
        cancel=lambda keep: cancel(key, owner, keep),
        timeout=timeout, abort=abort, hub=hub, lease=lease, slot=slot,
        first=(first, checked_in, generation) if slot else None,
    )


def wait_for_grant(
    *,
    kind: str,
    key: str,
    owner: str,
    attempt: Callable[[int], int],
    cancel: Callable[[bool], int],
    timeout: float | None,
    abort: Event | None,
    hub: WakeupHub,
    lease: float,
    slot: WaitSlot | None = None,
    first: tuple[int, float, int] | None = None,
) -> Grant:
    """Acquire by calling ``attempt(checkin)`` until it returns a token (>= 1); return it as a
    :class:`Grant` dated from the request that made it.

    ``checkin`` numbers the caller's attempts from 1 (0: try without joining the queue); a
    grant message names the check-in it is dated from. ``attempt`` returns a token, or
    ``-1 - bound_ms`` (the holder's remaining lease) when not granted; called for a key
    already granted to the caller, it renews the grant to the full ``lease`` (seconds).
    ``cancel(keep)`` leaves the queue; with ``keep`` it returns a token if a grant raced the
    give-up (then the caller keeps it); without, it gives such a grant back. ``slot`` and
    ``first`` carry a first attempt the caller already made (check-in number 1, joined to the
    queue when ``slot`` is given): its result, ``time.monotonic()`` just before it was sent,
    and ``hub.generation`` then; so the uncontended path stays in the caller.
    """
    w = _wakeup or wakeup()
    deadline = None if timeout is None else time.monotonic() + timeout
    recheck = min(RECHECK_MAX, lease / 3)
    fresh = fresh_for(lease)
    if slot is None:
        slot = w.register_slot(owner)
        first = None
    try:
        if first is None:
            generation = hub.generation
            checked_in = time.monotonic()
            sent_at = [checked_in]  # check-in number n was sent at sent_at[n - 1]
            result = attempt(1)
        else:
            result, checked_in, generation = first
            sent_at = [checked_in]
        late_replies = 0
        while True:
            if result >= 1:
                if _takeable(checked_in, lease, late_replies):
                    return Grant(result, checked_in)
                # The reply came late (a stalled server, or this process was paused): the
                # grant may be partly spent or gone. Asking again renews it to its full lease,
                # or queues us again if it ended meanwhile.
                late_replies += 1
                if deadline is not None and deadline <= time.monotonic():
                    return _give_up(kind, key, timeout, cancel, attempt, lease)
            elif slot.token is not None:
                # Granted by a release, `after` seconds (the server's clock) past the check-in
                # the message names: no earlier than we sent that check-in plus `after`. Not
                # necessarily our latest check-in: a message held up on its way may be about
                # a grant that ended before a later check-in reached the server. Learned much
                # later than it was made, the grant is partly spent or gone: ask again below,
                # which renews it (or, if it ended meanwhile, queues us again).
                token, after, number = slot.token, slot.after, slot.checkin
                slot.token = None
                if after is not None and number is not None and 1 <= number <= len(sent_at):
                    since = sent_at[number - 1] + after
                    if time.monotonic() - since <= fresh:
                        return Grant(token, since)
            else:
                now = time.monotonic()
                wait = min((-1 - result) / 1000 + _MARGIN, recheck)
                if deadline is not None:
                    if deadline <= now:
                        return _give_up(kind, key, timeout, cancel, attempt, lease)
                    wait = min(wait, deadline - now)
                hub.wait(slot, wait, abort, generation)
                if slot.token is not None:
                    continue
                if abort is not None and abort.is_set():
                    cancel(False)
                    raise AcquireAborted(f"waiting for {kind} {key!r} was aborted", key)
            # Bound or re-check interval reached, subscription re-established, or a late
            # grant to renew: ask Redis again.
            generation = hub.generation
            checked_in = time.monotonic()
            sent_at.append(checked_in)
            result = attempt(len(sent_at))
    except (LockTimeout, AcquireAborted):
        raise  # the caller has left the queue already
    except BaseException:
        # Anything else ends the wait (KeyboardInterrupt, SystemExit, a soft time limit, an
        # exception thrown into the thread, a Redis error): leave the queue, or give back a
        # grant made meanwhile, so the next release goes to a live waiter.
        _leave_quietly(lambda: cancel(False), kind, key)
        raise
    finally:
        w.drop_slot(owner)


def _give_up(
    kind: str,
    key: str,
    timeout: float | None,
    cancel: Callable[[bool], int],
    attempt: Callable[[int], int],
    lease: float,
) -> Grant:
    if cancel(True) >= 1:
        # Granted in the same instant, or by a release whose message was lost: keep it rather
        # than waste the handoff, renewed to its full lease (asking again without queueing).
        sent = time.monotonic()
        token = attempt(0)
        if token >= 1:
            if _takeable(sent, lease, LATE_REPLIES):
                return Grant(token, sent)
            cancel(False)  # too little of it is left to hold: give it back
    raise LockTimeout(f"could not acquire {kind} {key!r} within {timeout} s", key)


def _leave_quietly(leave: Callable[[], object], kind: str, key: str) -> None:
    """Run ``leave`` (cancel without keeping a grant) on the way out of a failed wait; its own
    failure is logged, not raised, so the exception that ended the wait is the one seen. If it
    fails, the entry still drops out of the queue by itself once its deadline passes."""
    try:
        leave()
    except BaseException as exc:  # the exception that ended the wait matters more
        log.warning("rediskit: could not leave the queue of %s %r: %r", kind, key, exc)
