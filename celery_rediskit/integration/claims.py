"""What each task holds, recorded in Redis by task id, so any process can release it.

A revoke before the task starts, ``revoke(terminate=True)`` and a hard time limit are seen
only by the worker's main process, which has no arguments (so cannot recompute keys) and no
lease objects. Each claim is recorded in ``<prefix>:claims:<task id>`` (a string, one
``"<kind>|<key>|<owner>"`` line per claim); releasing by task id releases each one,
owner-checked, so a stale record can never release someone else's lock.

The record of a running task lives as long as its leases: each of them names the record as a
companion key (``Lease.companion_keys``), so every renewal of the leases extends the record
too, in the same script and round trip. It is deleted when the run ends (:meth:`forget`, in
the run's own path, or by the release by task id); if the process dies unseen, it expires one
lease after the last renewal, with the leases.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from .._redis.scripts import LuaScript, call, load_script

__all__ = ["ClaimStore", "Releaser", "holder_line", "parse_record"]

log = logging.getLogger(__name__)


class Releaser(Protocol):
    def release(self, key: str, owner: str) -> bool: ...


class ClaimStore:
    """Task id → claimed (kind, key, owner), one Redis string per task (one command to write).

    ``kind`` is ``"m"`` (lock) or ``"s"`` (permit). A record is rewritten whole by each
    writer and expires on its own: a stale record is harmless, since every release it drives
    is owner-checked. The worker writes the record of a running task for ``2 × lease``, and
    the renewals of the task's leases keep it alive as long as any of them is renewed (see
    the module doc); the run deletes it when it ends (:meth:`forget`).
    """

    def __init__(self, client: Any, prefix: str, ttl: float) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl = max(1, int(ttl))

    def key(self, task_id: str) -> str:
        return f"{self.prefix}:claims:{task_id}"

    def record(self, task_id: str, records: Sequence[tuple[str, str, str]],
               ttl: float | None = None, holder: str = "") -> None:
        """Make ``records`` the claims of ``task_id`` for ``ttl`` seconds (one command).

        ``holder`` (a :func:`holder_line`) says who runs the task, for lock reports; it
        rides in the same string, so it costs no extra round trip.
        """
        call(self.client, *self.record_command(task_id, records, ttl, holder))

    def record_command(self, task_id: str, records: Sequence[tuple[str, str, str]],
                       ttl: float | None = None, holder: str = "") -> tuple[Any, ...]:
        """The command :meth:`record` sends, to send it along with others in one round trip
        (``scripts.call_many``)."""
        text = "\n".join([f"{kind}|{key}|{owner}" for kind, key, owner in records])
        if holder:
            text = holder + "\n" + text
        seconds = self.ttl if ttl is None else max(1, int(ttl + 0.999))
        return ("SET", self.key(task_id), text, "EX", seconds)

    def drop(self, task_id: str) -> None:
        self.client.delete(self.key(task_id))

    def forget(self, command: tuple[Any, ...]) -> bool:
        """Delete the record that ``command`` (from :meth:`record_command`) wrote, unless it
        has been rewritten since: by a re-sent message of the same task id (a retry, a
        re-queue) or another delivery of it, whose record it now is. One round trip; True
        when deleted."""
        return bool(load_script("claims_forget").run(self.client, *self.forget_call(command)[1:]))

    def forget_call(self, command: tuple[Any, ...]) -> tuple[LuaScript, list[str], list[Any]]:
        """The script :meth:`forget` runs, with its KEYS and ARGV, to send along with others
        in one round trip (``batch.run_scripts``)."""
        _set, key, text = command[:3]
        return load_script("claims_forget"), [key], [text]

    def held(self, task_id: str) -> list[tuple[str, str, str]]:
        """(kind, key, owner) recorded for ``task_id``."""
        raw = self.client.get(self.key(task_id))
        if not raw:
            return []
        return parse_record(raw)[0]

    def holder_pid(self, task_id: str) -> int | None:
        """The pid of the process that recorded the claims of ``task_id`` (its holder
        line), or None when there is no record or it has no holder line."""
        raw = self.client.get(self.key(task_id))
        meta = parse_record(raw)[1] if raw else None
        return None if meta is None else int(meta["pid"])

    def release_all(self, task_id: str, storages: Mapping[str, Releaser],
                    pid: int | None = None,
                    released: list[tuple[str, str]] | None = None) -> int:
        """Release everything ``task_id`` holds (owner-checked); the number released.

        With ``pid``, only a record written by process ``pid`` (or one without a holder
        line: a queued-scope claim not yet taken up) is acted on: a later run of the same
        task id in another process keeps what it holds.
        ``released``, when given, gets the (kind, key) of each claim released.
        """
        raw = self.client.get(self.key(task_id))
        if not raw:
            return 0
        records, meta = parse_record(raw)
        if pid is not None and meta is not None and meta["pid"] != pid:
            return 0
        count = 0
        for kind, key, owner in records:
            storage = storages.get(kind)
            if storage is None:
                continue
            try:
                if storage.release(key, owner):
                    count += 1
                    if released is not None:
                        released.append((kind, key))
            except Exception:
                log.exception("rediskit: releasing %r of task %s failed", key, task_id)
        self.drop(task_id)
        return count


node_name: str | None = None
"""This process's worker node name (``name@host``), set when a worker starts (``worker_init``):
``request.hostname`` is the bare host name under pools that trace tasks the slow way."""


def holder_line(task_name: str, worker: str | None) -> str:
    """The line of a claims record saying who runs the task: when it started (Unix time),
    the pid of the process running it, the worker's node name and the task's name."""
    return f"@|{time.time():.3f}|{os.getpid()}|{node_name or worker or ''}|{task_name}"


def parse_record(raw: Any) -> tuple[list[tuple[str, str, str]], dict[str, Any] | None]:
    """The (kind, key, owner) claims of a record, and its holder line as a dict (``since``,
    ``pid``, ``worker``, ``task_name``) or None when it has none."""
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    out: list[tuple[str, str, str]] = []
    meta: dict[str, Any] | None = None
    for line in text.split("\n"):
        if line.startswith("@|"):
            parts = line.split("|", 4)
            if len(parts) == 5:
                try:
                    meta = {"since": float(parts[1]), "pid": int(parts[2]),
                            "worker": parts[3] or None, "task_name": parts[4]}
                except ValueError:
                    meta = None
            continue
        kind, _, rest = line.partition("|")
        key, _, owner = rest.rpartition("|")
        if kind and key:
            out.append((kind, key, owner))
    return out, meta
