"""Renewing the Redis leases of one client: the ``renew_batch`` script, on a connection of its own.

Failure model. The renewer (``renewal.py``) gives every renewal target a thread of its own, so a
call stuck here delays no other client's renewals; this module bounds how long a call can be
stuck, and makes the common case one round trip:

- :func:`renewal_target` returns the one :class:`RedisRenewal` of a redis-py client, shared by
  every storage on that client (mutex and semaphore leases are renewed together).
- It talks over a dedicated connection, made from the client's own pool settings (host, auth,
  TLS, db, connection class) but with ``socket_timeout`` and ``socket_connect_timeout`` of
  :func:`renewal_timeout` (a quarter of the shortest lease being renewed, at most
  ``MAX_RENEWAL_TIMEOUT``, never above the client's own socket timeout) and no ``Retry``. A
  call against an unreachable server therefore fails within that timeout, never after
  redis-py's multi-second retries and backoff. The only retry is immediate and single: after a
  connection error (not a timeout) on a connection reused from an earlier call, such as one
  the server closed while idle, the call is sent once on a fresh connection.
- All leases go in one pipelined round trip, split into scripts of at most ``BATCH_COST``
  commands (about 66 locks with a companion key each) and ``BATCH_SIZE`` leases: Redis runs
  one script at a time, and a script over thousands of keys would stall every other client
  of the server for milliseconds (5,000 locks in one script: 10-25 ms).
- After a timeout or a connection error the connection is dropped (its state is unknown) and
  the next call opens a new one. After ``fork`` a child never uses its parent's connection.
- A lease's ``companion_keys`` (records that must live as long as the lease, such as the
  Celery layer's claims record of a task) ride in the same script as the lease: when the
  lease is renewed, each gets an expiry of no less than the lease (``PEXPIRE ... GT``; never
  created, never shortened). So they cost no extra round trip, and they stop being renewed
  with the lease: once it is released or lost they expire on their own unless deleted first.
  They must live on the lease's Redis (the same client).
- A Sentinel-managed client (``Sentinel.master_for``): the connection asks the sentinels for
  the master's address when it connects, and before each call the sentinels are asked
  which server is the master, and a connection to another one is dropped. After a failover
  the old master keeps serving the connections it has until the sentinels demote it (about
  10 s with their default timers), and leases renewed there are not renewed on the new
  master; this moves renewal to the new master at the next tick instead, so a lease copied
  to the promoted replica survives even when shorter than that window. (redis-py then also
  drops the client's idle pooled connections, so its next commands go to the new master.)
  If no sentinel answers, renewal carries on over the connection it has.
- A ``RedisCluster`` client has no single pool to copy: its leases are renewed through the
  client itself (one call per hash slot, as a script may only touch keys of one slot), with
  the client's own timeouts and retries. Renewal of other clients is still not delayed, and
  a lease is still marked lost by its deadline (``renewal.py``). A companion key in another
  hash slot than its lease cannot go in the lease's script: after the scripts, those of the
  leases renewed get their ``PEXPIRE ... GT`` in one more pipelined call (which is allowed to
  fail: the leases' results stand).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, NoScriptError, RedisError, ResponseError
from redis.retry import Retry

from .._validate import to_ms
from ..lease import Lease
from .scripts import load_script

__all__ = [
    "BATCH_COST",
    "BATCH_SIZE",
    "MAX_RENEWAL_TIMEOUT",
    "RedisRenewal",
    "lease_cost",
    "renew_in_batches",
    "renewal_target",
    "renewal_timeout",
]

log = logging.getLogger(__name__)

BATCH_SIZE = 250
"""The most leases one ``renew_batch`` script call renews."""

BATCH_COST = 200
"""The most Redis commands one ``renew_batch`` script call runs (:func:`lease_cost` of its
leases, added up): about 0.35 ms of server time, well under 1 ms on a loaded 2-core machine."""


def lease_cost(lease: Lease) -> int:
    """The commands ``renew_batch.lua`` runs to renew ``lease``: a lock's GET and PEXPIRE, a
    permit's ZSCORE, ZADD and PEXPIREAT, and one PEXPIRE per companion key."""
    return (2 if lease.kind.value == "m" else 3) + len(lease.companion_keys)

MAX_RENEWAL_TIMEOUT = 2.0
"""Seconds: the longest a renewal call waits for a connection or a reply, whatever the lease."""

# Pool settings that belong to the pool, not to a connection of our own: redis-py 8's
# maintenance-notification handler rewrites the timeouts of the pool's connections.
_POOL_ONLY = ("maint_notifications_pool_handler", "maint_notifications_config")


class _KeyedStorage(Protocol):
    """What a Redis storage tells the renewal: the key its ``renew_batch`` entry names."""

    def renewal_key(self, key: str) -> str: ...


def renewal_timeout(leases: Sequence[Lease], client_timeout: float | None = None) -> float:
    """Seconds a renewal call of ``leases`` may wait: a quarter of the shortest lease, at
    most ``MAX_RENEWAL_TIMEOUT`` and at most ``client_timeout`` (the client's own)."""
    timeout = min(MAX_RENEWAL_TIMEOUT, min(lease.lease_seconds for lease in leases) / 4)
    if client_timeout:
        timeout = min(timeout, float(client_timeout))
    return timeout


def _items(leases: Sequence[Lease]) -> list[tuple[str, str]]:
    # (key, kind) per lease; LeaseKind's values are the kinds renew_batch.lua expects.
    return [
        (cast(_KeyedStorage, lease.storage).renewal_key(lease.key), lease.kind.value)
        for lease in leases
    ]


def _chunks(leases: Sequence[Lease], indexes: list[int]) -> list[list[int]]:
    # Consecutive runs of ``indexes`` of at most BATCH_COST commands and BATCH_SIZE leases
    # (a lease costing more than BATCH_COST on its own goes alone).
    out: list[list[int]] = []
    chunk: list[int] = []
    cost = 0
    for i in indexes:
        weight = lease_cost(leases[i])
        if chunk and (cost + weight > BATCH_COST or len(chunk) >= BATCH_SIZE):
            out.append(chunk)
            chunk, cost = [], 0
        chunk.append(i)
        cost += weight
    if chunk:
        out.append(chunk)
    return out


def _call_args(
    leases: Sequence[Lease], items: list[tuple[str, str]], indexes: list[int],
    companions: Callable[[int], Sequence[str]] | None = None,
) -> tuple[list[str], list[Any]]:
    # KEYS and ARGV of one renew_batch.lua call: the leases' keys, then their companion keys
    # (``companions(i)``, default: all of lease i's); four values per lease.
    keys = [items[i][0] for i in indexes]
    args: list[Any] = []
    for i in indexes:
        extra = leases[i].companion_keys if companions is None else companions(i)
        args += [items[i][1], leases[i].owner, to_ms(leases[i].lease_seconds), len(extra)]
        keys += extra
    return keys, args


def _renew_elsewhere(client: Any, leases: Sequence[Lease], pending: list[tuple[int, str]],
                     results: list[bool]) -> None:
    # Cluster: the companion keys of other hash slots than their leases' (lease index, key),
    # for the leases just renewed, in one pipelined call. A failure is logged, not raised: the
    # leases were renewed, and a companion not extended now is extended at the next tick.
    pipe = client.pipeline(transaction=False)
    sent = 0
    for i, key in pending:
        if results[i]:
            pipe.execute_command("PEXPIRE", key, to_ms(leases[i].lease_seconds), "GT")
            sent += 1
    if not sent:
        return
    try:
        for reply in pipe.execute(raise_on_error=False):
            if isinstance(reply, Exception):
                raise reply
    except Exception as exc:
        log.warning("rediskit: extending %d companion key(s) of renewed leases failed: %s",
                    sent, exc)


def renew_in_batches(
    client: Any, leases: Sequence[Lease], items: list[tuple[str, str]]
) -> list[bool]:
    """Renew ``leases`` through ``client`` itself (its timeouts and retries); ``items`` gives
    (key, kind). One script call per hash slot on a cluster client, and per ``BATCH_COST``
    commands; then one pipelined call for companion keys in other slots than their lease."""
    script = load_script("renew_batch")
    groups: dict[Any, list[int]] = {}
    slot_of = getattr(client, "keyslot", None)
    slots = [slot_of(key) if slot_of else 0 for key, _kind in items]
    for i, slot in enumerate(slots):
        groups.setdefault(slot, []).append(i)
    elsewhere: list[tuple[int, str]] = []  # companion keys of another slot than their lease

    def same_slot(i: int) -> list[str]:
        mine = []
        for key in leases[i].companion_keys:
            if slot_of is None or slot_of(key) == slots[i]:
                mine.append(key)
            else:
                elsewhere.append((i, key))
        return mine

    results = [False] * len(leases)
    for indexes in groups.values():
        for chunk in _chunks(leases, indexes):
            keys, args = _call_args(leases, items, chunk, same_slot)
            for i, ok in zip(chunk, script.run(client, keys, args), strict=True):
                results[i] = bool(ok)
    if elsewhere:
        _renew_elsewhere(client, leases, elsewhere, results)
    return results


class RedisRenewal:
    """Renews leases of every storage on one redis-py client, over a connection of its own.

    One per client (see :func:`renewal_target`); the renewer calls :meth:`renew_leases` from
    the client's own thread. Calls are serialised: the connection carries one at a time.
    """

    def __init__(self, client: Any) -> None:
        self._client = weakref.ref(client)
        self._lock = threading.Lock()
        self._conn: Any = None
        self._timeout = 0.0
        self._pid = os.getpid()
        self.cluster = getattr(client, "connection_pool", None) is None

    def renew_leases(self, leases: Sequence[Lease]) -> list[bool]:
        """Renew each lease to its full length; True where its owner still held it.

        Raises redis-py's ``ConnectionError`` / ``TimeoutError`` when the server does not
        answer within :func:`renewal_timeout` (then nothing is known of any lease here)."""
        if not leases:
            return []
        if self._pid != os.getpid():  # a forked child: the lock and the socket are the parent's
            self._lock, self._conn, self._pid = threading.Lock(), None, os.getpid()
        client = self._client()
        if client is None:
            raise ConnectionError("the Redis client of these leases is gone")
        items = _items(leases)
        if self.cluster:
            return renew_in_batches(client, leases, items)
        with self._lock:
            return self._renew(client, leases, items)

    def idle(self) -> None:
        """Nothing left to renew for a while: close the connection (reopened on next use)."""
        if self._pid != os.getpid():
            return
        with self._lock:
            self._drop()

    def _renew(
        self, client: Any, leases: Sequence[Lease], items: list[tuple[str, str]]
    ) -> list[bool]:
        pool = client.connection_pool
        timeout = renewal_timeout(leases, pool.connection_kwargs.get("socket_timeout"))
        self._follow_sentinel_master(pool)
        script = load_script("renew_batch")
        calls = [_call_args(leases, items, chunk)
                 for chunk in _chunks(leases, list(range(len(leases))))]
        commands = [("EVALSHA", script.sha, len(keys), *keys, *args) for keys, args in calls]
        reused = self._conn is not None
        try:
            replies = self._send(pool, timeout, commands)
        except ConnectionError:
            if not reused:
                raise
            replies = self._send(pool, timeout, commands)  # once, on a fresh connection
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:  # the server forgot the script (restart, SCRIPT FLUSH): load it once
            loaded = self._send(pool, timeout, [("SCRIPT", "LOAD", script.source)])
            if isinstance(loaded[0], Exception):
                raise loaded[0]
            again = self._send(pool, timeout, [commands[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        results: list[bool] = []
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
            results.extend(bool(ok) for ok in reply)
        return results

    def _send(self, pool: Any, timeout: float, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` in one round trip; error replies are returned in place."""
        conn = self._connection(pool, timeout)
        try:
            conn.send_packed_command(conn.pack_commands(commands), check_health=False)
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except ResponseError as exc:
                    replies.append(exc)
            return replies
        except BaseException:
            self._drop()  # a timeout or a broken connection: its state is unknown
            raise

    def _follow_sentinel_master(self, pool: Any) -> None:
        # A Sentinel pool: drop a connection to a server the sentinels no longer name.
        ask = getattr(pool, "get_master_address", None)
        conn = self._conn
        if ask is None or conn is None:
            return
        try:
            host, port = ask()
        except RedisError as exc:  # no sentinel answers: keep the connection we have
            log.debug("rediskit: no sentinel named the master (%s)", exc)
            return
        if (conn.host, int(conn.port)) != (host, int(port)):
            log.info("rediskit: the sentinels name %s:%s as master now: renewing there",
                     host, port)
            self._drop()

    def _connection(self, pool: Any, timeout: float) -> Any:
        conn = self._conn
        # A shorter lease needs a shorter timeout at once; a longer one only when it is much
        # longer, so leases of different lengths coming and going do not churn connections.
        if conn is not None and not self._timeout <= timeout <= 4 * self._timeout:
            self._drop()
            conn = None
        if conn is None:
            kwargs = {k: v for k, v in pool.connection_kwargs.items() if k not in _POOL_ONLY}
            kwargs.update(
                socket_timeout=timeout, socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 0), health_check_interval=0,
            )
            for name in ("orig_socket_timeout", "orig_socket_connect_timeout"):
                if name in kwargs:
                    kwargs[name] = timeout
            conn = pool.connection_class(**kwargs)
            # Connected here, not by the first command sent: a Sentinel-managed connection
            # looks the master up in connect(), which sending skips (it would then go to
            # the default address, localhost:6379).
            conn.connect()
            self._conn = conn
            self._timeout = timeout
        return conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # closing a broken socket: nothing more to do
                conn.disconnect()


_targets: weakref.WeakKeyDictionary[Any, RedisRenewal] = weakref.WeakKeyDictionary()
_targets_lock = threading.Lock()


def _new_lock_in_child() -> None:
    global _targets_lock
    _targets_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_in_child)


def renewal_target(client: Any) -> RedisRenewal:
    """The :class:`RedisRenewal` of ``client`` (one per client, dropped with it)."""
    target = _targets.get(client)
    if target is None:
        with _targets_lock:
            target = _targets.get(client)
            if target is None:
                target = _targets[client] = RedisRenewal(client)
    return target
