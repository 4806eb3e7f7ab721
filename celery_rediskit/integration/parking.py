"""``on_locked="park"`` / ``on_limited="park"``: a blocked task waits in Redis, not in the broker.

A task that meets its lock held or a limit full stores the non-ready state ``PARKED``, puts
its message (``signature_from_request``: id, arguments, headers, routing, root/parent ids,
callbacks) into the resource's FIFO with the parking primitive (``celery_rediskit.parking``),
in one atomic acquire-or-park, and ends with ``Ignore`` (its message is acknowledged, its
worker slot is free at once). Whoever frees the resource re-sends parked messages, one per
free permit, oldest turn first, each with a reservation of the lock or permit:

- the task's own release (its call path), and the worker's main process releasing by task id
  (revoke, terminate, hard time limit, lost child);
- the sweeper (:class:`Sweeper`, one thread per worker's main process; one sweep per tick
  among all workers) for a holder whose lease expired (its process died), for releases by
  code that does not park (a plain ``Mutex``, a task with ``on_limited="wait"``), and for
  taken entries whose publisher died or whose publish failed (broker down: retried every
  :data:`~celery_rediskit.parking.PUBLISH_DEADLINE` seconds).

The re-sent message carries the header :data:`HEADER`
(``"<kind>|<dispatch id>|<turn>|<resource>"``). On arrival the task adopts its reservation; a
second copy of it (the sweeper re-sent a message whose publisher died after publishing) finds
the entry gone and is dropped.

Parked on receipt: a fresh message whose first resource is full is parked by the worker's
main process as it arrives (:func:`park_received`, called from the task's strategy in
``request.py``), the same way and in the same order, without a pool process.

Sent ahead: a run that held its resource at most ``rediskit_park_ahead_hold`` seconds
(:data:`AHEAD_HOLD` by default) also sends, at its release, the next parked messages ahead
of their turn (up to one per permit), so that each waits in a worker for the next release
instead of travelling after it: a hand-off then costs a pub/sub wake-up and the adoption,
not the publish, the delivery and the start of a task. Such a message waits at most
``rediskit_park_ahead_wait`` seconds (:data:`AHEAD_WAIT` by default), holding its worker
slot (and counting against its time limits), then ends, its entry parked at its turn as
before.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NoReturn

from celery import bootsteps
from celery.app.task import Context
from celery.exceptions import Ignore
from celery.worker.control import Panel
from kombu.utils.json import dumps as _dumps
from kombu.utils.json import loads as _loads

from .._validate import resource_key
from ..lease import Lease, LeaseKind
from ..parking import (
    AHEAD_LEFT,
    DUPLICATE,
    FREE,
    GRANTED,
    Dispatch,
    RedisParkingStore,
    reservation_owner,
)
from ..parking import (
    PARKED as PARKED_ENTRY,
)
from . import observe
from .crashpoints import crash_point
from .events import send_task_event
from .queue_front import to_front
from .runtime import APP_ATTRIBUTE, Kit, Runtime, kit_of
from .settings import PARK_AHEAD_HOLD, PARK_AHEAD_WAIT
from .signals import task_parked

__all__ = [
    "AHEAD_HOLD",
    "AHEAD_WAIT",
    "HEADER",
    "PARKED",
    "PARKED_EVENT",
    "ParkUnknown",
    "Resent",
    "Sweeper",
    "parked_tasks",
    "store_of",
]

log = logging.getLogger("celery_rediskit")

PARKED = "PARKED"
"""The state of a parked task in the result backend (not ready: ``get()`` waits for the
re-sent run), and the state monitors (``celery.events.State``, Flower) give it on its
``task-parked`` event."""

PARKED_EVENT = "task-parked"
"""The custom task event sent when a task parks (fields ``resource``, ``kind``)."""

HEADER = "rediskit_parked"
"""Message header of a re-sent parked task: ``"<kind>|<dispatch id>|<turn>|<resource>"``."""

AHEAD_HOLD = PARK_AHEAD_HOLD
"""Seconds, the default of the setting ``rediskit_park_ahead_hold``: a release sends the next
parked messages ahead when the run that released held its lock or permit at most this long
(longer runs gain little: a hand-off costs milliseconds, and the message sent ahead would
hold a worker slot as long)."""

AHEAD_WAIT = PARK_AHEAD_WAIT
"""Seconds, the default of the setting ``rediskit_park_ahead_wait``: how long a message sent
ahead waits in its worker for its turn before it gives up (its entry stays parked, and is
re-sent the usual way when its turn comes)."""

SWEEP_TICK = 1.0
"""Seconds between two sweeps (one process sweeps per tick, whichever takes the token)."""


def _json(data: Any) -> bytes:
    return str(_dumps(data)).encode()  # type: ignore[no-untyped-call]


def loads(raw: bytes) -> Any:
    """A payload back as data (kombu's JSON: datetimes, UUIDs, decimals come back)."""
    return _loads(raw)  # type: ignore[no-untyped-call]


def store_of(rt: Runtime) -> RedisParkingStore:
    """The parking store of this process's runtime (made on first use)."""
    store: RedisParkingStore | None = getattr(rt, "_rk_parking", None)
    if store is None:
        s = rt.settings
        store = RedisParkingStore(rt.client, s.prefix, idle_ttl=s.idle_ttl,
                                  wait_ttl=s.queued_ttl, seen_ttl=s.queued_ttl)
        rt._rk_parking = store  # type: ignore[attr-defined]
    return store


@dataclass(frozen=True)
class Resent:
    """What the header of a re-sent parked task says."""

    kind: str
    dispatch_id: str
    turn: int
    name: str

    @property
    def owner(self) -> str:
        return reservation_owner(self.dispatch_id)


def resent_of(request: Any) -> Resent | None:
    """The re-send header of ``request``, taken off its headers (so a retry or a later park
    of this run does not carry it), or None."""
    headers = getattr(request, "headers", None) or {}
    raw = headers.get(HEADER)
    if not raw:
        return None
    request.headers = {k: v for k, v in headers.items() if k != HEADER}
    try:
        kind, did, turn, name = str(raw).split("|", 3)
        return Resent(kind, did, int(turn), name)
    except ValueError:
        log.warning("rediskit: task %s carries a malformed %s header %r: ignored",
                    request.id, HEADER, raw)
        return None


def message_id(request: Any) -> str:
    """What tells this message apart from a later one of the same task id (a retry counts
    up ``retries``, a re-queue ``rediskit_requeues``)."""
    requeues = (getattr(request, "headers", None) or {}).get("rediskit_requeues") or 0
    return f"{request.id}:{request.retries or 0}:{requeues}"


def encode(task: Any, request: Any) -> bytes:
    """The message of the running task, as kombu's JSON (what ``publish`` sends again)."""
    data = dict(task.signature_from_request(request))
    options = dict(data.get("options") or {})
    options["headers"] = {k: v for k, v in (options.get("headers") or {}).items()
                          if k != HEADER}
    data["options"] = options
    return _json(data)


def publish(app: Any, d: Dispatch) -> bool:
    """Send parked message ``d`` again, with its task id and the re-send header."""
    sig = app.signature(loads(d.payload))
    headers = dict(sig.options.get("headers") or {})
    headers[HEADER] = f"{d.kind}|{d.dispatch_id}|{d.turn}|{d.name}"
    with app.producer_or_acquire() as producer:
        sig.apply_async(headers=headers, producer=producer)
        # it was sent before anything queued now, and its lock or permit waits for it
        to_front(producer, sig.options, d.dispatch_id)
    return True


def publish_all(app: Any, store: RedisParkingStore, dispatches: Iterable[Dispatch]) -> None:
    """Publish entries just taken (a publish that fails is left to the sweeper)."""
    # Youngest first: each goes to the front of its queue (see publish), so the oldest turn,
    # whose permit is reserved and idle until it arrives, is consumed first, and messages
    # sent ahead come after the reserved ones.
    taken = list(dispatches)[::-1]
    if taken:
        crash_point("release:after-take")
        store.publish_all(taken, lambda d: _publish_then(app, d))


def _publish_then(app: Any, d: Dispatch) -> bool:
    publish(app, d)
    crash_point("release:after-publish")
    return True


def parks(policy: Any, kind: LeaseKind | str) -> bool:
    """Whether ``policy`` parks on a resource of ``kind``."""
    if kind == LeaseKind.MUTEX:
        return bool(policy.on_locked == "park")
    return bool(policy.on_limited == "park")


def redelivered_copy(task: Any, rt: Runtime, request: Any,
                     plan: list[tuple[LeaseKind, str, int]]) -> bool:
    """A message the broker delivered again (its first delivery was not acknowledged) is a
    copy when that first delivery parked: that message waits in Redis and runs from there."""
    info = getattr(request, "delivery_info", None) or {}
    if not info.get("redelivered"):
        return False
    store = store_of(rt)
    mid = message_id(request)
    return any(store.seen(str(kind), name, mid) for kind, name, _ in plan
               if parks(task._rk_policy, kind))


def drop_copy(task: Any, rt: Runtime, request: Any, why: str) -> NoReturn:
    """End a run that must not happen (a copy of a parked or re-sent message): release
    what it took, leave the task's state and queued claim alone."""
    log.warning("rediskit: %s[%s] dropped: %s", task.name, request.id, why)
    task._rk_release_leases(rt, request)
    request.rediskit_keep = True
    raise Ignore()


def adopt(task: Any, rt: Runtime, request: Any, resent: Resent,
          before: tuple[Any, ...] | None) -> int:
    """Take over the reservation ``resent`` names: its token (>= 1), 0 when it ended (the
    task asks again with its turn); a copy is dropped (raises ``Ignore``)."""
    got = store_of(rt).adopt(resent.kind, resent.name, request.id, resent.dispatch_id,
                             rt.settings.lease, before=before,
                             wait=rt.settings.park_ahead_wait)
    if got == AHEAD_LEFT:
        log.info("rediskit: %s[%s] was sent ahead and waited %.0f s for %r: parked again "
                 "with its turn", task.name, request.id, rt.settings.park_ahead_wait,
                 resent.name)
        _end_parked(task, rt, request)
    if got < 0:
        drop_copy(task, rt, request, f"a copy of the message re-sent for {resent.name!r} "
                                     f"(dispatch {resent.dispatch_id}) ran already or runs")
    if got == 0:
        log.info("rediskit: %s[%s]: the reservation of %r ended while its message waited; "
                 "asking again with its turn", task.name, request.id, resent.name)
    return got


def park(task: Any, rt: Runtime, request: Any, kind: LeaseKind, name: str, owner: str,
         permits: int, turn: int | None) -> int:
    """Acquire-or-park ``name`` for the running task: the token when granted (a
    :class:`~celery_rediskit.lease.Grant` dated from the park's request); else the task
    parks (or is found a copy) and the run ends with ``Ignore``."""
    store = store_of(rt)
    ignore = getattr(request, "ignore_result", None)
    if not (task.ignore_result if ignore is None else ignore):
        # First: the re-sent run may finish before this one returns; PARKED must not
        # overwrite its result.
        task.backend.store_result(request.id, {"resource": name, "kind": kind.resource},
                                  PARKED, request=request)
    out = store.acquire_or_park(
        str(kind), name, request.id, owner, rt.settings.lease, permits=max(1, permits),
        payload=encode(task, request), turn=turn, message_id=message_id(request),
    )
    publish_all(task.app, store, out.dispatched)
    if out.status == GRANTED:
        return out.token
    if out.status == DUPLICATE:
        drop_copy(task, rt, request, f"its task id is parked at {name!r} already")
    crash_point("park:after-park")
    log.info("rediskit: %s[%s] parked: %s %r is %s", task.name, request.id, kind.grant, name,
             "held" if kind == LeaseKind.MUTEX else "full")
    send_task_event(task, request, PARKED_EVENT, resource=name, kind=kind.resource)
    if task_parked.receivers:
        observe.parked(task, request.id, name, kind, turn)
    _end_parked(task, rt, request)


# -- parking on receipt, in the worker's main process -----------------------------------------

def first_resource(task: Any, args: Any, kwargs: Any) -> tuple[LeaseKind, str, int] | None:
    """The first resource a fresh message of ``task`` with ``args``/``kwargs`` would take,
    as (kind, name, permits), when the worker's main process may park the message on receipt
    (:func:`park_received`); None when only the run may decide (the task takes a rate slot or
    reads its cache first, holds a queued-scope claim, or does not park on that resource)."""
    policy = task._rk_policy
    if (not policy.parks or policy.rate_limits or policy.cache_ttl is not None
            or (policy.singleton and policy.scope == "queued")):
        return None
    arguments = policy.bind(args, kwargs)
    if policy.singleton:
        if policy.on_locked != "park":
            return None
        return (LeaseKind.MUTEX,
                policy.singleton_name(task.name, arguments, args or (), kwargs or {}), 0)
    if not policy.limits or policy.on_limited != "park":
        return None
    name, permits = policy.limit_names(arguments)[0]
    return (LeaseKind.SEMAPHORE, name, permits)


def park_received(task: Any, req: Any) -> bool:
    """Park a message the worker's main process just received, before it goes to the pool,
    when its first resource (:func:`first_resource`) is full: True when the message is
    parked (or dropped as a copy) and acknowledged, and must not run; False to run it as
    usual (the run takes the resource, or parks, as for any message).

    The same park as a run's (:func:`park`), in the same order: ``PARKED`` stored first
    (asked first whether it would park, so a task that runs at once never shows it), then
    the atomic park-if-full, then the ``task-parked`` event, the acknowledgement last. It
    costs the worker's main process a few round trips and no pool process: under a backlog
    of blocked messages the pool's processes stay with the tasks that run. Not for a message
    re-sent from a parked queue (header :data:`HEADER`) nor one the broker delivered again:
    those go to the pool, which adopts the reservation or recognises the copy."""
    if HEADER in req.request_dict or req.delivery_info.get("redelivered"):
        return False
    try:
        first = first_resource(task, req.args, req.kwargs)
    except Exception:  # arguments that do not fit, a key function that fails: the run says
        return False
    if first is None:
        return False
    kit: Kit | None = getattr(task.app, APP_ATTRIBUTE, None)
    if kit is None:
        return False
    kind, name, permits = first
    name = resource_key(name)
    rt = kit.runtime()
    store = store_of(rt)
    ctx = context_of(req)
    lease = rt.settings.lease
    mid = message_id(ctx)
    if not req.ignore_result:
        asked = store.acquire_or_park(str(kind), name, req.id, "", lease,
                                      permits=max(1, permits), only_if_full=True)
        if asked.status == FREE:
            return False
        if asked.status == DUPLICATE:
            return _drop_received(task, req, name)
        task.backend.store_result(req.id, {"resource": name, "kind": kind.resource},
                                  PARKED, request=ctx)
    payload = encode(task, ctx)
    try:
        out = store.acquire_or_park(str(kind), name, req.id, "", lease,
                                    permits=max(1, permits), payload=payload, message_id=mid,
                                    only_if_full=True)
    except Exception as exc:
        raise ParkUnknown(f"parking {req.id} at {name!r} failed: it may have parked") from exc
    if out.status == FREE:
        return False  # it freed meanwhile: the run takes it (PARKED is overwritten)
    if out.status == DUPLICATE:
        return _drop_received(task, req, name)
    if out.status != PARKED_ENTRY:  # pragma: no cover - the script answers nothing else
        return False
    crash_point("park:received-after-park")
    log.info("rediskit: %s[%s] parked on receipt: %s %r is %s", task.name, req.id, kind.grant,
             name, "held" if kind == LeaseKind.MUTEX else "full")
    send_received_event(task, req, PARKED_EVENT, resource=name, kind=kind.resource)
    if task_parked.receivers:
        observe.parked(task, req.id, name, kind, None)
    req.acknowledge()
    return True


class ParkUnknown(Exception):
    """:func:`park_received` failed after sending the park: the message may be parked.

    The worker's main process then neither runs it nor acknowledges it: it gives it back to
    the broker (``reject(requeue=True)``), whose next delivery of it, marked redelivered,
    goes to the pool, where a run recognises it as a copy if it did park
    (:func:`redelivered_copy`) and runs it otherwise."""


def _drop_received(task: Any, req: Any, name: str) -> bool:
    log.warning("rediskit: %s[%s] dropped: its task id is parked at %r already", task.name,
                req.id, name)
    req.acknowledge()
    return True


def context_of(req: Any) -> Context:
    """The task context a run of the worker request ``req`` would see (what Celery's tracer
    builds in the pool process), for encoding its message and storing its state."""
    _, _, embed = req._payload
    data = {**req.request_dict, **(embed or {}), "is_eager": False}
    return Context(data, args=req.args, kwargs=req.kwargs, called_directly=False)


def send_received_event(task: Any, req: Any, event_type: str, **fields: Any) -> bool:
    """:func:`.events.send_task_event` for a message the worker's main process handles, on
    a dispatcher (and broker connection) of this process, kept for the next event; one that
    fails is dropped, and the event sent once more on a new one (so an event whose send
    reached the broker but whose reply was lost arrives twice)."""
    if not task.send_events:
        return False
    rt = kit_of(task.app).runtime()
    for attempt in (1, 2):
        held: tuple[str, Any] | None = getattr(rt, "_rk_events", None)
        try:
            if held is None or held[0] != req.hostname:
                held = (req.hostname, task.app.events.Dispatcher(
                    task.app.connection_for_write(), hostname=req.hostname, enabled=True,
                    buffer_while_offline=False))
                rt._rk_events = held  # type: ignore[attr-defined]
            held[1].send(event_type, uuid=req.id, retry=False, **fields)
            return True
        except Exception:
            rt._rk_events = None  # type: ignore[attr-defined]
            if held is not None:
                with contextlib.suppress(Exception):
                    held[1].close()
                    held[1].connection.release()
            if attempt == 2:
                log.warning("rediskit: sending the %s event of %s failed", event_type,
                            req.id, exc_info=True)
    return False


def _end_parked(task: Any, rt: Runtime, request: Any) -> NoReturn:
    """End the run of a task whose message waits parked: give back what it took, keep its
    queued claim and state."""
    task._rk_release_leases(rt, request)
    claim = getattr(request, "rediskit_claim", None)
    if claim is not None:  # queued scope: the parked message still counts as queued
        try:
            claim.storage.extend(claim.key, claim.owner, rt.settings.queued_ttl, add=False)
        except Exception:
            log.warning("rediskit: extending the queued claim of %s failed", request.id,
                        exc_info=True)
    request.rediskit_keep = True
    raise Ignore()


def after_release(task: Any, rt: Runtime, leases: Iterable[Lease],
                  held_for: float | None = None) -> None:
    """Re-send what is parked on the resources the run just gave back (and send the next
    ones ahead when it held them ``held_for`` <= ``rediskit_park_ahead_hold`` seconds)."""
    policy = task._rk_policy
    hold = rt.settings.park_ahead_hold
    dispatch(task.app, rt, [(str(lease.kind), lease.key) for lease in leases
                            if parks(policy, lease.kind)],
             ahead=held_for is not None and hold > 0 and held_for <= hold)


def dispatch(app: Any, rt: Runtime, resources: Iterable[tuple[str, str]], *,
             ahead: bool = False) -> None:
    """Re-send parked entries for the free permits of each (kind, name), and with ``ahead``
    the next ones ahead; failures are left to the sweeper."""
    store = store_of(rt)
    for kind, name in resources:
        try:
            _left, taken = store.dispatch(kind, name, rt.settings.lease, ahead=ahead)
        except Exception:
            log.warning("rediskit: re-sending what is parked at %r failed (the sweeper "
                        "does it)", name, exc_info=True)
            continue
        publish_all(app, store, taken)


# -- the worker's main process -----------------------------------------------------------------

class Sweeper:
    """One thread in a worker's main process: every :data:`SWEEP_TICK` seconds, if this
    process takes the tick's token, re-send what expired holders freed and what overdue
    taken or sent entries wait for."""

    def __init__(self, kit: Kit, tick: float = SWEEP_TICK) -> None:
        self.kit = kit
        self.tick = tick
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rediskit-park-sweeper",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(5)

    def sweep_once(self) -> int:
        rt = self.kit.runtime()
        store = store_of(rt)
        if not store.take_sweep_turn(self.tick):
            return 0
        return store.sweep(rt.settings.lease, lambda d: publish(self.kit.app, d))

    def _run(self) -> None:
        while not self._stop.wait(self.tick):
            try:
                self.sweep_once()
            except Exception:
                log.warning("rediskit: the parking sweep failed (next tick tries again)",
                            exc_info=True)


class SweeperStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker bootstep: runs the app's :class:`Sweeper` in the worker's main process while
    the worker runs, when any task of the app parks."""

    label = "rediskit park sweeper"

    def start(self, parent: Any) -> None:
        kit = getattr(parent.app, APP_ATTRIBUTE, None)
        sweeper = getattr(kit, "sweeper", None)
        if isinstance(sweeper, Sweeper) and app_parks(parent.app):
            sweeper.start()

    def stop(self, parent: Any) -> None:
        sweeper = getattr(getattr(parent.app, APP_ATTRIBUTE, None), "sweeper", None)
        if isinstance(sweeper, Sweeper):
            sweeper.stop()

    def terminate(self, parent: Any) -> None:  # a cold shutdown stops it too
        self.stop(parent)


def app_parks(app: Any) -> bool:
    """Whether any task of ``app`` parks."""
    for task in list(app.tasks.values()):
        policy = getattr(task, "_rk_policy", None)
        if policy is not None and (policy.on_locked == "park" or policy.on_limited == "park"):
            return True
    return False


def remove_revoked(app: Any, task_ids: Iterable[str]) -> list[str]:
    """Take revoked ``task_ids`` out of every parked queue; those removed end REVOKED, and
    what their reservations held is re-sent to the next in line."""
    kit: Kit | None = getattr(app, APP_ATTRIBUTE, None)
    ids = [str(t) for t in task_ids]
    if kit is None or not ids:
        return []
    rt = kit.runtime()
    store = store_of(rt)
    removed: list[str] = []
    for kind, name in store.resources():
        gone = store.remove(kind, name, ids)
        if gone:
            removed += gone
            dispatch(app, rt, [(kind, name)])
    for task_id in removed:
        log.info("rediskit: revoked task %s removed from the parked tasks", task_id)
        try:
            app.backend.mark_as_revoked(task_id, "revoked while parked")
        except Exception:
            log.warning("rediskit: storing REVOKED for %s failed", task_id, exc_info=True)
    return removed


def parked_tasks(app: Any) -> list[dict[str, Any]]:
    """Every parked (or re-sent, not yet started) task under the app's prefix, JSON-ready:
    ``task_id``, ``task_name``, ``resource``, ``kind`` ("lock"/"semaphore"), ``state``
    ("parked", "ahead": sent ahead and waiting in a worker for its turn, "taken": being
    re-sent, "sent": re-sent, not yet started), ``turn`` (Unix time it first parked,
    seconds)."""
    kit: Kit | None = getattr(app, APP_ATTRIBUTE, None)
    if kit is None:
        return []
    store = store_of(kit.runtime())
    out = []
    for kind, name in store.resources():
        for e in store.entries(kind, name):
            try:
                task_name = loads(e.payload).get("task") if e.payload else None
            except Exception:
                task_name = None
            out.append({"task_id": e.id, "task_name": task_name, "resource": name,
                        "kind": LeaseKind(kind).resource, "state": e.state,
                        "turn": e.turn / 1e6})
    return out


def install_revoke_hook() -> None:
    """Make the workers' ``revoke`` control command also take the revoked tasks out of the
    parked queues (process-wide, once; the command's own work is unchanged)."""
    original = Panel.data.get("revoke")
    if original is None or getattr(original, "_rediskit", False):
        return

    @functools.wraps(original)
    def revoke(state: Any, task_id: Any, terminate: bool = False, signal: Any = None,
               **kwargs: Any) -> Any:
        reply = original(state, task_id, terminate=terminate, signal=signal, **kwargs)
        try:
            ids = [task_id] if isinstance(task_id, str) else list(task_id or ())
            remove_revoked(state.consumer.app, ids)
        except Exception:
            log.warning("rediskit: removing revoked tasks from the parked queues failed",
                        exc_info=True)
        return reply

    revoke._rediskit = True  # type: ignore[attr-defined]
    Panel.data["revoke"] = revoke
