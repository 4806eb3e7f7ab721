"""A run's releases sent in the round trip that stores its result.

A worker already ends every run with a round trip: Celery's Redis result backend stores the
result with ``SET`` and ``PUBLISH`` in one ``MULTI``/``EXEC``. When that backend talks to the
same server and database as the library's client, the run's releases (its lock, its permits
and the deletion of its claims record, which ``task.py`` would send in a round trip of their
own) are added to that transaction instead: one round trip less per run in the worker, and
the result and the releases become visible together. Writes handed over with them
(``first``: the cache entry of the run's result) go in the same transaction, before the
releases and the store.

The releases are handed over (:func:`defer`) when the body is done; a store of this run's
result takes them (:func:`_install` wraps the backend's ``_set``). Whatever keeps Celery from
storing it (``ignore_result``, ``Ignore``/``Reject``, a result stored already, a store that
failed) leaves them to the backend's ``process_cleanup``, which Celery's tracer calls after
every run in a worker: they are sent there, on the library's client, as before.

A caller that has the result finds the run's leases released and its claims record gone,
always. The last release (with the record's deletion) and the store (the SET and PUBLISH of
Celery's own store) are one script (``lua/store_after.lua``): both run, or neither (a
server that lost the script). That release writes no release record (a re-send of the
transaction after a lost reply finds the result stored; ``PreparedRelease.in_store``), nor
do the releases before it: that spares a key per lease and run. Those are scripts of their
own in the transaction, and the store writes nothing while a lease they end is still held; with no
release, the result is stored by ``lua/result_store.lua`` with the same checks. A check
fails when a release script is missing on the server (NOSCRIPT, which fails that command
only, not the transaction: the first runs of a process after a restart, a failover or
``SCRIPT FLUSH``); the releases are then sent again on their own (each is idempotent: a
release id, an owner-checked record deletion), loading the scripts, and only then is the
result stored, as Celery stores it. A write of ``first`` has a check of its own (its key
must exist) and is sent again the same way.

Before each store Celery reads the key in a round trip of its own, so as never to overwrite
a result stored as SUCCESS (a redelivered copy of a task that ran, say). For the store that
carries a run's releases that read is skipped and the store's script makes the same check
in the same step: one more round trip less per run. A result there that the script cannot
read (another serializer than JSON, or compressed) is read and checked as Celery would.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from celery import states
from redis.exceptions import NoScriptError, ResponseError

from .._redis.batch import PreparedRelease, ScriptCall, run_scripts
from .._redis.scripts import (
    LuaScript,
    call,
    call_many,
    is_traced,
    load_script,
    wrapped_script,
)

__all__ = ["backend_for", "defer", "flush", "send_now"]

log = logging.getLogger(__name__)

_local = threading.local()  # .deferred: the releases this thread's run handed over

# Connection settings that name a server and database: equal on both clients, or no fusing.
_WHERE = ("host", "port", "path", "db", "username")


# A write sent before the releases, and what takes its reply (an error in place of it).
First = tuple[ScriptCall, Callable[[Any], None]]


class _Deferred:
    __slots__ = ("backend", "client", "done", "first", "key", "prepared", "storing", "task_id")

    def __init__(self, backend: Any, task_id: str, prepared: PreparedRelease, client: Any,
                 done: Callable[[list[Any]], None], first: Sequence[First]) -> None:
        self.backend, self.task_id = backend, task_id
        self.key = _as_bytes(backend.get_key_for_task(task_id))
        self.prepared, self.client, self.done = prepared, client, done
        self.first = first
        self.storing = False  # inside Celery's _store_result of this run's result

    def is_for(self, backend: Any, task_id: Any) -> bool:
        """Whether ``backend`` stores ``task_id``'s result under :attr:`key`. The backend
        that made the key (the usual case) makes it of the task id in a fixed frame: the ids
        are compared, without making the key again."""
        if (backend is self.backend and isinstance(task_id, str)
                and isinstance(self.task_id, str)):
            return task_id == self.task_id
        return _as_bytes(backend.get_key_for_task(task_id)) == self.key


def backend_for(task: Any, client: Any) -> Any | None:
    """``task``'s result backend if a run's releases can ride in its result store (a plain
    Redis backend on the server and database of ``client``), else None. Decided once per
    backend instance (Celery keeps one per thread)."""
    backend = task.backend
    fusable = backend.__dict__.get("_rediskit_with_result")
    if fusable is None:
        fusable = _same_server(backend, client)
        if fusable:
            _install(backend)
        backend.__dict__["_rediskit_with_result"] = fusable
    return backend if fusable else None


def _same_server(backend: Any, client: Any) -> bool:
    kind = type(backend)
    if (kind.__module__, kind.__qualname__) != ("celery.backends.redis", "RedisBackend"):
        return False  # another backend, or a subclass (Sentinel's, say): their own _set
    pool = getattr(client, "connection_pool", None)
    if pool is None or getattr(client, "connection", None) is not None:
        return False  # a cluster client, or a single-connection client
    try:
        theirs = backend.client.connection_pool.connection_kwargs
    except Exception:  # noqa: BLE001 - a backend we cannot inspect is not fused
        return False
    ours = pool.connection_kwargs
    return all(theirs.get(k) == ours.get(k) for k in _WHERE)


def _install(backend: Any) -> None:
    """Wrap ``backend``'s ``_set`` (the store of one key: SET/SETEX and PUBLISH in a
    transaction), ``process_cleanup``, and the reads of Celery's check before a store
    (``_store_result``, ``_get_task_meta_for``) on this instance."""
    original_set = backend._set
    original_cleanup = backend.process_cleanup
    original_store_result = backend._store_result
    original_meta_for = backend._get_task_meta_for

    def _store_result(task_id: Any, *args: Any, **kwargs: Any) -> Any:
        deferred: _Deferred | None = getattr(_local, "deferred", None)
        if deferred is None or not deferred.is_for(backend, task_id):
            return original_store_result(task_id, *args, **kwargs)
        deferred.storing = True
        try:
            return original_store_result(task_id, *args, **kwargs)
        finally:
            deferred.storing = False

    def _get_task_meta_for(task_id: Any) -> Any:
        # Celery's check before a store: a result stored as SUCCESS is never overwritten.
        # For the store carrying a run's releases, the store's script checks that itself.
        deferred: _Deferred | None = getattr(_local, "deferred", None)
        if deferred is not None and deferred.storing and deferred.is_for(backend, task_id):
            return {"status": states.PENDING, "result": None}
        return original_meta_for(task_id)

    def _store_unless_succeeded(key: Any, value: Any, *rest: Any) -> Any:
        """Celery's own store, after Celery's own check (skipped before this store)."""
        current = backend.get(key)
        if current and backend.decode_result(current)["status"] == states.SUCCESS:
            return None
        return original_set(key, value, *rest)

    def _set(key: Any, value: Any, *rest: Any) -> Any:
        deferred: _Deferred | None = getattr(_local, "deferred", None)
        if deferred is None or _as_bytes(key) != deferred.key:
            return original_set(key, value, *rest)
        expires = rest[0] if rest and rest[0] is not None else backend.expires
        ms = round(float(expires) * 1000) if expires else 0
        releases = deferred.prepared.in_store()
        writes = [call for call, _taker in deferred.first]
        # The store runs inside the last script sent before it: the last release, or with
        # none the last write; it checks what the scripts sent apart before it end or write.
        wrapped = releases[-1] if releases else writes[-1] if writes else None
        if releases:
            releases = releases[:-1]
        elif writes:
            writes = writes[:-1]
        checks = [*deferred.prepared.held()[:len(releases)],
                  *((write[1][0], "e", "") for write in writes)]
        store, keys, args = _store_call(checks, wrapped, key, value, ms)
        commands = [("EVALSHA", script.sha, len(skeys), *skeys, *sargs)
                    for script, skeys, sargs in (*writes, *releases)]
        commands.append(("EVALSHA", store.sha, len(keys), *keys, *args))
        replies = _send_store(deferred.client, commands)  # a lost connection raises: retried
        _local.deferred = None
        stored = replies.pop()
        if wrapped is not None:  # its reply, and the store's; or an error: neither ran
            inner, stored = stored if isinstance(stored, list) else (stored, stored)
            replies.append(inner)  # in its place: it was the last of the writes and releases
        firsts = len(deferred.first)
        ours = list(replies[firsts:])
        if firsts:
            _send_first(deferred, replies[:firsts])  # a missing script's write: sent again
        if stored in (1, 2, 3):  # the releases ran (all but those missing their script)
            if any(isinstance(reply, NoScriptError) for reply in ours):
                # a missing release of a lease no longer held: idempotent
                _send(deferred, first=False)
            else:
                _finish(deferred, ours)
            if stored == 3:  # a result there the script cannot read: Celery reads it
                return _store_unless_succeeded(key, value, *rest)
            return None  # stored, or a SUCCESS found there kept
        # Nothing stored: a release or a write did not run (its script missing), or the
        # store's script is missing, or the store failed. Writes (sent again above) and
        # releases first, then Celery's own store (which raises as it would if the server
        # refuses it).
        _send(deferred, first=False)  # loads missing scripts; those that ran answer as before
        if isinstance(stored, NoScriptError):
            try:
                store.load(deferred.client)  # for the next run's store
            except Exception:  # noqa: BLE001 - the next store falls back the same way
                log.debug("rediskit: loading the result store script failed", exc_info=True)
        return _store_unless_succeeded(key, value, *rest)

    def process_cleanup() -> None:
        try:
            flush()
        finally:
            original_cleanup()

    backend._set = _set
    backend.process_cleanup = process_cleanup
    backend._store_result = _store_result
    backend._get_task_meta_for = _get_task_meta_for


def _send_store(client: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
    """Send the store's ``commands`` on ``client`` (the library's, on the backend's server and
    database) through its lean path (``scripts.call``): no checkout of a connection of
    the backend's pool, no transaction for the store alone. Several commands go in one
    ``MULTI``/``EXEC``, the releases and writes visible with the result. Replies in order, an
    error reply in place of its reply; a lost connection raises (Celery retries the store)."""
    if len(commands) == 1:
        try:
            return [call(client, *commands[0])]
        except ResponseError as exc:  # NOSCRIPT, or the server refused it: nothing ran
            return [exc]
    if is_traced(client):  # redis-py's public path, as trace_commands() promises
        with client.pipeline() as pipe:
            for command in commands:
                pipe.execute_command(*command)
            return list(pipe.execute(raise_on_error=False))
    replies = call_many(client, ("MULTI",), *commands, ("EXEC",))
    done = replies[-1]
    if isinstance(done, Exception):  # EXECABORT: none of them ran
        return [done] * len(commands)
    return list(done)


def _store_call(checks: Sequence[tuple[str, str, str]], wrapped: ScriptCall | None, key: Any,
                value: Any, ms: int) -> tuple[LuaScript, list[Any], list[Any]]:
    """The script storing the result, with its keys and arguments. With a script to run
    before it (``wrapped``: the run's last release, or its last write), the two are one
    script (``lua/store_after.lua``), which runs both or neither: what that script ends or
    writes itself (its lease, the claims record it deletes, its cache entry) needs no check.
    Else ``lua/result_store.lua``. ``checks`` (key, kind, value), as
    ``lua/_result_store.lua`` checks them: what the scripts sent apart before it end (a
    lease's key, ``PreparedRelease.held``) or write (a cache entry's key, kind ``"e"``)."""
    if wrapped is None:
        script = load_script("result_store")
        keys: list[Any] = [key]
        args: list[Any] = [value, ms]
    else:
        inner, wkeys, wargs = wrapped
        script = wrapped_script("store_after", inner.name)
        keys, args = [*wkeys, key], [*wargs, value, ms]
    keys += [k for k, _kind, _value in checks]
    for _k, kind, held_value in checks:
        args += [kind, held_value]
    if wrapped is not None:
        args += [len(wkeys), len(wargs)]
    return script, keys, args


def _as_bytes(key: Any) -> bytes:
    return key if isinstance(key, bytes) else str(key).encode()


def defer(backend: Any, task_id: str, prepared: PreparedRelease, client: Any,
          done: Callable[[list[Any]], None], first: Sequence[First] = ()) -> None:
    """Hand ``prepared`` over to the store of ``task_id``'s result by ``backend`` (from
    :func:`backend_for`); ``done`` gets the replies of its calls once sent (on ``client``,
    the library's, when the store does not take them). ``first``: writes sent before the
    releases (idempotent scripts, each with what takes its reply). The result is stored
    only once every release ran and every write is there (see :func:`_store_call`)."""
    flush()  # one left by a run whose store and cleanup never came (should not happen)
    _local.deferred = _Deferred(backend, task_id, prepared, client, done, first)


def flush() -> None:
    """Send the releases this thread handed over and no store took, now."""
    deferred: _Deferred | None = getattr(_local, "deferred", None)
    if deferred is not None:
        _local.deferred = None
        _send(deferred)


def send_now(client: Any, prepared: PreparedRelease, done: Callable[[list[Any]], None],
             first: Sequence[First] = ()) -> None:
    """Send the writes ``first`` and then ``prepared``'s releases on ``client`` (the
    library's), in one round trip, now: each write's taker and ``done`` get their replies
    (an error in place of a reply). For a run whose releases no store takes."""
    calls = [call for call, _taker in first] + prepared.calls
    try:
        replies = run_scripts(client, calls) if calls else []
    except Exception as exc:  # noqa: BLE001 - Redis unreachable: they end with their leases
        replies = [exc] * len(calls)
    _take_first(first, replies[:len(first)])
    _call_done(done, replies[len(first):])


def _send(deferred: _Deferred, *, first: bool = True) -> None:
    """Send the releases (with ``first``, the writes before them) on the library's client."""
    send_now(deferred.client, deferred.prepared, deferred.done,
             deferred.first if first else ())


def _send_first(deferred: _Deferred, replies: Sequence[Any]) -> None:
    """Take the replies of ``first`` sent in the store's transaction; a write whose script
    the server had lost is sent again (loading it), before anything else."""
    missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
    replies = list(replies)
    if missing:
        try:
            again = run_scripts(deferred.client, [deferred.first[i][0] for i in missing])
        except Exception as exc:  # noqa: BLE001 - Redis unreachable: as the write's error
            again = [exc] * len(missing)
        for i, reply in zip(missing, again, strict=True):
            replies[i] = reply
    _take_first(deferred.first, replies)


def _take_first(first: Sequence[First], replies: Sequence[Any]) -> None:
    for (_call, taker), reply in zip(first, replies, strict=True):
        try:
            taker(reply)
        except Exception:  # a bug in the bookkeeping must not fail Celery's store
            log.exception("rediskit: finishing a write sent with a result failed")


def _finish(deferred: _Deferred, replies: list[Any]) -> None:
    _call_done(deferred.done, replies)


def _call_done(done: Callable[[list[Any]], None], replies: list[Any]) -> None:
    try:
        done(replies)
    except Exception:  # a bug in the bookkeeping must not fail Celery's store
        log.exception("rediskit: finishing the releases of a run failed")
