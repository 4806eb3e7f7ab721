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
    """Task id → claimed (kind, key, owner), one Redis string per task (one command to write).

    ``kind`` is ``"m"`` (lock) or ``"s"`` (permit). A record is rewritten whole by each
    writer and expires on its own: a stale record is harmless, since every release it drives
    is owner-checked. The worker's record of a running task lives ``2 × lease``: past that, a
    killed task's leases end by expiry anyway (within one lease).
    """

    def __init__(self, client: Any, prefix: str, ttl: float) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl = max(1, int(ttl))

    def key(self, task_id: str) -> str:
        return f"{self.prefix}:claims:{task_id}"

    def record(self, task_id: str, records: list[tuple[str, str, str]],
               ttl: float | None = None) -> None:
        """Make ``records`` the claims of ``task_id`` for ``ttl`` seconds (one command)."""
        text = "\n".join(f"{kind}|{key}|{owner}" for kind, key, owner in records)
        seconds = self.ttl if ttl is None else max(1, int(ttl + 0.999))
        self.client.set(self.key(task_id), text, ex=seconds)

    def drop(self, task_id: str) -> None:
        self.client.delete(self.key(task_id))

    def held(self, task_id: str) -> list[tuple[str, str, str]]:
        """(kind, key, owner) recorded for ``task_id``."""
        raw = self.client.get(self.key(task_id))
        if not raw:
            return []
        text = raw.decode() if isinstance(raw, bytes) else raw
        out = []
        for line in text.split("\n"):
            kind, _, rest = line.partition("|")
            key, _, owner = rest.rpartition("|")
            if kind and key:
                out.append((kind, key, owner))
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
