"""``RedisSemaphoreStorage``: semaphores in Redis, one Lua script per operation.

Keys of semaphore ``K`` (all with hash tag ``{K}``): ``<prefix>:sem:{K}:holders`` is a sorted
set of owner ids scored by their lease end on the server's clock, ``...:total`` and
``...:initial`` the permits, ``...:queue`` / ``...:waiters`` the FIFO of waiters. Every script
first drops holders whose lease ended, so a crashed holder's permit comes back by itself.
``...:released:<process id>/<thread>`` records a thread's latest release for a few seconds, so
that a release re-sent after its reply was lost answers truthfully (``_redis/release.py``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from .._redis.keys import KeySpace
from .._redis.release import RECORD_MS, record_key, release_id
from .._redis.renew_batch import renew_in_batches
from .._redis.scripts import as_text, load_script
from .._redis.waiting import WAITER_GRACE_MS, acquire_queued
from .._redis.wakeup import hand_over_local
from .._validate import positive_int, resource_key, to_ms
from ..lease import Lease, process_id
from .base import SemaphoreInfo, SemaphoreStorage

__all__ = ["RedisSemaphoreStorage"]

class RedisSemaphoreStorage(SemaphoreStorage):
    """Semaphore storage on a redis-py client (``redis.Redis`` or ``redis.RedisCluster``).

    ``prefix`` (default ``"rediskit"``) starts every key and channel this storage uses.
    ``permits`` is the total used when an admin call meets a semaphore not yet initialised.
    """

    def __init__(self, client: Any, prefix: str = "rediskit", *, permits: int = 1) -> None:
        self.client = client
        self.keys = KeySpace(prefix)
        self.default_permits = positive_int("permits", permits)
        self._channel_prefix = self.keys.wake_channel_prefix
        self._acquire = load_script("sem_acquire")
        self._release = load_script("sem_release")
        self._admin = load_script("sem_admin")
        self._info = load_script("sem_info")
        self._extend = load_script("sem_extend")
        self._key_list = self.keys.semaphore_list

    def acquire(
        self,
        key: str,
        owner: str,
        permits: int,
        lease: float,
        timeout: float | None,
        abort: threading.Event | None = None,
    ) -> int:
        return acquire_queued(
            "permit", key, owner, self.client, self._acquire, self._key_list(key),
            self._acquire_argv(owner, permits, lease), self._cancel_wait, self._channel_prefix,
            timeout, abort,
        )

    def _acquire_argv(self, owner: str, permits: int, lease: float) -> list[Any]:
        # ARGV of sem_acquire.lua for one try without queueing (index 2: "join the queue").
        return [owner, to_ms(lease), "0", WAITER_GRACE_MS, self._channel_prefix, permits]

    def try_acquire(
        self,
        key: str,
        owner: str,
        permits: int,
        lease: float,
        *,
        before: tuple[Any, ...] | None = None,
    ) -> int:
        """One attempt, without queueing: 1 if ``owner`` now holds a permit of ``key``
        (initialised with ``permits``) for ``lease`` seconds, else <= -1. ``before`` (an
        idempotent command) is sent first in the same round trip."""
        keys = self._key_list(key)
        argv = self._acquire_argv(owner, permits, lease)
        if before is None:
            return int(self._acquire.run(self.client, keys, argv))
        return int(self._acquire.run_after(self.client, before, keys, argv))

    def _cancel_wait(self, key: str, owner: str, keep: bool) -> int:
        held = self._run_release(key, owner, keep=keep)
        return 1 if keep and held == 2 else 0

    def _run_release(self, key: str, owner: str, *, keep: bool = False) -> int:
        # A new release id per call: a re-send of this call after a lost reply finds it
        # recorded and answers as the first send did (see _redis/release.py).
        args = [owner, self._channel_prefix, process_id(), "keep" if keep else "drop",
                release_id(), RECORD_MS]
        keys = self._key_list(key)
        record = record_key(keys[0].removesuffix(":holders"))
        result = self._release.run(self.client, [*keys, record], args)
        if isinstance(result, list):
            for message in result[1:]:
                hand_over_local(message)  # a waiter of this process just got a permit
            return int(result[0])
        return int(result)

    def release(self, key: str, owner: str) -> bool:
        return self._run_release(key, owner) == 1

    def extend(self, key: str, owner: str, seconds: float, *, add: bool) -> bool:
        keys = [self._key_list(key)[0]]
        args = [owner, to_ms(seconds), "add" if add else "set"]
        return int(self._extend.run(self.client, keys, args)) > 0

    def holder_ttl(self, key: str, owner: str) -> float:
        return self.get_semaphore_info(key).holders.get(owner, 0.0)

    def renew_leases(self, leases: Sequence[Lease]) -> list[bool]:
        items = [(self._key_list(lease.key)[0], "s") for lease in leases]
        return renew_in_batches(self.client, leases, items)

    def get_semaphore_info(self, key: str) -> SemaphoreInfo:
        key = resource_key(key)
        reply = self._info.run(self.client, self._key_list(key)[:3], [])
        total, now = reply[0], int(reply[2])
        holders = {
            as_text(reply[i]): max(0.0, (float(reply[i + 1]) - now) / 1000)
            for i in range(3, len(reply), 2)
        }
        count = int(total) if total else 0
        return SemaphoreInfo(
            key=key,
            total=count,
            available=max(0, count - len(holders)),
            acquired=len(holders),
            initialized=bool(total),
            holders=holders,
        )

    def _admin_op(self, key: str, op: str, n: int = 0) -> int:
        keys = self._key_list(resource_key(key))
        args = [op, n, self._channel_prefix, self.default_permits]
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
