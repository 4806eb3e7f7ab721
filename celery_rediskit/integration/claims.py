"""What each task holds, recorded in Redis by task id, so any process can release it.

A revoke before the task starts, ``revoke(terminate=True)`` and a hard time limit are seen
only by the worker's main process, which has no arguments (so cannot recompute keys) and no
lease objects. Each claim is recorded as ``<prefix>:claims:<task id>`` (a hash of
``"<kind>|<key>"`` → owner id); releasing by task id releases each one, owner-checked, so a
stale record can never release someone else's lock.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

__all__ = ["ClaimStore", "Releaser"]

log = logging.getLogger(__name__)


class Releaser(Protocol):
    def release(self, key: str, owner: str) -> bool: ...


class ClaimStore:
    """Task id → claimed (kind, key, owner) in Redis. ``kind`` is ``"m"`` (lock) or ``"s"``."""

    def __init__(self, client: Any, prefix: str, ttl: float) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl = max(1, int(ttl))

    def key(self, task_id: str) -> str:
        return f"{self.prefix}:claims:{task_id}"

    def record(self, task_id: str, kind: str, key: str, owner: str) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(self.key(task_id), f"{kind}|{key}", owner)
        pipe.expire(self.key(task_id), self.ttl)
        pipe.execute()

    def record_many(self, task_id: str, records: list[tuple[str, str, str]]) -> None:
        """Record several (kind, key, owner) of ``task_id`` in one round trip."""
        name = self.key(task_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(name, mapping={f"{kind}|{key}": owner for kind, key, owner in records})
        pipe.expire(name, self.ttl)
        pipe.execute()

    def replace(self, task_id: str, records: list[tuple[str, str, str]]) -> None:
        """Make ``records`` the only claims of ``task_id`` (one round trip)."""
        name = self.key(task_id)
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(name)
        if records:
            pipe.hset(name, mapping={f"{kind}|{key}": owner for kind, key, owner in records})
            pipe.expire(name, self.ttl)
        pipe.execute()

    def forget(self, task_id: str, kind: str, key: str) -> None:
        self.client.hdel(self.key(task_id), f"{kind}|{key}")

    def drop(self, task_id: str) -> None:
        self.client.delete(self.key(task_id))

    def held(self, task_id: str) -> list[tuple[str, str, str]]:
        """(kind, key, owner) recorded for ``task_id``."""
        raw = self.client.hgetall(self.key(task_id))
        out = []
        for field, owner in raw.items():
            f = field.decode() if isinstance(field, bytes) else field
            o = owner.decode() if isinstance(owner, bytes) else owner
            kind, _, key = f.partition("|")
            out.append((kind, key, o))
        return out

    def release_all(self, task_id: str, storages: Mapping[str, Releaser]) -> int:
        """Release everything ``task_id`` holds (owner-checked); the number released."""
        released = 0
        for kind, key, owner in self.held(task_id):
            storage = storages.get(kind)
            if storage is None:
                continue
            try:
                if storage.release(key, owner):
                    released += 1
            except Exception:
                log.exception("rediskit: releasing %r of task %s failed", key, task_id)
        self.drop(task_id)
        return released
