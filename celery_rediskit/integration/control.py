"""Operations on an app's locks: the lock report and the ``rediskit_leases`` inspect command.

- :func:`lock_report` is the Python API behind ``celery rediskit locks``: every held lock and
  semaphore under the app's prefix, and the active rate limiters with their budgets (read
  from Redis with SCAN, no worker needed), each holder
  described with the task that holds it (task id and name, worker, pid, since when) and,
  unless ``ping=False``, marked stale when its worker does not answer a ping.
- ``celery inspect rediskit_leases`` (:func:`rediskit_leases`): each worker answers with the
  leases it holds now and when each was last renewed. :func:`register` registers the
  command; ``RedisKit(app)`` and the ``celery rediskit`` CLI plugin both call it, so it is
  known to workers and to the ``celery`` command line (which refuses unknown names; on Celery
  before 5.4 it also adds the name to that command line's list of choices).

Task metadata comes from the claims records (``claims.py``): a running task's record lists
the owner ids of its leases and a holder line written in the same SET. A lease whose owner is
in no record (a plain ``Mutex`` used outside a task, a cache fill lock) is reported with what
its owner id says (host, pid).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import click
from celery.worker import state as worker_state
from celery.worker.control import inspect_command

from .._redis.scripts import call_many
from ..lease import Lease, LeaseKind
from ..parking import RedisParkingStore
from ..ratelimit import RateInfo
from ..renewal import renewer
from .claims import parse_record
from .parking import parked_tasks
from .runtime import APP_ATTRIBUTE, Kit, kit_of

if TYPE_CHECKING:
    from ..report import Holder, Resource

__all__ = ["LockReport", "lock_report", "rediskit_leases", "worker_leases"]

log = logging.getLogger("celery_rediskit")

_GET_BATCH = 500


@dataclass(frozen=True)
class LockReport:
    """The result of :func:`lock_report`.

    ``resources``: the held locks and semaphores. ``workers_checked``: the workers pinged
    (node names; empty when no holder named one, or ``ping=False``). ``workers_alive``: those
    that answered. ``ping_error``: why the ping could not be sent, if it failed (then no holder
    is marked stale). ``rate_limiters``: the active rate limiters (``RateInfo``: rate, burst,
    budget ``remaining``, ``next_free`` and ``full_in`` seconds).
    """

    resources: list[Resource]
    workers_checked: list[str] = field(default_factory=list)
    workers_alive: list[str] = field(default_factory=list)
    ping_error: str | None = None
    rate_limiters: list[RateInfo] = field(default_factory=list)

    @property
    def stale(self) -> list[Resource]:
        """The resources with at least one stale holder."""
        return [r for r in self.resources if r.stale]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["resources"] = [r.to_dict() for r in self.resources]
        return data


def _holders_by_owner(client: Any, prefix: str) -> dict[str, tuple[str, dict[str, Any] | None]]:
    """owner id → (task id, holder line) from every claims record under ``prefix``."""
    from ..report import glob_escape, scan_keys  # the report modules: loaded when reporting

    head = f"{prefix}:claims:"
    keys = list(dict.fromkeys(scan_keys(client, glob_escape(head) + "*")))
    found: dict[str, tuple[str, dict[str, Any] | None]] = {}
    for start in range(0, len(keys), _GET_BATCH):
        chunk = keys[start:start + _GET_BATCH]
        for key, raw in zip(chunk, call_many(client, *(("GET", k) for k in chunk)),
                            strict=True):
            if not raw or isinstance(raw, Exception):
                continue
            records, meta = parse_record(raw)
            task_id = key[len(head):]
            for _kind, _key, owner in records:
                found[owner] = (task_id, meta)
    return found


def describe_holders(client: Any, prefix: str, resources: list[Resource]) -> list[Resource]:
    """``resources`` with each holder's task id, task name, worker, pid and since filled in
    from the claims records (one SCAN of ``<prefix>:claims:*`` when anything is held)."""
    if not any(r.holders for r in resources):
        return resources
    owners = _holders_by_owner(client, prefix)

    def describe(h: Holder) -> Holder:
        task_id, meta = owners.get(h.owner, (None, None))
        if task_id is None and h.owner.startswith("q:"):
            task_id = h.owner[2:]  # a queued-scope claim whose message still waits
        if meta is None:
            return replace(h, task_id=task_id) if task_id else h
        queued = h.owner.startswith("q:")
        return replace(
            h, task_id=task_id, task_name=meta["task_name"], worker=meta["worker"],
            pid=h.pid if queued or h.pid is not None else meta["pid"], since=meta["since"],
        )

    return [replace(r, holders=tuple(describe(h) for h in r.holders)) for r in resources]


def mark_stale(app: Any, resources: list[Resource],
               timeout: float = 1.0) -> tuple[list[Resource], LockReport]:
    """Ping the workers named by holders; mark holders of workers that don't answer stale.

    Only the named workers are pinged, and the ping returns as soon as all of them answered
    (otherwise after ``timeout`` seconds). Holders with no known worker (a queued message, a
    lock taken outside a task) keep ``stale=None``.
    """
    workers = sorted({h.worker for r in resources for h in r.holders if h.worker})
    if not workers:
        return resources, LockReport(resources)
    try:
        replies = app.control.ping(destination=workers, timeout=timeout, limit=len(workers))
    except Exception as exc:  # broker unreachable: say so, mark nothing
        return resources, LockReport(resources, workers, [], f"{type(exc).__name__}: {exc}")
    alive = {name for reply in replies or () for name in reply}

    def mark(h: Holder) -> Holder:
        return replace(h, stale=h.worker not in alive) if h.worker else h

    marked = [replace(r, holders=tuple(mark(h) for h in r.holders)) for r in resources]
    return marked, LockReport(marked, workers, sorted(alive & set(workers)))


def lock_report(
    app: Any,
    pattern: str = "*",
    *,
    ping: bool = True,
    ping_timeout: float = 1.0,
    include_idle: bool = False,
    kinds: Iterable[LeaseKind | str] = (LeaseKind.MUTEX, LeaseKind.SEMAPHORE),
    client: Any = None,
    rates: bool = True,
) -> LockReport:
    """Who holds what under the app's prefix (``rediskit_prefix``): a :class:`LockReport`.

    ``pattern`` is a glob over resource names. ``include_idle`` also lists semaphores with no
    permit held. With ``ping`` (default), the workers named by holders are pinged (at most
    ``ping_timeout`` seconds) and holders whose worker does not answer are marked stale.
    ``client`` defaults to the app's own Redis client. With ``rates`` (default), the active
    rate limiters whose name matches ``pattern`` are in ``rate_limiters`` (each with its
    rate, budget left and next free slot). Reads Redis directly: works with no worker
    running. Raises redis-py's errors when Redis can't be reached.
    """
    from ..report import (  # loaded when reporting, not with the integration
        read_rate_limiters,
        read_resources,
    )

    kit = kit_of(app)
    client = client if client is not None else kit.runtime().client
    prefix = kit.settings.prefix
    resources = read_resources(client, prefix, pattern, kinds=kinds, include_idle=include_idle)
    resources = describe_holders(client, prefix, resources)
    resources = with_parked(kit, client, resources)
    limiters = read_rate_limiters(client, prefix, pattern) if rates else []
    if not ping:
        return LockReport(resources, rate_limiters=limiters)
    return replace(mark_stale(app, resources, ping_timeout)[1], rate_limiters=limiters)


def with_parked(kit: Kit, client: Any, resources: list[Resource]) -> list[Resource]:
    """``resources`` with their parked counts (parked and being re-sent), one round trip."""
    if not resources:
        return resources
    s = kit.settings
    store = RedisParkingStore(client, s.prefix, idle_ttl=s.idle_ttl)
    counts = store.counts([(str(r.kind), r.key) for r in resources])
    return [replace(r, parked=a + b) if a + b else r
            for r, (a, b) in zip(resources, counts, strict=True)]


# -- the inspect command ---------------------------------------------------------------------

def worker_leases(kit: Kit) -> list[dict[str, Any]]:
    """The leases held now by this worker's processes, as plain dicts (JSON-ready).

    Leases of this process come from its renewer (``last_renewed`` exactly). Tasks running in
    other processes of the worker (prefork children) are found by their task ids among the
    worker's active requests, and their leases read from Redis: a renewal sets the lease to its
    full length, so it was last renewed ``lease - remaining`` seconds ago.
    """
    now, mono = time.time(), time.monotonic()
    rt = kit.runtime()
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    me = os.getpid()
    for lease in renewer().held():
        if not isinstance(lease, Lease):
            continue
        task, task_id = rt.owners.get(lease.owner, (None, None))
        ago = max(0.0, mono - lease.last_renewed)
        seen.add(lease.owner)
        out.append({
            "key": lease.key, "kind": lease.kind.grant, "owner": lease.owner,
            "task_id": task_id, "task_name": getattr(task, "name", None), "pid": me,
            "fencing_token": getattr(lease, "fencing_token", None),
            "lease": lease.lease_seconds, "remaining": max(0.0, lease.lease_seconds - ago),
            "last_renewed": now - ago, "last_renewed_ago": ago,
        })
    others = [r for r in list(worker_state.active_requests)
              if r.worker_pid is not None and r.worker_pid != me]
    if not others:
        return out
    replies = call_many(rt.client, *(("GET", rt.claims.key(r.id)) for r in others))
    seconds = rt.settings.lease
    for request, raw in zip(others, replies, strict=True):
        if not raw or isinstance(raw, Exception):
            continue
        records, meta = parse_record(raw)
        for code, key, owner in records:
            if owner in seen:
                continue
            seen.add(owner)
            token: int | None = None
            remaining: float
            if code == LeaseKind.MUTEX:
                info = rt.mutex_storage.get_lock_info(key)
                remaining = info.ttl if info.holder == owner else 0.0
                token = info.fencing_token
            elif code == LeaseKind.SEMAPHORE:
                remaining = rt.semaphore_storage.holder_ttl(key, owner)
            else:
                continue
            if remaining <= 0:
                continue  # released, or not taken by this run
            since: float | None = seconds - remaining if remaining <= seconds else None
            out.append({
                "key": key, "kind": LeaseKind(code).grant, "owner": owner, "task_id": request.id,
                "task_name": request.name,
                "pid": (meta or {}).get("pid") or request.worker_pid,
                "fencing_token": token, "lease": seconds, "remaining": remaining,
                "last_renewed": None if since is None else now - since,
                "last_renewed_ago": since,
            })
    return out


def rediskit_leases(state: Any, **kwargs: Any) -> list[dict[str, Any]]:
    """The rediskit leases this worker holds now and when each was last renewed."""
    app = state.consumer.app
    kit: Kit | None = getattr(app, APP_ATTRIBUTE, None)
    if kit is None:
        return []
    try:
        return worker_leases(kit)
    except Exception as exc:
        log.exception("rediskit: rediskit_leases failed")
        return [{"error": f"{type(exc).__name__}: {exc}"}]


def rediskit_parked(state: Any, **kwargs: Any) -> list[dict[str, Any]]:
    """The tasks parked under the app's prefix (read from Redis: every worker answers the
    same list), oldest turn first per resource."""
    app = state.consumer.app
    if getattr(app, APP_ATTRIBUTE, None) is None:
        return []
    try:
        return parked_tasks(app)
    except Exception as exc:
        log.exception("rediskit: rediskit_parked failed")
        return [{"error": f"{type(exc).__name__}: {exc}"}]


def _offer_to_inspect_cli(name: str) -> None:
    """Let ``celery inspect`` of Celery before 5.4 accept ``name``.

    Those versions fix the command's choices when ``celery.bin.control`` is imported, which is
    before the ``celery.commands`` plugins (such as ours, which imports this module) load.
    Celery 5.4+ looks the name up when the command runs: nothing to do there.
    """
    module = sys.modules.get("celery.bin.control")
    if module is None:
        return  # not the celery CLI, or one whose choices are yet to be built (and include it)
    for param in getattr(getattr(module, "inspect", None), "params", ()):
        choice = getattr(param, "type", None)
        if isinstance(choice, click.Choice) and name not in choice.choices:
            choice.choices = (*choice.choices, name)



def register() -> None:
    """Register ``rediskit_leases`` and ``rediskit_parked`` as ``celery inspect`` commands
    (in this process)."""
    inspect_command(default_timeout=1.0)(rediskit_leases)
    _offer_to_inspect_cli("rediskit_leases")
    inspect_command(default_timeout=1.0)(rediskit_parked)
    _offer_to_inspect_cli("rediskit_parked")
