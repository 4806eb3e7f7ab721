"""Waking waiters when a lock or permit is handed to them.

Release scripts hand ownership straight to the first live waiter in Redis and then tell it:
by publishing ``"<waiter id> <token> <ms since its check-in> <check-in no.>"`` on the
waiter's process channel, or, when the waiter lives in the releasing process, by returning that
text so the releaser wakes it directly. The last two fields let the waiter date the grant on
its own clock, from when it sent the check-in the message names: a grant learned late is
renewed to its full lease before acquire returns (see ``waiting.py``).

Each process has one id (``lease.process_id()``, new after ``fork``), one registry of local waiters,
and, per Redis client, one pub/sub connection. There is no listener thread: one of the waiting
threads reads the connection (leader/follower), delivers what it reads to the others and,
when its own grant arrives, hands the reading over. A process with a single waiter (a Celery
prefork child) so gets its grant straight from the socket, without a thread hop.

Failure model. A message is lost when it is published while the connection is down or being
re-established, or when a NAT or load balancer silently drops the idle connection (neither
side is told). So, while anyone waits, the reading thread PINGs the connection after
``HEALTH_IDLE`` seconds of silence and counts it dead when the PING is not answered within
``HEALTH_TIMEOUT``; a dead or broken connection is replaced, and only once the server has
confirmed the new SUBSCRIBE does the hub bump its ``generation``, which sends every waiter back
to Redis to look for a grant it missed. Independently, no wait sleeps longer than a short
re-check interval (``waiting.py``), so a lost message costs at most that interval.

Redis Cluster (:class:`ShardedWakeupHub`). A grant is published with ``SPUBLISH`` on a channel
of the key's own slot, ``<prefix>:wake:{<slot tag>}:<process id>`` (see ``keys.py``), so it
goes only to the shard serving the key, never to every node as a plain ``PUBLISH`` does. A
process subscribes (``SSUBSCRIBE``) per slot it waits on, on the master serving that slot, over
one connection per master. Subscriptions move with the cluster: when a slot migrates, the old
master ends them (``sunsubscribe``), when a master dies its connection breaks, and a subscribe
sent to the wrong node is answered MOVED. Each time, the hub refreshes the client's view of
the cluster, subscribes again where the slot now lives, and once that is confirmed bumps its
``generation`` (every waiter asks Redis again). While a slot migrates, a grant published by a
script running on the importing master (ASK) does not reach a subscriber still on the old one:
such a grant is found at the next re-check. Channels of slots not used for
``SHARDED_IDLE`` seconds are dropped once more than ``SHARDED_CHANNELS`` are subscribed.
"""

from __future__ import annotations

import _thread
import contextlib
import inspect
import logging
import os
import select
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..lease import ABORT_CHECK, process_id
from .slots import is_cluster, key_slot

__all__ = [
    "HEALTH_IDLE",
    "HEALTH_TIMEOUT",
    "SHARDED_CHANNELS",
    "SHARDED_IDLE",
    "ShardedWakeupHub",
    "WaitSlot",
    "WakeupHub",
    "hand_over_local",
    "hub_for",
    "wake_local",
]


def _read_options() -> dict[str, Any]:
    # What redis-py's own pub/sub passes to read_response, as far as this redis-py has it:
    # disconnect_on_error since 4.6 (before, a read error always disconnects, which the
    # readers here do anyway), push_request since 5.0 (RESP3 push messages).
    accepted = inspect.signature(redis.connection.Connection.read_response).parameters
    wanted = {"disconnect_on_error": False, "push_request": True}
    return {name: value for name, value in wanted.items() if name in accepted}


_READ_OPTIONS = _read_options()

log = logging.getLogger(__name__)

HEALTH_IDLE = 1.0
"""Seconds of silence on a wake-up connection, while someone waits, before it is PINGed."""
HEALTH_TIMEOUT = 1.0
"""Seconds a PING may go unanswered before the wake-up connection counts as dead."""
_SOCKET_TIMEOUT = 2.0  # upper bound of the wake-up connection's socket timeouts on reconnect
SHARDED_CHANNELS = 256
"""Redis Cluster: subscribed slot channels past which idle ones are dropped."""
SHARDED_IDLE = 300.0
"""Redis Cluster: seconds a slot channel must have gone unused before it may be dropped."""


class _ProcessState:
    def __init__(self) -> None:
        self.slots: dict[str, WaitSlot] = {}
        self.hubs: dict[int, tuple[weakref.ref[Any], WakeupHub]] = {}
        self.lock = threading.Lock()


_state = _ProcessState()


def _after_fork_in_child() -> None:
    # A child inherits neither the parent's waiters nor its pub/sub connections.
    global _state
    _state = _ProcessState()


os.register_at_fork(after_in_child=_after_fork_in_child)


class WaitSlot:
    """Where a waiting thread is told it was granted: ``token`` is set, then it is woken.

    A pre-acquired lock is the wake-up signal: far cheaper to create than an ``Event``, and
    created on every contended acquisition. ``after`` is how long after the waiter's check-in
    number ``checkin`` the grant was made (seconds, on the server's clock; both None when the
    message did not say); ``reading`` is the hub whose connection the waiter reads now, in its
    thread ``thread``.
    """

    __slots__ = ("_signal", "after", "checkin", "reading", "thread", "token")

    def __init__(self) -> None:
        self._signal = _thread.allocate_lock()
        self._signal.acquire()
        self.thread = 0  # get_ident() of the thread reading for this slot (while ``reading``)
        self.token: int | None = None
        self.after: float | None = None
        self.checkin: int | None = None
        self.reading: WakeupHub | None = None

    def grant(self, token: int, after: float | None, checkin: int | None) -> None:
        self.after = after
        self.checkin = checkin
        self.token = token
        self.poke()

    def poke(self) -> None:
        """Wake the waiter (to look at its token, the hub's generation, or to take over
        reading)."""
        with contextlib.suppress(RuntimeError):  # woken already
            self._signal.release()

    def sleep(self, timeout: float | None) -> bool:
        """Sleep until poked or ``timeout`` seconds pass (None: no limit); True if poked."""
        return self._signal.acquire(timeout=-1 if timeout is None else max(0.0, timeout))


def register_slot(owner: str) -> WaitSlot:
    slot = WaitSlot()
    _state.slots[owner] = slot
    return slot


def drop_slot(owner: str) -> None:
    _state.slots.pop(owner, None)


def hand_over_local(message: str | bytes) -> None:
    """A release handed its lock or permit to a waiter of this process (the script returned
    ``"<waiter id> <token>"``): wake it, and let it take the GIL now rather than when the
    releasing thread next blocks."""
    wake_local(message)
    time.sleep(0)


def wake_local(message: str | bytes) -> None:
    """Deliver ``"<waiter id> <token> [<ms since its check-in> <check-in no.>]"`` to a waiter
    of this process, if it still waits."""
    text = message.decode() if isinstance(message, bytes) else message
    owner, token, *dated = text.split(" ")
    slot = _state.slots.get(owner)
    if slot is not None:
        if len(dated) == 2:
            slot.grant(int(token), int(dated[0]) / 1000, int(dated[1]))
        else:
            slot.grant(int(token), None, None)
        reading = slot.reading
        if reading is not None and slot.thread != _thread.get_ident():
            # It sleeps in poll() on its socket: nudge it. Not when this is its own thread,
            # reading its own grant (a single waiter's hand-over): it looks at its slot next.
            reading.interrupt()


class _Unanswered(Exception):
    """The wake-up connection did not answer a PING in time (it was silently dropped)."""


class WakeupHub:
    """The pub/sub connection of one Redis client in this process, read by its waiters.

    ``ensure(prefix)`` subscribes once and waits for the server's confirmation, so a grant
    published after the caller joins a queue cannot be missed for lack of a subscription.
    ``wait(slot, ...)`` sleeps a waiter until its grant, reading the connection itself when
    nobody else does. ``generation`` rises each time the subscription is confirmed again after
    the connection was lost: a waiter that last asked Redis in an older generation may have
    missed its grant, and asks again.
    """

    def __init__(self, client: Any) -> None:
        self._client = weakref.ref(client)  # weak: the hub must not keep a discarded client
        self._pubsub: Any = None
        self._subscribed: set[str] = set()  # channel prefixes whose channel is confirmed
        self._confirmed: dict[str, threading.Event] = {}
        self._channels: dict[str, str] = {}  # channel -> its prefix
        self._lock = threading.Lock()  # guards subscribing and every write to the connection
        self._reader = threading.Lock()  # held by the thread reading the socket
        self._waiting: set[WaitSlot] = set()
        self._failures = 0
        self._lost = False  # the connection was lost; the new subscription is not confirmed yet
        self._heard = 0.0  # time.monotonic() when the connection last proved alive
        self._ping_sent: float | None = None  # when an unanswered health-check PING was sent
        self.generation = 0
        # A pipe the reading thread also selects on, so a grant handed over inside this
        # process wakes it at once even though nothing arrives on its socket.
        self._poller: Any = None
        self.closed = False
        self._polled_sock: Any = None
        self._nudge_r, self._nudge_w = os.pipe()
        os.set_blocking(self._nudge_r, False)
        os.set_blocking(self._nudge_w, False)

    def close(self) -> None:
        """Close the pub/sub connection and the nudge pipe (the client is gone)."""
        self.closed = True
        with contextlib.suppress(Exception):
            if self._pubsub is not None:
                self._pubsub.close()
        for fd in (self._nudge_r, self._nudge_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def interrupt(self) -> None:
        """Wake the thread reading the socket (it then looks at its slot)."""
        with contextlib.suppress(BlockingIOError):  # the pipe is full: it will wake anyway
            os.write(self._nudge_w, b"!")

    def ready(self, channel_prefix: str) -> bool:
        """True once this process's channel under ``channel_prefix`` is subscribed and
        confirmed (a set lookup: the hot path)."""
        return channel_prefix in self._subscribed

    def ensure(self, channel_prefix: str, timeout: float = 5.0) -> None:
        """Subscribe to ``<channel_prefix><process id>`` (once) and wait for the server's
        confirmation (at most ``timeout`` seconds)."""
        if channel_prefix in self._subscribed:
            return
        channel = channel_prefix + process_id()
        with self._lock:
            confirmed = self._confirmed.get(channel)
            if confirmed is None:
                confirmed = self._confirmed[channel] = threading.Event()
                self._channels[channel] = channel_prefix
                try:
                    if self._pubsub is None:
                        client = self._client()
                        if client is None:
                            raise redis.ConnectionError("the Redis client was discarded")
                        self._pubsub = client.pubsub()
                    self._pubsub.subscribe(channel)
                    self._heard = time.monotonic()
                    _bound_reconnects(self._pubsub.connection)
                except BaseException:
                    del self._confirmed[channel]  # the next caller tries again
                    del self._channels[channel]
                    raise
        self._await_confirmation(confirmed, timeout, f"SUBSCRIBE {channel}")
        with self._lock:
            if confirmed.is_set():  # (not cleared again by a loss meanwhile)
                self._subscribed.add(channel_prefix)

    def _await_confirmation(self, confirmed: threading.Event, timeout: float,
                            what: str) -> None:
        """Wait up to ``timeout`` seconds for the server to confirm ``what``, reading the
        connection ourselves when no other thread does; ``ConnectionError`` if it never does."""
        end = time.monotonic() + timeout
        while not confirmed.is_set():
            left = end - time.monotonic()
            if left <= 0:
                raise redis.ConnectionError(f"no confirmation of {what}")
            if self._reader.acquire(blocking=False):
                try:
                    self._read(lambda: confirmed.is_set(), left)
                finally:
                    self._reader.release()
                    self._hand_over(None)
            else:
                confirmed.wait(min(left, 0.05))  # the reader will see the confirmation

    def wait(
        self,
        slot: WaitSlot,
        timeout: float | None,
        abort: threading.Event | None,
        generation: int,
    ) -> None:
        """Sleep until ``slot`` is granted, ``timeout`` seconds pass (None: no limit),
        ``abort`` is set (noticed within ABORT_CHECK seconds) or :attr:`generation` is no
        longer ``generation`` (the subscription was re-established: a grant may be missed)."""
        end = None if timeout is None else time.monotonic() + timeout
        self._waiting.add(slot)
        try:
            while slot.token is None and self.generation == generation:
                if abort is not None and abort.is_set():
                    return
                step = None if end is None else end - time.monotonic()
                if step is not None and step <= 0:
                    return
                if abort is not None:
                    step = ABORT_CHECK if step is None else min(step, ABORT_CHECK)
                if self._reader.acquire(blocking=False):
                    slot.thread = _thread.get_ident()
                    slot.reading = self
                    try:
                        if slot.token is None:  # a local grant may have come just now
                            self._read(lambda: (slot.token is not None
                                                or self.generation != generation), step)
                    finally:
                        slot.reading = None
                        self._reader.release()
                        self._hand_over(slot)
                else:
                    slot.sleep(step)
        finally:
            self._waiting.discard(slot)

    def _hand_over(self, me: WaitSlot | None) -> None:
        # Released the reader role: wake one other waiter so someone keeps reading. A waiter
        # joins _waiting before it tries the role, so none can be missed. Not one already
        # granted (by a message just read, or a local hand-over): it is on its way out and
        # would not read, leaving the grants of the others unread until their re-check.
        for other in list(self._waiting):
            if other is not me and other.token is None:
                other.poke()
                return

    def _read(self, done: Callable[[], bool], timeout: float | None) -> None:
        """Read and dispatch messages until ``done()`` or ``timeout`` seconds pass.

        Sleeps in poll() on the socket and the nudge pipe together; reads only when the socket
        is readable or redis-py's parser still holds buffered data, and then straight from the
        connection (this is the hot path of every cross-process handoff). Health-checks the
        connection meanwhile and replaces it when it is dead.
        """
        pubsub = self._pubsub
        end = None if timeout is None else time.monotonic() + timeout
        buffered = True  # a previous reader may have left messages in the parser's buffer
        while not done():
            now = time.monotonic()
            left = None if end is None else end - now
            if left is not None and left <= 0:
                return
            try:
                conn = pubsub.connection
                if conn._sock is None:  # dropped (by us or by redis-py): connect again
                    self._mark_lost()
                    self._reconnect(conn)
                    continue
                if buffered and conn.can_read(timeout=0):
                    self._received(conn.read_response(**_READ_OPTIONS))
                    continue
                buffered = False
                # Wake up for the next health action too: a PING due, or an answer overdue.
                due = (self._heard + HEALTH_IDLE if self._ping_sent is None
                       else self._ping_sent + HEALTH_TIMEOUT)
                step = max(0.0, due - now) if left is None else max(0.0, min(due - now, left))
                poller = self._poller_for(conn._sock)
                events = poller.poll(int(step * 1000) + 1)
                for fd, _ in events:
                    if fd == self._nudge_r:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._nudge_r, 4096)
                    else:
                        self._received(conn.read_response(**_READ_OPTIONS))
                        buffered = True  # one recv may have brought several messages
                if not events and time.monotonic() >= due:
                    self._health_check(conn)
            except (redis.ConnectionError, redis.TimeoutError, OSError, ValueError,
                    _Unanswered) as exc:
                self._connection_lost(exc, end)

    def _received(self, response: Any) -> None:
        # Anything read proves the connection alive (a PING's answer is just that).
        self._heard = time.monotonic()
        self._ping_sent = None
        self._dispatch(response)

    def _health_check(self, conn: Any) -> None:
        if self._ping_sent is not None:
            waited = time.monotonic() - self._ping_sent
            raise _Unanswered(f"no answer to PING within {waited:.1f} s")
        with self._lock:
            conn.send_command("PING", check_health=False)
        self._ping_sent = time.monotonic()

    def _reconnect(self, conn: Any) -> None:
        # redis-py's connect callback (PubSub.on_connect) sends SUBSCRIBE again for every
        # channel; the confirmations are read like any message (see _dispatch).
        with self._lock:
            conn.connect()
        self._heard = time.monotonic()
        self._ping_sent = None

    def _poller_for(self, sock: Any) -> Any:
        # One poll object per socket: made again only after redis-py reconnected.
        if sock is not self._polled_sock:
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            poller.register(self._nudge_r, select.POLLIN)
            self._poller, self._polled_sock = poller, sock
        return self._poller

    def _dispatch(self, response: Any) -> None:
        if response is None or not isinstance(response, list):
            return
        kind = response[0]
        if kind in (b"message", "message"):
            wake_local(response[2])
        elif kind in (b"subscribe", "subscribe"):
            channel = response[1]
            name = channel.decode() if isinstance(channel, bytes) else channel
            event = self._confirmed.get(name)
            if event is not None:
                event.set()
            if self._lost:
                self._maybe_resubscribed()

    def _maybe_resubscribed(self) -> None:
        # Every channel is confirmed again: from now on grants reach this process, so each
        # waiter asks Redis for one it may have missed meanwhile (and not before: a grant
        # published between that look and the confirmation would be lost again).
        with self._lock:
            if not all(event.is_set() for event in self._confirmed.values()):
                return
            self._lost = False
            self._failures = 0
            self._subscribed.update(self._channels.values())
            self.generation += 1
        log.info("rediskit wake-up connection re-established")
        for slot in list(self._waiting):
            slot.poke()

    def _connection_lost(self, exc: BaseException, end: float | None) -> None:
        # Drop the connection; the next read connects again and re-subscribes. Until the new
        # subscription is confirmed, new waiters subscribe first (ready() is False).
        self._failures += 1
        if self._failures == 1:
            log.warning("rediskit wake-up connection lost (%s); reconnecting", exc)
        self._mark_lost()
        with self._lock, contextlib.suppress(Exception):
            self._pubsub.connection.disconnect()
        if self._failures > 1:  # back off while the server is down
            pause = min(0.05 * self._failures, 1.0)
            if end is not None:
                pause = min(pause, max(0.0, end - time.monotonic()))
            time.sleep(pause)

    def _mark_lost(self) -> None:
        with self._lock:
            self._lost = True
            self._subscribed.clear()
            for event in self._confirmed.values():
                event.clear()
            self._ping_sent = None


class _Link:
    """A sharded hub's pub/sub connection to one master, and the channels subscribed on it."""

    __slots__ = ("buffered", "channels", "conn", "heard", "name", "ping_sent")

    def __init__(self, name: str, conn: Any) -> None:
        self.name = name
        self.conn = conn
        self.channels: set[str] = set()
        self.heard = time.monotonic()  # when the connection last proved alive
        self.ping_sent: float | None = None  # an unanswered health-check PING
        self.buffered = False  # the parser may hold more messages than the socket shows


class ShardedWakeupHub(WakeupHub):
    """The wake-ups of one Redis Cluster client in this process: sharded pub/sub over one
    connection per master, subscribed per slot (see the module docstring).

    Same interface and the same leader/follower reading as :class:`WakeupHub`; the channel
    prefixes are those of slots (``KeySpace.sharded_wake_prefix``), each subscribed on the
    master serving its slot, and moved when the slot moves or its master fails.
    """

    def __init__(self, client: Any) -> None:
        super().__init__(client)
        self._links: dict[str, _Link] = {}  # node name ("host:port") -> its connection
        self._link_of: dict[str, _Link] = {}  # channel -> the link it is subscribed on
        self._fds: dict[int, _Link] = {}  # socket fd -> link, for the poller
        self._moved: set[str] = set()  # channels to subscribe again where their slot lives
        self._leaving: set[str] = set()  # channels this hub unsubscribed itself
        self._used: dict[str, float] = {}  # channel prefix -> when it was last used
        self._retry_at = 0.0  # no new subscribe attempt before this (backoff)
        self._sharded_poller = select.poll()
        self._sharded_poller.register(self._nudge_r, select.POLLIN)

    def close(self) -> None:
        with self._lock:
            for link in list(self._links.values()):
                self._drop_link(link)
        super().close()

    def ready(self, channel_prefix: str) -> bool:
        if channel_prefix in self._subscribed:
            self._used[channel_prefix] = time.monotonic()
            return True
        return False

    def ensure(self, channel_prefix: str, timeout: float = 5.0) -> None:
        """Subscribe to ``<channel_prefix><process id>`` on the master serving its slot (once)
        and wait for the confirmation (at most ``timeout`` seconds)."""
        if channel_prefix in self._subscribed:
            return
        channel = channel_prefix + process_id()
        with self._lock:
            confirmed = self._confirmed.get(channel)
            if confirmed is None:
                confirmed = self._confirmed[channel] = threading.Event()
                self._channels[channel] = channel_prefix
                try:
                    self._subscribe(channel)
                except BaseException:
                    del self._confirmed[channel]  # the next caller tries again
                    del self._channels[channel]
                    raise
                self._drop_idle()
        self.interrupt()  # a thread reading now polls the connections it knew: look again
        self._await_confirmation(confirmed, timeout, f"SSUBSCRIBE {channel}")
        with self._lock:
            if confirmed.is_set():
                self._subscribed.add(channel_prefix)
                self._used[channel_prefix] = time.monotonic()

    # -- subscriptions (called with self._lock held) -------------------------------------------
    def _subscribe(self, channel: str) -> None:
        client = self._client()
        if client is None:
            raise redis.ConnectionError("the Redis client was discarded")
        node = client.get_node_from_key(channel)
        link = self._links.get(node.name)
        if link is None:
            conn = _own_connection(node.redis_connection.connection_pool)
            conn.connect()
            link = self._links[node.name] = _Link(node.name, conn)
            self._fds[conn._sock.fileno()] = link
            self._sharded_poller.register(conn._sock.fileno(), select.POLLIN)
        try:
            link.conn.send_command("SSUBSCRIBE", channel, check_health=False)
        except BaseException:
            self._drop_link(link)
            raise
        link.channels.add(channel)
        self._link_of[channel] = link

    def _drop_link(self, link: _Link) -> None:
        # The connection is gone or broken: its channels must be subscribed again.
        if self._links.get(link.name) is link:
            del self._links[link.name]
        for fd, known in list(self._fds.items()):
            if known is link:
                del self._fds[fd]
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self._sharded_poller.unregister(fd)
        with contextlib.suppress(Exception):
            link.conn.disconnect()
        for channel in list(link.channels):
            self._channel_moved(channel)
        link.channels.clear()

    def _channel_moved(self, channel: str) -> None:
        # No longer subscribed where grants for its slot are published.
        link = self._link_of.pop(channel, None)
        if link is not None:
            link.channels.discard(channel)
        event = self._confirmed.get(channel)
        if event is None:
            return  # dropped meanwhile
        event.clear()
        self._subscribed.discard(self._channels[channel])
        self._moved.add(channel)
        self._lost = True

    def _drop_idle(self) -> None:
        # Too many slot channels: unsubscribe those unused for SHARDED_IDLE seconds.
        if len(self._channels) <= SHARDED_CHANNELS:
            return
        now = time.monotonic()
        for prefix, used in sorted(self._used.items(), key=lambda item: item[1]):
            if len(self._channels) <= SHARDED_CHANNELS or now - used < SHARDED_IDLE:
                return
            channel = prefix + process_id()
            del self._used[prefix]
            self._subscribed.discard(prefix)
            self._channels.pop(channel, None)
            self._confirmed.pop(channel, None)
            self._moved.discard(channel)
            link = self._link_of.pop(channel, None)
            if link is not None:
                link.channels.discard(channel)
                self._leaving.add(channel)
                with contextlib.suppress(redis.ConnectionError, OSError):
                    link.conn.send_command("SUNSUBSCRIBE", channel, check_health=False)

    # -- reading ------------------------------------------------------------------------------
    def _read(self, done: Callable[[], bool], timeout: float | None) -> None:
        """Read and dispatch what every master sends until ``done()`` or ``timeout`` seconds
        pass; meanwhile health-check each connection and subscribe moved channels again."""
        end = None if timeout is None else time.monotonic() + timeout
        for link in list(self._links.values()):
            link.buffered = True  # a previous reader may have left messages in a parser
        while not done():
            now = time.monotonic()
            left = None if end is None else end - now
            if left is not None and left <= 0:
                return
            if self._moved and now >= self._retry_at:
                self._resubscribe()
                continue
            if self._read_buffered():
                continue
            due = self._next_action()
            step = max(0.0, due - now) if left is None else max(0.0, min(due - now, left))
            for fd, _ in self._sharded_poller.poll(int(step * 1000) + 1):
                if fd == self._nudge_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._nudge_r, 4096)
                    continue
                readable = self._fds.get(fd)
                if readable is not None:
                    self._read_one(readable)
                    readable.buffered = True  # one recv may have brought several messages
            now = time.monotonic()
            for link in list(self._links.values()):
                if link.channels and now >= self._due(link):
                    try:
                        self._health_check(link)
                    except (redis.ConnectionError, OSError, _Unanswered) as exc:
                        self._link_failed(link, exc)

    def _read_buffered(self) -> bool:
        read = False
        for link in list(self._links.values()):
            if not link.buffered:
                continue
            try:
                if link.conn.can_read(timeout=0):
                    self._read_one(link)
                    read = True
                else:
                    link.buffered = False
            except (redis.ConnectionError, redis.TimeoutError, OSError, ValueError) as exc:
                self._link_failed(link, exc)
                read = True
        return read

    def _read_one(self, link: _Link) -> None:
        try:
            response = link.conn.read_response(**_READ_OPTIONS)
        except redis.exceptions.MovedError as exc:  # a subscribe sent where the slot no longer is
            link.heard = time.monotonic()
            with self._lock:
                for channel in list(link.channels):
                    event = self._confirmed.get(channel)
                    if key_slot(channel) == exc.slot_id and event and not event.is_set():
                        self._channel_moved(channel)
            return
        except redis.ResponseError as exc:
            link.heard = time.monotonic()
            log.warning("rediskit wake-up connection to %s: %s", link.name, exc)
            return
        except (redis.ConnectionError, redis.TimeoutError, OSError, ValueError) as exc:
            self._link_failed(link, exc)
            return
        link.heard = time.monotonic()
        link.ping_sent = None
        self._dispatch_sharded(link, response)

    def _dispatch_sharded(self, link: _Link, response: Any) -> None:
        if not isinstance(response, list) or len(response) < 2:
            return  # a PING's answer (RESP3), or nothing
        kind = response[0]
        if kind in (b"smessage", "smessage"):
            wake_local(response[2])
            return
        channel = response[1].decode() if isinstance(response[1], bytes) else str(response[1])
        if kind in (b"ssubscribe", "ssubscribe"):
            event = self._confirmed.get(channel)
            if event is not None and self._link_of.get(channel) is link:
                event.set()
            if self._lost and not self._moved:
                self._maybe_resubscribed()
        elif kind in (b"sunsubscribe", "sunsubscribe"):
            with self._lock:
                if channel in self._leaving:
                    self._leaving.discard(channel)
                    return
                if self._link_of.get(channel) is not link:
                    return  # subscribed elsewhere already
                self._channel_moved(channel)
            log.info("rediskit wake-up channel %s left %s (its slot moved); subscribing again",
                     channel, link.name)

    def _due(self, link: _Link) -> float:
        # When this link's next health action is due: a PING, or its overdue answer.
        if link.ping_sent is None:
            return link.heard + HEALTH_IDLE
        return link.ping_sent + HEALTH_TIMEOUT

    def _next_action(self) -> float:
        due = [self._due(link) for link in self._links.values() if link.channels]
        if self._moved:
            due.append(self._retry_at)
        return min(due, default=time.monotonic() + HEALTH_IDLE)

    def _health_check(self, link: _Link) -> None:
        if link.ping_sent is not None:
            waited = time.monotonic() - link.ping_sent
            raise _Unanswered(f"no answer to PING within {waited:.1f} s")
        with self._lock:
            link.conn.send_command("PING", check_health=False)
        link.ping_sent = time.monotonic()

    def _link_failed(self, link: _Link, exc: BaseException) -> None:
        self._failures += 1
        if self._failures == 1:
            log.warning("rediskit wake-up connection to %s lost (%s); subscribing again",
                        link.name, exc)
        with self._lock:
            self._drop_link(link)
        # The cluster may not have noticed yet (a failover takes seconds): don't hammer it.
        self._retry_at = time.monotonic() + min(0.05 * self._failures, 1.0)

    def _resubscribe(self) -> None:
        # Learn where each slot lives now, then subscribe the moved channels there. The
        # confirmations arrive like any message; the last one bumps the generation.
        client = self._client()
        if client is None:
            return
        try:
            client.nodes_manager.initialize()
            with self._lock:
                for channel in list(self._moved):
                    if channel in self._confirmed:
                        self._subscribe(channel)
                    self._moved.discard(channel)
        except Exception as exc:  # the cluster is still failing over, or unreachable
            self._failures += 1
            if self._failures == 1:
                log.warning("rediskit: subscribing wake-up channels again failed (%s); "
                            "retrying", exc)
            self._retry_at = time.monotonic() + min(0.05 * self._failures, 1.0)
            return
        if self._lost and not self._moved:
            self._maybe_resubscribed()


def _own_connection(pool: Any) -> Any:
    """A connection of its own made from ``pool``'s settings (host, auth, TLS, connection
    class) with short timeouts and no retry, as the renewal's (``renew_batch.py``)."""
    kwargs = {k: v for k, v in pool.connection_kwargs.items()
              if not k.startswith("maint_notifications")}  # the pool's own, not a connection's
    kwargs.update(socket_timeout=_SOCKET_TIMEOUT, socket_connect_timeout=_SOCKET_TIMEOUT,
                  retry=Retry(NoBackoff(), 0), health_check_interval=0)
    for name in ("orig_socket_timeout", "orig_socket_connect_timeout"):
        if name in kwargs:
            kwargs[name] = _SOCKET_TIMEOUT
    return pool.connection_class(**kwargs)


def _bound_reconnects(conn: Any) -> None:
    """Make reconnecting the wake-up connection quick to fail: the hub retries by itself
    (while anyone waits), and a waiter reading the connection must not hang in a connect."""
    for name in ("socket_timeout", "socket_connect_timeout"):
        current = getattr(conn, name, None)
        if current is None or current > _SOCKET_TIMEOUT:
            setattr(conn, name, _SOCKET_TIMEOUT)
    conn.retry = Retry(NoBackoff(), 0)


def hub_for(client: Any) -> WakeupHub:
    """The wake-up hub of ``client`` in this process (created on first use; closed when the
    client is garbage-collected)."""
    # Keyed by id() with a weak reference to check it: a plain dict lookup on the hot path.
    found = _state.hubs.get(id(client))
    if found is not None and found[0]() is client:
        return found[1]
    state = _state
    with state.lock:
        found = state.hubs.get(id(client))
        if found is None or found[0]() is not client:
            hub = ShardedWakeupHub(client) if is_cluster(client) else WakeupHub(client)
            key = id(client)

            def forget(ref: weakref.ref[Any]) -> None:
                entry = state.hubs.get(key)
                if entry is not None and entry[0] is ref:
                    del state.hubs[key]
                hub.close()

            found = state.hubs[key] = (weakref.ref(client, forget), hub)
        return found[1]
