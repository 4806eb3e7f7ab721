"""``RedisSemaphoreStorage``: semaphores in Redis, one Lua script per operation.

Keys of semaphore ``K`` (all with hash tag ``{K}``): ``<prefix>:sem:{K}:holders`` is a sorted
set of owner ids scored by their lease end on the server's clock, ``...:total`` and
``...:initial`` the permits, ``...:queue`` / ``...:waitq`` the FIFO of waiters, and
``...:pinned`` is present while the total is one an operator set (see ``base.py``). Every
script first drops holders whose lease ended, so a crashed holder's permit comes back by itself.

Every key expires: ``total``, ``initial`` and ``holders`` ``idle_ttl / 2`` to ``idle_ttl``
after the last acquire (the next acquire then initialises the semaphore again from the permits
it declares; ``holders`` never before the last holder's lease ends), the queue with its last
waiter's deadline. ``...:released:<process id>/<thread>`` records a thread's latest release for
a few seconds, so that a release re-sent after its reply was lost answers truthfully
(``_redis/release.py``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .._redis.batch import ScriptCall
from .._redis.clients import check_client
from .._redis.keys import IDLE_TTL, KeySpace
from .._redis.release import NO_PROCESS, RECORD_MS, record_key, release_id
from .._redis.renew_batch import RedisRenewal, renewal_target
from .._redis.scripts import as_text, load_script
from .._redis.slots import is_cluster, key_slot
from .._redis.waiting import WAITER_GRACE_MS, acquire_queued, wakeup
from .._validate import positive_int, resource_key, to_ms
from ..durations import Duration
from ..errors import LockTimeout
from ..lease import Grant, Lease, process_id
from .base import SemaphoreInfo, SemaphoreStorage, note_declared

__all__ = ["RedisSemaphoreStorage"]

class RedisSemaphoreStorage(SemaphoreStorage):
    """Semaphore storage on a redis-py client (``redis.Redis`` or ``redis.RedisCluster``).

    ``prefix`` (default ``"rediskit"``) starts every key and channel this storage uses.
    ``permits`` is the total used when an admin call meets a semaphore not yet initialised.
    ``idle_ttl`` (seconds or a duration text, default a week) is how long a semaphore's
    permits outlive its last use; then it starts again from the permits an acquire declares
    (so a permit count changed by ``increase_permits`` and the like is forgotten).
    """

    def __init__(
        self,
        client: Any,
        prefix: str = "rediskit",
        *,
        permits: int = 1,
        idle_ttl: Duration = IDLE_TTL,
    ) -> None:
        self.client = check_client("client", client)
        self.keys = KeySpace(prefix, idle_ttl)
        self._idle_ms = self.keys.idle_ms
        self._renewal = renewal_target(client)
        self.default_permits = positive_int("permits", permits)
        self._channel_prefix = self.keys.wake_channel_prefix
        self._sharded = is_cluster(client)  # grants published per slot (SPUBLISH)
        self._acquire = load_script("sem_acquire")
        self._release = load_script("sem_release")
        self._admin = load_script("sem_admin")
        self._info = load_script("sem_info")
        self._extend = load_script("sem_extend")
        self._key_list = self.keys.semaphore_list
        self._pin_list = self.keys.semaphore_pin_list

    def acquire(
        self,
        key: str,
        owner: str,
        permits: int,
        lease: float,
        timeout: float | None,
        abort: threading.Event | None = None,
        *,
        declared: bool = False,
    ) -> int:
        if declared:
            # One try applies the declared total (and notes a difference); the wait, if any,
            # goes on with the total as it now is.
            if self.try_acquire(key, owner, permits, lease, declared=True) >= 1:
                return 1
            if timeout == 0:
                raise LockTimeout(f"permit {key!r} is not available", key)
        argv = self._acquire_argv(owner, permits, lease, key)
        return acquire_queued(
            "permit", key, owner, self.client, self._acquire, self._key_list(key),
            argv, self._cancel_wait, argv[4], timeout, abort, lease,
        )

    def wake_prefix(self, key: str) -> str:
        """The channel prefix of grants of semaphore ``key``: the process channel's, or on a
        Redis Cluster the one of the semaphore's slot (sharded pub/sub)."""
        if self._sharded:
            return self.keys.sharded_wake_prefix(key_slot(self._key_list(key)[0]))
        return self._channel_prefix

    def _acquire_argv(self, owner: str, permits: int, lease: float, key: str) -> list[Any]:
        # ARGV of sem_acquire.lua for one try without queueing (index 2: "join the queue").
        return [owner, to_ms(lease), "0", WAITER_GRACE_MS, self.wake_prefix(key), permits,
                self._idle_ms]

    def try_acquire(
        self,
        key: str,
        owner: str,
        permits: int,
        lease: float,
        *,
        before: tuple[Any, ...] | None = None,
        declared: bool = False,
        wrap: Callable[[ScriptCall], ScriptCall] | None = None,
    ) -> int:
        """One attempt, without queueing: 1 (a :class:`Grant`) if ``owner`` now holds a
        permit of ``key`` (initialised with ``permits``) for ``lease`` seconds, else <= -1.
        ``before`` (an idempotent command) is sent first in the same round trip.
        ``declared``: ``permits`` is the total the caller's code declares (see ``base.py``).
        ``wrap`` turns the acquire script's call into another script's with the same reply
        (one that continues into it, e.g. writing a record first), sent instead."""
        keys = self._pin_list(key) if declared else self._key_list(key)
        argv = self._acquire_argv(owner, permits, lease, key)
        sent = time.monotonic()  # the lease counts from here (lease.Grant)
        if wrap is not None:
            script, wkeys, wargv = wrap((self._acquire, keys, argv))
            reply = script.run(self.client, wkeys, wargv)
        elif before is None:
            reply = self._acquire.run(self.client, keys, argv)
        else:
            reply = self._acquire.run_after(self.client, before, keys, argv)
        if isinstance(reply, list):
            # The stored total differed: the declared one now applies, or an operator's
            # stays. Nothing was acquired; ask again as a plain acquire.
            note_declared(keys[1], key, permits, int(reply[0]), bool(int(reply[1])))
            sent = time.monotonic()
            reply = self._acquire.run(self.client, self._key_list(key), argv)
        got = int(reply)
        return Grant(got, sent) if got >= 1 else got

    def _cancel_wait(self, key: str, owner: str, keep: bool) -> int:
        held = self._run_release(key, owner, keep=keep)
        return 1 if keep and held == 2 else 0

    def release_call(self, key: str, owner: str, *, keep: bool = False,
                     witness: bool = True) -> ScriptCall:
        """The release script of ``owner``'s permit of ``key``, with its KEYS and ARGV, to send
        along with others (``batch.release_together``); its reply goes to
        :meth:`release_reply`. ``witness=False``: no release record, waiters of this process
        woken by message (as ``RedisMutexStorage.release_call``)."""
        # A new release id per call: a re-send of this call after a lost reply finds it
        # recorded and answers as the first send did (see _redis/release.py).
        args = [owner, self.wake_prefix(key), process_id() if witness else NO_PROCESS,
                "keep" if keep else "drop", release_id(), RECORD_MS if witness else 0]
        keys = self._key_list(key)
        record = record_key(keys[0].removesuffix(":holders"))
        return self._release, [*keys, record], args

    @staticmethod
    def _release_result(result: Any) -> int:
        if isinstance(result, list):
            for message in result[1:]:
                wakeup().hand_over_local(message)  # a waiter of this process just got a permit
            return int(result[0])
        return int(result)

    @classmethod
    def release_reply(cls, result: Any) -> bool:
        """What a reply of the release script means: True when the caller held a permit (a
        waiter of this process it went to is woken)."""
        return cls._release_result(result) == 1

    def _run_release(self, key: str, owner: str, *, keep: bool = False) -> int:
        script, keys, args = self.release_call(key, owner, keep=keep)
        return self._release_result(script.run(self.client, keys, args))

    def release(self, key: str, owner: str) -> bool:
        return self._run_release(key, owner) == 1

    def extend(self, key: str, owner: str, seconds: float, *, add: bool) -> bool:
        keys = [self._key_list(key)[0]]
        args = [owner, to_ms(seconds), "add" if add else "set"]
        return int(self._extend.run(self.client, keys, args)) > 0

    def holder_ttl(self, key: str, owner: str) -> float:
        return self.get_semaphore_info(key).holders.get(owner, 0.0)

    def renew_leases(self, leases: Sequence[Lease]) -> list[bool]:
        return self._renewal.renew_leases(leases)

    @property
    def renewal_target(self) -> RedisRenewal:
        """Shared by every storage on this client: renews on a connection of its own."""
        return self._renewal

    def renewal_key(self, key: str) -> str:
        """The key a ``renew_batch`` entry names for ``key``."""
        return self._key_list(key)[0]

    def get_semaphore_info(self, key: str) -> SemaphoreInfo:
        key = resource_key(key)
        keys = self._pin_list(key)
        reply = self._info.run(self.client, [*keys[:3], keys[5]], [])
        total, now = reply[0], int(reply[2])
        holders = {
            as_text(reply[i]): max(0.0, (float(reply[i + 1]) - now) / 1000)
            for i in range(4, len(reply), 2)
        }
        count = int(total) if total else 0
        return SemaphoreInfo(
            key=key,
            total=count,
            available=max(0, count - len(holders)),
            acquired=len(holders),
            initialized=bool(total),
            holders=holders,
            pinned=bool(int(reply[3])),
        )

    def _admin_op(self, key: str, op: str, n: int = 0) -> int:
        key = resource_key(key)
        keys = self._pin_list(key)
        args = [op, n, self.wake_prefix(key), self.default_permits, self._idle_ms]
        return int(self._admin.run(self.client, keys, args))

    def initialize(self, key: str, permits: int) -> None:
        self._admin_op(key, "init", positive_int("permits", permits))

    def increase_permits(self, key: str, n: int) -> int:
        return self._admin_op(key, "inc", positive_int("n", n))

    def decrease_permits(self, key: str, n: int) -> int:
        return self._admin_op(key, "dec", positive_int("n", n))

    def reset(self, key: str) -> None:
        self._admin_op(key, "reset")

    def clear(self, key: str) -> None:
        self._admin_op(key, "clear")
