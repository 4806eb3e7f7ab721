"""Loads the Lua scripts from ``lua/*.lua`` and runs them by EVALSHA.

Scripts are put together by :func:`compose`: ``-- needs: NAME`` includes a library
(``lua/NAME.lua``) and ``-- then: NAME`` continues into another script, so shared Lua (the
clock, the waiter queue, the semaphore state, the mutex's acquire and release) is written
once. Calls go through ``execute_command("EVALSHA", ...)`` directly: the ``Script`` object of
redis-py adds microseconds per call on the hot path. When the server has forgotten a script
(restart, a script cache reset), it is loaded again and re-run.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import re
import threading
from functools import cache
from importlib import resources
from typing import Any

from redis.client import NEVER_DECODE
from redis.connection import ConnectionPool
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ConnectionError,
    NoScriptError,
    ResponseError,
    TimeoutError,
    TryAgainError,
)

from .slots import key_slot, through_migration

__all__ = [
    "LuaScript",
    "as_text",
    "call",
    "call_many",
    "compose",
    "is_traced",
    "load_script",
    "trace_commands",
    "wrapped_script",
]

_NEEDS = re.compile(r"^-- needs: (\w+)\s*$", re.MULTILINE)
_THEN = re.compile(r"^-- then: (\w+)\s*$", re.MULTILINE)
_EARLY = re.compile(r"^-- early:", re.MULTILINE)
_PLACE = re.compile(r"^-- libraries here\s*$", re.MULTILINE)
_WRAPPED = re.compile(r"^-- the wrapped script here\s*$", re.MULTILINE)


def _get_connection_needs_name() -> bool:
    # redis-py before 5.3 requires get_connection(command_name); 5.3 made the argument
    # optional and warns (DeprecationWarning) on every call that passes it.
    param = inspect.signature(ConnectionPool.get_connection).parameters.get("command_name")
    return param is not None and param.default is inspect.Parameter.empty


_NAMED = _get_connection_needs_name()


def _connection(pool: Any, command: Any) -> Any:
    """A connection from ``pool``, naming ``command`` where this redis-py requires it."""
    return pool.get_connection(command) if _NAMED else pool.get_connection()


# Each thread keeps the connection of its last lean call checked out of the pool, for the next
# one: checking a connection out and back in costs more CPU than the round trip itself (the
# pool's lock and bookkeeping, and a poll of the socket for unread data, which a connection used
# only here never has: every reply is read, or the connection is dropped).
_local = threading.local()
_generation = 0  # bumped in a forked child: a connection of the parent is never used there


def _after_fork_in_child() -> None:
    global _generation
    _generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


class _Held:
    """A connection checked out of ``pool`` by this thread (the pool counts it in use)."""

    __slots__ = ("conn", "generation", "pool")

    def __init__(self, pool: Any, conn: Any) -> None:
        self.pool, self.conn, self.generation = pool, conn, _generation

    def give_back(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None and self.generation == _generation:  # not a parent's, after fork
            self.pool.release(conn)

    def __del__(self) -> None:  # the thread ended (its locals went): back to the pool
        with contextlib.suppress(Exception):
            self.give_back()


def _checkout(pool: Any, command: Any) -> _Held:
    held: _Held | None = getattr(_local, "held", None)
    if held is not None:
        _local.held = None  # in use: a nested call (another frame of this thread) takes its own
        if held.pool is pool and held.generation == _generation and held.conn is not None:
            if _still_good(held.conn):
                return held
            held.conn.disconnect()  # the server closed it (a restart): the pool reconnects
        held.give_back()
    return _Held(pool, _connection(pool, command))


def _still_good(conn: Any) -> bool:
    """Whether a connection kept since an earlier call can be used as it is: nothing is
    waiting to be read on it (an idle connection that turns readable was closed by the server,
    or holds a stray reply). One zero-timeout poll, the check redis-py's pool makes at every
    checkout; without it the first command after a server restart would fail."""
    try:
        return not conn.can_read(timeout=0)
    except (ConnectionError, TimeoutError, OSError):
        return False


def _checkin(held: _Held) -> None:
    if getattr(_local, "held", None) is None:
        _local.held = held
    else:
        held.give_back()


class LuaScript:
    """One Lua script: its source and SHA1; ``run`` calls it with EVALSHA on any client."""

    __slots__ = ("name", "source", "sha")

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def run(self, client: Any, keys: list[str], args: list[Any], *, raw: bool = False) -> Any:
        """Run on ``client`` (a redis-py client or cluster client) with ``keys`` and ``args``;
        ``raw``: strings in the reply come back as bytes whatever the client decodes."""
        try:
            return call(client, "EVALSHA", self.sha, len(keys), *keys, *args, raw=raw)
        except NoScriptError:
            self.load(client)
            return call(client, "EVALSHA", self.sha, len(keys), *keys, *args, raw=raw)

    def load(self, client: Any) -> None:
        """Load the script where :func:`call` runs it: on a plain client over the very
        connection this thread calls through (after a Sentinel failover it may still talk to
        the old master until that refuses writes), on a cluster client on every primary."""
        if getattr(client, "connection_pool", None) is None:
            client.script_load(self.source)
        else:
            call(client, "SCRIPT", "LOAD", self.source)


    def run_many(self, client: Any, calls: list[list[str]]) -> list[Any]:
        """Run this script once per key list in ``calls`` (no ARGV), all in one round trip;
        the replies in order. An error reply is raised."""
        commands = [("EVALSHA", self.sha, len(keys), *keys) for keys in calls]
        replies = call_many(client, *commands)
        if any(isinstance(r, NoScriptError) for r in replies):
            self.load(client)
            replies = call_many(client, *commands)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    def run_after(
        self, client: Any, before: tuple[Any, ...], keys: list[str], args: list[Any]
    ) -> Any:
        """Send the command ``before`` and then this script in one round trip (not atomic);
        return the script's reply. An error reply to ``before`` is raised.

        After a connection error it is unknown which of the two ran, so both are sent again
        through the client's retry policy: use it only when both are idempotent.
        """
        try:
            first, reply = call_many(
                client, before, ("EVALSHA", self.sha, len(keys), *keys, *args)
            )
        except (ConnectionError, TimeoutError):
            call(client, *before)
            return self.run(client, keys, args)
        if isinstance(first, Exception):
            raise first
        if isinstance(reply, NoScriptError):
            return self.run(client, keys, args)  # loads the script, then runs it
        if isinstance(reply, Exception):
            raise reply
        return reply


def as_text(value: Any) -> str:
    """A reply (bytes, or str with ``decode_responses=True``) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


_RAW = {NEVER_DECODE: True}  # execute_command's option for "do not decode this reply"

_TRACED = "_rediskit_trace_commands"  # the client attribute trace_commands() sets


def trace_commands(client: Any, enabled: bool = True) -> Any:
    """Route the library's commands on ``client`` through redis-py's public paths, where
    tracing (OpenTelemetry's redis instrumentation) and other wrappers see them; returns
    ``client``.

    By default :func:`call` and :func:`call_many` talk to a connection of the client's pool
    directly, past ``Redis.execute_command`` (about a third of redis-py's client-side cost).
    With ``enabled``, :func:`call` sends through ``client.execute_command`` and
    :func:`call_many` through ``client.pipeline(transaction=False)``: every storage, cache
    and task using this client follows (it is a mark on the client object). Lease renewals
    (their own connection, with a timeout bounded by the lease) and the wake-up subscriber
    keep their own paths. The cost is measured by ``make bench`` (mutex section)."""
    setattr(client, _TRACED, bool(enabled))
    return client


def is_traced(client: Any) -> bool:
    """True when :func:`trace_commands` routed ``client``'s commands through redis-py."""
    return bool(getattr(client, _TRACED, False))


def call(client: Any, *args: Any, raw: bool = False) -> Any:
    """Send one command and read its reply: a lean path for the library's hot commands.

    ``raw``: string replies come back as bytes even from a ``decode_responses=True`` client
    (for stored payloads, which need not be text).

    On a plain ``redis.Redis`` this talks directly to a connection of the client's own pool,
    skipping redis-py's per-command retry closure and metrics bookkeeping; each thread keeps
    the connection of its last call checked out for the next one (given back to the pool when
    the thread ends or uses another client), which halves the client's CPU per round trip.
    Error replies are raised as usual.

    After a connection error or timeout the command may or may not have run: the connection is
    dropped and the command sent again through ``client.execute_command``, so redis-py's retry
    policy applies from there. Every command the library sends this way gives the same answer
    when it is sent twice (a release carries a release id for that; see ``release.py``). Any
    other exception (``KeyboardInterrupt``, Celery's ``SoftTimeLimitExceeded`` raised into the
    read) drops the connection, whose reply is now unknown, and propagates without a re-send.
    Other clients (cluster, single-connection) always take the normal path; on a cluster
    client a command whose keys a slot migration splits is retried a while
    (:func:`~.slots.through_migration`).
    """
    options = _RAW if raw else {}
    pool = getattr(client, "connection_pool", None)
    if getattr(client, _TRACED, False):  # trace_commands(): the public path, seen by tracers
        if pool is None:
            return through_migration(lambda: client.execute_command(*args, **options))
        return client.execute_command(*args, **options)
    if pool is None:  # a cluster client
        return _cluster_call(client, args, raw)
    if getattr(client, "connection", None) is not None:
        return client.execute_command(*args, **options)
    held = _checkout(pool, args[0])
    conn = held.conn
    try:
        conn.send_command(*args)
        reply = conn.read_response(disable_decoding=raw)
    except ResponseError:
        _checkin(held)
        raise  # an error reply: the connection is fine
    except (ConnectionError, TimeoutError, OSError):
        conn.disconnect()  # unknown state: drop it and send again (below)
        held.give_back()  # to the pool, where the re-send takes it (to wherever it reconnects)
    except BaseException:
        conn.disconnect()  # a reply may still be on its way: never reuse this connection
        held.give_back()
        raise
    else:
        _checkin(held)
        return reply
    return client.execute_command(*args, **_RAW) if raw else client.execute_command(*args)


# Where the key of each command sent through call() on a cluster client is (argument index),
# to send it straight to the primary serving the key's slot.
_KEY_AT = {"EVALSHA": 3, "GET": 1, "SET": 1}


def _cluster_call(client: Any, args: tuple[Any, ...], raw: bool) -> Any:
    """:func:`call` on a ``RedisCluster``: the lean path on the pool of the primary that the
    client's slot table names for the command's key (the library's scripts name keys of one
    slot). Whatever that cannot settle goes through ``client.execute_command``, which follows
    redirections and learns the cluster's new layout: no key, a slot not in the table, MOVED,
    ASK, TRYAGAIN or CLUSTERDOWN (the command did not run), or a connection error (it may have:
    sent again, as :func:`call` does). A slot migration splitting the keys is waited out
    (:func:`~.slots.through_migration`)."""
    position = _KEY_AT.get(args[0])
    if position is not None and len(args) > position and (args[0] != "EVALSHA" or args[2]):
        nodes = client.nodes_manager.slots_cache.get(key_slot(args[position]))
        node_client = nodes[0].redis_connection if nodes else None
        if node_client is not None:
            pool = node_client.connection_pool
            try:
                conn = _connection(pool, args[0])
            except (ConnectionError, TimeoutError, OSError):
                conn = None  # the node is down: the client's path learns the new layout
            if conn is not None:
                try:
                    conn.send_command(*args)
                    return conn.read_response(disable_decoding=raw)
                except (AskError, TryAgainError, ClusterDownError):  # MOVED is an AskError
                    pass  # not run here: the client's own path follows the redirection
                except ResponseError:
                    raise  # an error reply: the connection is fine
                except (ConnectionError, TimeoutError, OSError):
                    conn.disconnect()  # unknown state: drop it and send again (below)
                except BaseException:
                    conn.disconnect()  # a reply may still be on its way: never reuse it
                    raise
                finally:
                    pool.release(conn)
    options = _RAW if raw else {}
    return through_migration(lambda: client.execute_command(*args, **options))


def _read(name: str) -> str:
    return resources.files("celery_rediskit").joinpath("lua", f"{name}.lua").read_text()


def _with_libraries(name: str, seen: list[str]) -> None:
    # Depth-first: a library's own needs come before it; each file appears once.
    for lib in _NEEDS.findall(_read(name)):
        if lib not in seen:
            _with_libraries(lib, seen)
    if name not in seen:
        seen.append(name)


def compose(name: str) -> str:
    """The source of script ``name`` with its libraries and the scripts it continues into.

    The one way scripts are put together:

    - ``-- needs: LIB`` includes ``lua/LIB.lua`` (and what it needs) once per composed script.
      Libraries go where the script has a line ``-- libraries here``, else at its top; a
      library whose header says ``-- early:`` always goes at the top (the clock, which fast
      paths use). Lua creates a script's local functions on every call, so a script keeps its
      fast path above that line and pays for the libraries only when it gets past it.
    - ``-- then: NAME`` appends script ``NAME`` (with its own libraries, less those included
      already): a prefix such as the cache's claim runs, then falls into the mutex's own code.
    """
    included: list[str] = []
    pieces: list[str] = []
    part: str | None = name
    while part is not None:
        raw = body = _read(part)
        order: list[str] = []
        _with_libraries(part, order)
        libraries = [lib for lib in order[:-1] if lib not in included]
        included.extend(libraries)
        early = [_read(lib) for lib in libraries if _EARLY.search(_read(lib))]
        late = "\n".join(_read(lib) for lib in libraries if not _EARLY.search(_read(lib)))
        marker = _PLACE.search(body)
        if marker is not None:
            before, _, after = body.partition(marker.group(0))
            body = before + late + after
        elif late:
            body = late + "\n" + body
        pieces.extend(early)
        pieces.append(body)
        follows = _THEN.search(raw)
        part = follows.group(1) if follows else None
    return "\n".join(pieces)


@cache
def load_script(name: str) -> LuaScript:
    """The script ``lua/<name>.lua`` as :func:`compose` puts it together (cached)."""
    return LuaScript(name, compose(name))


@cache
def wrapped_script(outer: str, inner: str) -> LuaScript:
    """Script ``outer`` with script ``inner`` inside it (cached): ``inner``, composed, becomes
    the body of a local function ``wrapped()`` where ``outer`` has a line ``-- the wrapped
    script here``. ``inner`` sees the same KEYS and ARGV (it reads only its own first ones);
    its ``return`` ends the function, not the script, so ``outer`` goes on after it (see
    ``lua/store_after.lua``)."""
    body = compose(outer)
    marker = _WRAPPED.search(body)
    if marker is None:
        raise ValueError(f"lua/{outer}.lua has no line '-- the wrapped script here'")
    before, _, after = body.partition(marker.group(0))
    function = f"local function wrapped()\n{compose(inner)}\nend"
    return LuaScript(f"{outer}({inner})", before + function + after)


def call_many(client: Any, *commands: tuple[Any, ...]) -> list[Any]:
    """Send several commands in one round trip (not atomic) and return their replies.

    Error replies are returned in place as exception objects, not raised, so one failing
    command does not hide the others' results. Uses the lean path of :func:`call` on a plain
    ``redis.Redis``, a non-transactional pipeline elsewhere (and on a client marked by
    :func:`trace_commands`). No commands: no replies.
    """
    if not commands:
        return []
    pool = getattr(client, "connection_pool", None)
    if pool is None or getattr(client, "connection", None) is not None \
            or getattr(client, _TRACED, False):
        pipe = client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(pipe.execute(raise_on_error=False))
    held = _checkout(pool, commands[0][0])
    conn = held.conn
    try:
        conn.send_packed_command(conn.pack_commands(commands))
        replies = []
        for _ in commands:
            try:
                replies.append(conn.read_response())
            except ResponseError as exc:
                replies.append(exc)
    except BaseException:
        # A broken connection, or an interruption (a soft time limit raised into the read):
        # replies may still be on their way, so the connection is never reused as it is.
        conn.disconnect()
        held.give_back()
        raise
    _checkin(held)
    return replies
