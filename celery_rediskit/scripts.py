"""Loads the Lua scripts from ``lua/*.lua`` and runs them by EVALSHA.

A script whose header has ``-- needs: NAME`` gets ``lua/NAME.lua`` (and what that needs)
prepended, so shared Lua (the waiter queue, the semaphore state) is written once. Calls go
through ``execute_command("EVALSHA", ...)`` directly: the ``Script`` object of redis-py adds
microseconds per call on the hot path. When the server has forgotten a script (restart,
a script cache reset), it is loaded again and re-run.
"""

from __future__ import annotations

import hashlib
import inspect
import re
from functools import cache
from importlib import resources
from typing import Any

from redis.connection import ConnectionPool
from redis.exceptions import ConnectionError, NoScriptError, ResponseError, TimeoutError

__all__ = ["LuaScript", "as_text", "call", "call_many", "load_script"]

_NEEDS = re.compile(r"^-- needs: (\w+)\s*$", re.MULTILINE)
_PLACE = re.compile(r"^-- libraries here\s*$", re.MULTILINE)


def _get_connection_needs_name() -> bool:
    # redis-py before 5.3 requires get_connection(command_name); 5.3 made the argument
    # optional and warns (DeprecationWarning) on every call that passes it.
    param = inspect.signature(ConnectionPool.get_connection).parameters.get("command_name")
    return param is not None and param.default is inspect.Parameter.empty


_NAMED = _get_connection_needs_name()


class LuaScript:
    """One Lua script: its source and SHA1; ``run`` calls it with EVALSHA on any client."""

    __slots__ = ("name", "source", "sha")

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def run(self, client: Any, keys: list[str], args: list[Any]) -> Any:
        """Run on ``client`` (a redis-py client or cluster client) with ``keys`` and ``args``."""
        try:
            return call(client, "EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            client.script_load(self.source)  # on a cluster client: every primary
            return client.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)


    def run_many(self, client: Any, calls: list[list[str]]) -> list[Any]:
        """Run this script once per key list in ``calls`` (no ARGV), all in one round trip;
        the replies in order. An error reply is raised."""
        commands = [("EVALSHA", self.sha, len(keys), *keys) for keys in calls]
        replies = call_many(client, *commands)
        if any(isinstance(r, NoScriptError) for r in replies):
            client.script_load(self.source)
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


def call(client: Any, *args: Any) -> Any:
    """Send one command and read its reply: a lean path for the library's hot commands.

    On a plain ``redis.Redis`` this borrows a connection from the client's own pool and talks
    to it directly, skipping redis-py's per-command retry closure and metrics bookkeeping
    (about a third of its client-side cost). Any connection trouble hands the command to
    ``client.execute_command``, so redis-py's retry policy still applies; error replies are
    raised as usual. Other clients (cluster, single-connection) always take the normal path.
    """
    pool = getattr(client, "connection_pool", None)
    if pool is None or getattr(client, "connection", None) is not None:
        return client.execute_command(*args)
    conn = pool.get_connection(args[0]) if _NAMED else pool.get_connection()
    try:
        conn.send_command(*args)
        return conn.read_response()
    except ResponseError:
        raise  # an error reply: the connection is fine
    except Exception:
        conn.disconnect()  # unknown state: drop it and let redis-py retry as it would
        return client.execute_command(*args)
    finally:
        pool.release(conn)


def _read(name: str) -> str:
    return resources.files(__package__).joinpath("lua", f"{name}.lua").read_text()


def _with_libraries(name: str, seen: list[str]) -> None:
    # Depth-first: a library's own needs come before it; each file appears once.
    for lib in _NEEDS.findall(_read(name)):
        if lib not in seen:
            _with_libraries(lib, seen)
    if name not in seen:
        seen.append(name)


@cache
def load_script(name: str) -> LuaScript:
    """The script ``lua/<name>.lua`` with its ``-- needs:`` libraries (cached).

    Libraries go where the script has a line ``-- libraries here``, else at the top. Lua
    creates a script's local functions on every call, so a script can keep its fast path above
    that line and pay for the libraries only when it gets past it.
    """
    order: list[str] = []
    _with_libraries(name, order)
    libraries = "\n".join(_read(part) for part in order[:-1])
    body = _read(name)
    if _PLACE.search(body):
        return LuaScript(name, _PLACE.sub(lambda _: libraries, body, count=1))
    return LuaScript(name, "\n".join(filter(None, [libraries, body])))


def call_many(client: Any, *commands: tuple[Any, ...]) -> list[Any]:
    """Send several commands in one round trip (not atomic) and return their replies.

    Error replies are returned in place as exception objects, not raised, so one failing
    command does not hide the others' results. Uses the lean path of :func:`call` on a plain
    ``redis.Redis``, a non-transactional pipeline elsewhere.
    """
    if not commands:
        return []
    pool = getattr(client, "connection_pool", None)
    if pool is None or getattr(client, "connection", None) is not None:
        pipe = client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(pipe.execute(raise_on_error=False))
    conn = pool.get_connection(commands[0][0]) if _NAMED else pool.get_connection()
    try:
        conn.send_packed_command(conn.pack_commands(commands))
        replies = []
        for _ in commands:
            try:
                replies.append(conn.read_response())
            except ResponseError as exc:
                replies.append(exc)
        return replies
    except Exception:
        conn.disconnect()
        raise
    finally:
        pool.release(conn)
