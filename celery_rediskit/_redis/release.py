"""Releases that tell the truth when their reply is lost.

A release can reach Redis and run while its reply is lost: the connection resets or times out
between the server's write and the client's read. The client then sends it again (redis-py's
retry policy does, and so does the lean path of :func:`~._redis.scripts.call`, which falls back
to ``execute_command``). That second send finds the caller holding nothing: on its own it
would answer "not released", and the hand-over to a waiting thread of this process, which the
lost reply carried, would never happen (the waiter would learn of its grant only at the end of
its bounded wait).

So every release call carries a *release id*, the same in every send of that call and new for
each call (a counter of this process), and a release that gives something back records its id
in the calling thread's *release record* of the resource,
``<resource>:released:<process id>/<thread id>`` (same hash tag as the resource), kept for
:data:`RECORD_MS`. A send that finds the caller not holding, but its own id recorded, is a
re-send of a release that ran: it changes nothing and answers "released", naming the holders
of the calling process so that the caller wakes any of them still waiting for the grant the
lost reply carried (waking an owner that waits for nothing does nothing). A new call of
``release`` for the same owner has a new id and answers "not released", as before.

Why one record per thread: a thread re-sends its release before it does anything else, so no
other release can overwrite its record in between, while other threads of the process release
the same resource meanwhile (one record per resource or per process would be overwritten by
them). Under gevent or eventlet the thread id is the greenlet's.

What it costs: one ``SET ... PX`` on a key that usually exists already, in every successful
release (about 1.3 µs of server time, no extra round trip), and one small key per resource and
releasing thread, gone :data:`RECORD_MS` after that thread's last release of it. (A list per
process cost more: ``LPUSH``, ``LTRIM`` and ``PEXPIRE``; a new key per release made Redis
create and expire thousands of keys a second under a busy lock.) The limit: a re-send that
arrives more than :data:`RECORD_MS` after the first send ran (a socket timeout plus retries
longer than that) answers "not released" again, and a waiter it would have woken asks Redis
again at the end of its bounded wait.
"""

from __future__ import annotations

import itertools
from threading import get_ident

from ..lease import process_id

__all__ = ["NO_PROCESS", "RECORD_MS", "record_key", "release_id"]

RECORD_MS = 15_000
"""How long a release record is kept, ms: covers a 5 s socket timeout plus redis-py's default
retry backoff (10 retries, at most about 5.3 s in all) with room to spare."""

NO_PROCESS = "-"
"""The process id a release without a record names (its record lifetime is 0): no owner id
starts with it, so a waiter the release hands over to is woken by message, even one of the
calling process. Such a release is sent where a re-send is told apart otherwise: inside the
script storing a task's result (``integration/with_result.py``), whose re-send finds the result
stored. It spares the record's write: one ``SET`` of a new key per run, and its expiry."""

_ids = itertools.count(1)


def release_id() -> str:
    """A new id for one release call (unique in this process)."""
    return str(next(_ids))


def record_key(base: str) -> str:
    """The calling thread's release record of the resource whose keys start with ``base``."""
    return f"{base}:released:{process_id()}/{get_ident()}"
