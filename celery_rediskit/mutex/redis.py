"""``RedisMutexStorage``: locks in Redis, one Lua script (one round trip) per operation.

Keys of lock ``K`` (all with hash tag ``{K}``): ``<prefix>:lock:{K}`` holds the owner id with
the lease as PX expiry (the server's clock), ``...:fence`` the last fencing token (each grant
takes ``max(last + 1, server clock in µs)``, so tokens keep rising when the key is lost; it
expires ``idle_ttl`` after the last grant's lease), ``...:queue`` /
``...:waitq`` the FIFO of waiters (expiring with the last waiter's deadline). Release hands
the lock straight to the first live waiter, so nobody can jump the queue.
``...:released:<process id>/<thread>`` records a thread's latest release for a few seconds, so
that a release re-sent after its reply was lost answers truthfully and still wakes a waiter of
this process (``_redis/release.py``).
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
from .._validate import positive_seconds, resource_key, to_ms
from ..durations import Duration
from ..lease import Grant, Lease, process_id
from .base import LockInfo, MutexStorage

__all__ = ["RedisMutexStorage"]

class RedisMutexStorage(MutexStorage):
    """Mutex storage on a redis-py client (``redis.Redis`` or ``redis.RedisCluster``).

    ``prefix`` (default ``"rediskit"``) starts every key and channel this storage uses.
    ``idle_ttl`` (seconds or a duration text, default a week) is how long a lock's keys
    outlive its last grant: a name never used again leaves nothing behind.
    """

    def __init__(
        self, client: Any, prefix: str = "rediskit", *, idle_ttl: Duration = IDLE_TTL
    ) -> None:
        self.client = check_client("client", client)
        self.keys = KeySpace(prefix, idle_ttl)
        self._idle_ms = self.keys.idle_ms
        self._renewal = renewal_target(client)
        self._channel_prefix = self.keys.wake_channel_prefix
        self._sharded = is_cluster(client)  # grants published per slot (SPUBLISH)
        self._acquire = load_script("mutex_acquire")
        self._release = load_script("mutex_release")
        self._cancel = load_script("mutex_cancel")
        self._extend = load_script("mutex_extend")
        self._info = load_script("mutex_info")
        self._key_list = self.keys.lock_list

    def acquire(
        self,
        key: str,
        owner: str,
        lease: float,
        timeout: float | None,
        abort: threading.Event | None = None,
        *,
        wrap: Callable[[ScriptCall], ScriptCall] | None = None,
    ) -> int:
        """As :meth:`MutexStorage.acquire`. ``wrap`` (for a try, ``timeout`` 0) turns the
        acquire script's call into another script's with the same reply, sent instead (as in
        :meth:`try_acquire`); a late grant's renewing try sends it again."""
        argv = self.acquire_argv(owner, lease, key)
        script, keys = self._acquire, self._key_list(key)
        channel = argv[4]
        if wrap is not None:
            script, keys, argv = wrap((script, keys, argv))
        return acquire_queued(
            "lock", key, owner, self.client, script, keys,
            argv, self._cancel_wait, channel, timeout, abort, lease,
        )

    def wake_prefix(self, key: str) -> str:
        """The channel prefix of grants of lock ``key``: the process channel's, or on a Redis
        Cluster the one of the lock's slot (sharded pub/sub)."""
        if self._sharded:
            return self.keys.sharded_wake_prefix(key_slot(self._key_list(key)[0]))
        return self._channel_prefix

    def acquire_argv(self, owner: str, lease: float, key: str) -> list[Any]:
        """ARGV of ``mutex_acquire.lua`` for one try at lock ``key`` without queueing (index 2
        is the "join the queue" flag); the cache's single-flight script reuses this layout."""
        return [owner, to_ms(lease), "0", WAITER_GRACE_MS, self.wake_prefix(key),
                self._idle_ms]

    def release_argv(self, owner: str, key: str, *, force: bool = False,
                     witness: bool = True) -> list[Any]:
        """ARGV of ``mutex_release.lua`` for one release call of lock ``key``, with a new
        release id (also reused by the cache's fill script): every send of one call must use
        the same list. ``witness=False``: no release record, and a waiter of this process
        is woken by message like any other (see :meth:`release_call`)."""
        return [owner, self.wake_prefix(key), process_id() if witness else NO_PROCESS,
                "1" if force else "0", self._idle_ms, release_id(), RECORD_MS if witness else 0]

    def release_keys(self, key: str) -> list[str]:
        """KEYS of ``mutex_release.lua``: the lock's keys and the calling thread's release
        record."""
        keys = self._key_list(key)
        return [*keys, record_key(keys[0])]

    def try_acquire(
        self, key: str, owner: str, lease: float, *, before: tuple[Any, ...] | None = None,
        wrap: Callable[[ScriptCall], ScriptCall] | None = None,
    ) -> int:
        """One attempt, without queueing: the fencing token (a :class:`Grant`, >= 1) if
        ``owner`` now holds ``key`` for ``lease`` seconds, else <= -1. ``before`` (an
        idempotent command, e.g. a record of the claim) is sent first in the same round
        trip. ``wrap`` turns the acquire script's call into another script's with the same
        reply (one that continues into it, e.g. writing a record first), sent instead."""
        keys = self._key_list(key)
        argv = self.acquire_argv(owner, lease, key)
        sent = time.monotonic()  # the lease counts from here (lease.Grant)
        if wrap is not None:
            script, keys, argv = wrap((self._acquire, keys, argv))
            token = int(script.run(self.client, keys, argv))
        elif before is None:
            token = int(self._acquire.run(self.client, keys, argv))
        else:
            token = int(self._acquire.run_after(self.client, before, keys, argv))
        return Grant(token, sent) if token >= 1 else token

    def try_call(self, key: str, owner: str, lease: float) -> ScriptCall:
        """The acquire script of one try at ``key`` (as :meth:`try_acquire`), with its KEYS and
        ARGV, to send along with others in one round trip (``batch.run_scripts``); its reply
        is a token >= 1 when ``owner`` now holds ``key`` for ``lease`` seconds, else <= -1."""
        return self._acquire, self._key_list(key), self.acquire_argv(owner, lease, key)

    def _cancel_wait(self, key: str, owner: str, keep: bool) -> int:
        """A waiter gives up: with ``keep``, the token of a grant made meanwhile (else 0);
        without, it leaves the queue or hands such a grant on (the release script does both,
        in one round trip)."""
        if not keep:
            self._run_release(key, owner, force=False)
            return 0
        return int(self._cancel.run(self.client, self._key_list(key), [owner]))

    def release_call(self, key: str, owner: str, *, force: bool = False,
                     witness: bool = True) -> ScriptCall:
        """The release script of ``owner``'s lock ``key``, with its KEYS and ARGV (a new
        release id), to send along with others (``batch.release_together``); its reply goes
        to :meth:`release_reply`. ``witness=False`` (a release whose re-send something else
        tells apart, ``PreparedRelease.in_store``): it writes no release record, so a
        re-send answers "not held", and it hands the lock to a waiter of this process by
        message, which no lost reply can lose."""
        argv = self.release_argv(owner, key, force=force, witness=witness)
        return self._release, self.release_keys(key), argv

    @staticmethod
    def release_reply(result: Any) -> bool:
        """What a reply of the release script means: True when the caller held the lock (a
        waiter of this process it was handed to is woken)."""
        if isinstance(result, (bytes, str)):
            wakeup().hand_over_local(result)  # the next owner waits in this process
            return True
        return bool(result)

    def _run_release(self, key: str, owner: str, force: bool) -> bool:
        script, keys, args = self.release_call(key, owner, force=force)
        return self.release_reply(script.run(self.client, keys, args))

    def release(self, key: str, owner: str) -> bool:
        return self._run_release(key, owner, force=False)

    def force_release(self, key: str) -> bool:
        return self._run_release(resource_key(key), "", force=True)

    def extend(self, key: str, owner: str, seconds: float, *, add: bool) -> bool:
        keys = self._key_list(key)[:1]
        args = [owner, to_ms(seconds), "add" if add else "set"]
        return bool(self._extend.run(self.client, keys, args))

    def extend_lock(self, key: str, seconds: float) -> bool:
        seconds = positive_seconds("seconds", seconds)
        return self.extend(resource_key(key), "", seconds, add=True)

    def renew_leases(self, leases: Sequence[Lease]) -> list[bool]:
        return self._renewal.renew_leases(leases)

    @property
    def renewal_target(self) -> RedisRenewal:
        """Shared by every storage on this client: renews on a connection of its own."""
        return self._renewal

    def renewal_key(self, key: str) -> str:
        """The key a ``renew_batch`` entry names for ``key``."""
        return self._key_list(key)[0]

    def get_lock_info(self, key: str) -> LockInfo:
        lock_and_fence = self._key_list(resource_key(key))[:2]
        holder, pttl, fence = self._info.run(self.client, lock_and_fence, [])
        holder_id = as_text(holder) if holder else None
        return LockInfo(
            key=key,
            locked=holder_id is not None,
            ttl=max(0, int(pttl)) / 1000 if holder_id is not None else 0.0,
            holder=holder_id,
            fencing_token=int(fence) if fence else None,
        )

    def is_locked(self, key: str) -> bool:
        return bool(self.client.exists(self._key_list(resource_key(key))[0]))

    def holder_ttl(self, key: str, owner: str) -> float:
        info = self.get_lock_info(key)
        return info.ttl if info.holder == owner else 0.0
