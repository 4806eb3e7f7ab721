"""``RedisParkingStore``: parked entries in Redis, one Lua script per step (see ``base.py``).

Keys of a lock ``K`` (base ``<prefix>:lock:{K}``) or a semaphore ``K`` (base
``<prefix>:sem:{K}``), all with the resource's hash tag, so one script sees the resource and
its entries together (``lua/_park.lua``): ``<base>:parked`` (ZSET id -> turn),
``<base>:payloads`` (HASH id -> payload), ``<base>:sent`` (HASH id -> dispatch id, state,
deadline, turn), ``<base>:seen`` (ZSET of recently parked message ids) and ``<base>:ahead``
(HASH id -> dispatch id, state, deadline, turn, waiter: entries sent ahead). They expire
``idle_ttl`` after their last write.

Sent ahead (``dispatch(..., ahead=True)``): a release of a short run also sends the next
parked entries, up to one per permit, before any permit frees; each stays parked at its turn
and its message waits in a worker (:meth:`RedisParkingStore.adopt` with ``wait``) until its
turn comes with a free permit, which reserves the permit for it and wakes it on its process's
wake channel (``_redis/wakeup.py``): the hand-off then costs a pub/sub message and the
adoption, not a publish and a delivery.

``<prefix>:parking`` indexes the resources with entries (ZSET ``"<kind>|<name>"``), so the
sweeper finds them without SCAN. It lives in a slot of its own on a Redis Cluster, so it is
written in the same round trip as a park, not in its script; a sweep drops a resource found
empty only if nobody indexed it again since it read the index (``park_unindex.lua``).
``<prefix>:parking:sweep`` is the sweepers' token: one sweep per tick among all processes.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .._redis.clients import check_client
from .._redis.keys import IDLE_TTL, KeySpace
from .._redis.scripts import as_text, call, call_many, load_script
from .._redis.slots import is_cluster, key_slot
from .._redis.waiting import wakeup
from .._validate import resource_key, to_ms
from ..durations import Duration
from ..lease import Grant, process_id
from .base import (
    AHEAD_WAITING,
    DUPLICATE,
    FREE,
    GRANTED,
    NEED_PAYLOAD,
    PARKED,
    Dispatch,
    ParkedEntry,
    ParkingStore,
    ParkOutcome,
)

__all__ = ["AHEAD_CHECK_IN", "PUBLISH_DEADLINE", "SEEN_TTL", "RedisParkingStore"]

log = logging.getLogger(__name__)

PUBLISH_DEADLINE = 5.0
"""Seconds a taken entry may stay unpublished before a sweep re-sends it (its publisher died
or the broker refused the message)."""

AHEAD_CHECK_IN = 1.0
"""Seconds between two check-ins of a message sent ahead that waits for its turn: it asks
Redis again (a wake-up lost with a dropped connection costs at most this), and a sweep counts
it gone once it missed a few (its mark is dropped: the entry is re-sent when its turn comes)."""

_AHEAD_GONE_MS = int(AHEAD_CHECK_IN * 3 * 1000)

SEEN_TTL = 3600.0
"""Seconds a parked message id is remembered (a redelivered copy of it is recognised)."""

_STATUS = {1: GRANTED, 0: PARKED, -1: DUPLICATE, -2: NEED_PAYLOAD, 2: FREE}


def _dispatches(kind: str, name: str, flat: Sequence[Any]) -> list[Dispatch]:
    out = []
    for i in range(0, len(flat) - 3, 4):
        payload = flat[i + 1]
        out.append(Dispatch(kind, name, as_text(flat[i]),
                            payload if isinstance(payload, bytes) else str(payload).encode(),
                            as_text(flat[i + 2]), int(as_text(flat[i + 3]))))
    return out


class RedisParkingStore(ParkingStore):
    """Parked entries on a redis-py client (``redis.Redis`` or ``RedisCluster``).

    ``prefix`` and ``idle_ttl`` as the mutex and semaphore storages (the same values, so the
    entries sit beside the locks and semaphores they wait for). ``wait_ttl``: seconds a
    published entry waits for its message before a sweep re-sends it (the message was lost);
    ``seen_ttl``: how long a parked message id is remembered.
    """

    def __init__(self, client: Any, prefix: str = "rediskit", *,
                 idle_ttl: Duration = IDLE_TTL, wait_ttl: float = 3600.0,
                 seen_ttl: float = SEEN_TTL, publish_deadline: float = PUBLISH_DEADLINE) -> None:
        self.client = check_client("client", client)
        self.keys = KeySpace(prefix, idle_ttl)
        self.prefix = prefix
        self._idle_ms = self.keys.idle_ms
        self._wait_ms = to_ms(wait_ttl)
        self._seen_ms = to_ms(seen_ttl)
        self._publish_ms = to_ms(publish_deadline)
        self.index_key = f"{prefix}:parking"
        self.sweep_key = f"{prefix}:parking:sweep"
        self._acquire = load_script("park_acquire")
        self._dispatch = load_script("park_dispatch")
        self._sent = load_script("park_sent")
        self._adopt = load_script("park_adopt")
        self._remove = load_script("park_remove")
        self._unindex = load_script("park_unindex")
        self._sharded = is_cluster(self.client)

    # -- keys -----------------------------------------------------------------------------
    def key_list(self, kind: str, name: str) -> list[str]:
        """KEYS of the park_* scripts for resource ``name`` of ``kind``."""
        name = resource_key(name)
        if kind == "m":
            lock = self.keys.lock(name)
            base, holders, second = lock.lock, lock.lock, lock.fence
        elif kind == "s":
            sem = self.keys.semaphore(name)
            base, holders, second = sem.holders.removesuffix(":holders"), sem.holders, sem.total
        else:
            raise ValueError(f"kind must be 'm' (lock) or 's' (semaphore), got {kind!r}")
        return [holders, second, base + ":parked", base + ":payloads", base + ":sent",
                base + ":seen", base + ":ahead"]

    def wake_prefix(self, keys: Sequence[str]) -> str:
        """The wake channel prefix of waiters on the resource of ``keys`` (its slot's on a
        Redis Cluster: sharded pub/sub)."""
        if self._sharded:
            return self.keys.sharded_wake_prefix(key_slot(keys[0]))
        return self.keys.wake_channel_prefix

    @staticmethod
    def _member(kind: str, name: str) -> str:
        return f"{kind}|{name}"

    def index_command(self, kind: str, name: str) -> tuple[Any, ...]:
        """The command that indexes ``name`` as having entries (send it after a park)."""
        return ("ZADD", self.index_key, int(time.time() * 1000), self._member(kind, name))

    @staticmethod
    def _did() -> str:
        return uuid.uuid4().hex[:16]

    # -- the steps ------------------------------------------------------------------------
    def acquire_or_park(self, kind: str, name: str, id: str, owner: str, lease: float, *,
                        permits: int = 1, payload: bytes | None = None,
                        turn: int | None = None, message_id: str | None = None,
                        only_if_full: bool = False) -> ParkOutcome:
        keys = self.key_list(kind, name)
        args = [kind, id, owner, to_ms(lease), self._idle_ms, permits,
                b"" if payload is None else payload, "" if turn is None else str(int(turn)),
                self._did(), self._publish_ms, message_id or id, self._seen_ms, self._wait_ms,
                self.wake_prefix(keys), _AHEAD_GONE_MS, "1" if only_if_full else ""]
        command = ("EVALSHA", self._acquire.sha, len(keys), *keys, *args)
        sent = time.monotonic()  # a grant's lease counts from here (lease.Grant)
        if payload is None:
            reply = self._acquire.run(self.client, keys, args, raw=True)
        else:
            # index in the same round trip, after the script (see the module doc)
            reply = self._run_then_index(command, keys, args, kind, name)
        status = _STATUS[int(reply[0])]
        token = int(reply[1])
        return ParkOutcome(status, Grant(token, sent) if status == GRANTED and token >= 1
                           else token, tuple(_dispatches(kind, name, reply[2:])))

    def _run_then_index(self, command: tuple[Any, ...], keys: list[str], args: list[Any],
                        kind: str, name: str) -> Any:
        try:
            reply, _ = call_many(self.client, command, self.index_command(kind, name))
        except (RedisConnectionError, RedisTimeoutError, OSError):
            reply = None  # unknown whether it ran: the script is safe to send again
        if isinstance(reply, NoScriptError) or reply is None:
            reply = self._acquire.run(self.client, keys, args, raw=True)
            call(self.client, *self.index_command(kind, name))
        elif isinstance(reply, Exception):
            raise reply
        return [r if not isinstance(r, str) else r.encode() for r in reply]

    def dispatch(self, kind: str, name: str, lease: float, *, permits: int = 1,
                 sweep: bool = False, ahead: bool = False) -> tuple[int, list[Dispatch]]:
        keys = self.key_list(kind, name)
        args = [kind, to_ms(lease), self._idle_ms, permits, self._did(), self._publish_ms,
                "1" if sweep else "0", "1" if ahead else "0", self._wait_ms,
                self.wake_prefix(keys), _AHEAD_GONE_MS]
        reply = self._dispatch.run(self.client, keys, args, raw=True)
        return int(reply[0]), _dispatches(kind, name, reply[1:])

    def mark_sent(self, dispatches: Sequence[Dispatch]) -> None:
        by_resource: dict[tuple[str, str], list[Dispatch]] = {}
        for d in dispatches:
            by_resource.setdefault((d.kind, d.name), []).append(d)
        for (kind, name), group in by_resource.items():
            args: list[Any] = [self._wait_ms]
            for d in group:
                args += [d.id, d.dispatch_id]
            keys = self.key_list(kind, name)
            self._sent.run(self.client, [keys[4], keys[6]], args)

    def adopt(self, kind: str, name: str, id: str, dispatch_id: str, lease: float, *,
              before: tuple[Any, ...] | None = None, wait: float = 0.0) -> int:
        keys = self.key_list(kind, name)
        waiter = f"{process_id()}:park:{dispatch_id}"
        args = [kind, id, dispatch_id, to_ms(lease), "wait" if wait > 0 else "leave", waiter,
                _AHEAD_GONE_MS]
        if wait > 0:
            # subscribed before the wait is known in Redis: a wake-up cannot come unheard
            hub = wakeup().hub_for(self.client)  # loaded here: a run that never waits loads no hub
            hub.ensure(self.wake_prefix(keys))
        sent = time.monotonic()  # a reservation adopted counts its lease from here
        if before is not None:
            got = int(self._adopt.run_after(self.client, before, keys, args))
        else:
            got = int(self._adopt.run(self.client, keys, args))
        if got != AHEAD_WAITING:
            return Grant(got, sent) if got >= 1 else got
        return self._wait_ahead(hub, keys, args, waiter, wait)

    def _wait_ahead(self, hub: Any, keys: list[str], args: list[Any], waiter: str,
                    wait: float) -> int:
        """Sent ahead: wait (woken on the wake channel, checking in every
        :data:`AHEAD_CHECK_IN` seconds) until the turn comes with a permit, at most ``wait``
        seconds; then, or on any error, give the wait up (the entry stays parked)."""
        w = wakeup()
        end = time.monotonic() + wait
        slot = w.register_slot(waiter)
        try:
            got = AHEAD_WAITING
            while got == AHEAD_WAITING:
                generation = hub.generation
                left = end - time.monotonic()
                if left <= 0:
                    args[4] = "leave"
                if slot.token is None and left > 0:
                    hub.wait(slot, min(AHEAD_CHECK_IN, left), None, generation)
                slot.token = None
                sent = time.monotonic()
                got = int(self._adopt.run(self.client, keys, args))
            return Grant(got, sent) if got >= 1 else got
        except BaseException:
            args[4] = "abandon"
            try:
                self._adopt.run(self.client, keys, args)
            except Exception:  # its mark is dropped by a sweep once its check-ins stop
                log.warning("rediskit: giving up a wait ahead failed", exc_info=True)
            raise
        finally:
            w.drop_slot(waiter)

    def remove(self, kind: str, name: str, ids: Iterable[str]) -> list[str]:
        ids = list(ids)
        if not ids:
            return []
        reply = self._remove.run(self.client, self.key_list(kind, name), [kind, *ids])
        return [as_text(r) for r in reply]

    def entries(self, kind: str, name: str) -> list[ParkedEntry]:
        keys = self.key_list(kind, name)
        ids: list[tuple[str, str, int]] = [
            (as_text(member), "parked", int(score))
            for member, score in self.client.zrange(keys[2], 0, -1, withscores=True)
        ]
        ahead = {as_text(k) for k in self.client.hkeys(keys[6])}
        ids = [(i, "ahead" if i in ahead else state, turn) for i, state, turn in ids]
        for key, value in self.client.hgetall(keys[4]).items():
            _did, state, _deadline, turn = as_text(value).split("|")
            ids.append((as_text(key), "taken" if state == "t" else "sent", int(turn)))
        if not ids:
            return []
        payloads = call(self.client, "HMGET", keys[3], *(i for i, _, _ in ids), raw=True)
        return [ParkedEntry(kind, name, i, state, turn, p)
                for (i, state, turn), p in zip(ids, payloads, strict=True)]

    def counts(self, resources: Sequence[tuple[str, str]]) -> list[tuple[int, int]]:
        if not resources:
            return []
        commands: list[tuple[Any, ...]] = []
        for kind, name in resources:
            keys = self.key_list(kind, name)
            commands += [("ZCARD", keys[2]), ("HLEN", keys[4])]
        replies = call_many(self.client, *commands)
        out = []
        for i in range(0, len(replies), 2):
            a, b = replies[i], replies[i + 1]
            out.append((0 if isinstance(a, Exception) else int(a),
                        0 if isinstance(b, Exception) else int(b)))
        return out

    def _index(self) -> list[tuple[str, str, int]]:
        out = []
        for member, score in self.client.zrange(self.index_key, 0, -1, withscores=True):
            kind, _, name = as_text(member).partition("|")
            out.append((kind, name, int(score)))
        return out

    def resources(self) -> list[tuple[str, str]]:
        return [(kind, name) for kind, name, _ in self._index()]

    def seen(self, kind: str, name: str, message_id: str) -> bool:
        key = self.key_list(kind, name)[5]
        score = call(self.client, "ZSCORE", key, message_id)
        if score is None:
            return False
        return float(as_text(score)) * 1.0 > time.time() * 1000 - self._seen_ms

    def take_sweep_turn(self, tick: float) -> bool:
        """True when this process sweeps this tick (one sweep per tick among all)."""
        token = f"{os.getpid()}"
        return bool(call(self.client, "SET", self.sweep_key, token, "NX", "PX",
                         max(1, to_ms(tick * 0.9))))

    def sweep(self, lease: float, publish: Callable[[Dispatch], bool],
              permits: int = 1) -> int:
        published = 0
        for kind, name, score in self._index():
            try:
                left, taken = self.dispatch(kind, name, lease, permits=permits, sweep=True)
            except Exception:
                log.exception("rediskit: sweeping the parked entries of %r failed", name)
                continue
            published += self.publish_all(taken, publish)
            if left == 0:
                self._unindex.run(self.client, [self.index_key],
                                  [self._member(kind, name), score])
        return published

    def publish_all(self, dispatches: Sequence[Dispatch],
                    publish: Callable[[Dispatch], bool]) -> int:
        """Publish each of ``dispatches`` with ``publish`` and mark those published; one that
        fails stays taken, and a sweep re-sends it once its deadline passes."""
        done = [d for d in dispatches if _try(publish, d)]
        if done:
            self.mark_sent(done)
        return len(done)


def _try(publish: Callable[[Dispatch], bool], d: Dispatch) -> bool:
    try:
        return bool(publish(d))
    except Exception:
        log.warning("rediskit: re-sending parked %s of %r failed (a sweep sends it again)",
                    d.id, d.name, exc_info=True)
        return False
