"""Waking waiters when a lock or permit is handed to them.

Release scripts hand ownership straight to the first live waiter in Redis and then tell it:
by publishing ``"<waiter id> <token>"`` on the waiter's process channel, or, when the waiter
lives in the releasing process, by returning that text so the releaser wakes it directly.

Each process has one id (``process_id()``, new after ``fork``), one registry of local waiters,
and, per Redis client, one pub/sub connection. There is no listener thread: one of the waiting
threads reads the connection (leader/follower), delivers what it reads to the others and,
when its own grant arrives, hands the reading over. A process with a single waiter (a Celery
prefork child) so gets its grant straight from the socket, without a thread hop. A lost
message is never fatal: every wait is also bounded by the holder's remaining lease, after which
the waiter asks Redis again.
"""

from __future__ import annotations

import _thread
import contextlib
import inspect
import itertools
import logging
import os
import secrets
import select
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import redis

__all__ = [
    "WaitSlot",
    "WakeupHub",
    "hand_over_local",
    "hub_for",
    "new_owner_id",
    "process_id",
    "wake_local",
]

ABORT_CHECK = 0.02  # seconds: how often a wait looks at the caller's abort event

log = logging.getLogger(__name__)


def _read_options() -> dict[str, Any]:
    # What redis-py's own pub/sub passes to read_response, as far as this redis-py has it:
    # disconnect_on_error since 4.6 (before, a read error always disconnects, which _read
    # does anyway), push_request since 5.0 (RESP3 push messages).
    accepted = inspect.signature(redis.connection.Connection.read_response).parameters
    wanted = {"disconnect_on_error": False, "push_request": True}
    return {name: value for name, value in wanted.items() if name in accepted}


_READ_OPTIONS = _read_options()


def _make_process_id() -> str:
    # Readable in reports (host and pid) and unique across restarts (random part).
    # ':' separates it from the counter in owner ids and ' ' ends it in messages: keep them out.
    host = socket.gethostname().replace(":", "_").replace(" ", "_")[:40]
    return f"{host}/{os.getpid()}/{secrets.token_hex(3)}"


class _ProcessState:
    def __init__(self) -> None:
        self.process_id = _make_process_id()
        self.counter = itertools.count(1)
        self.slots: dict[str, WaitSlot] = {}
        self.hubs: dict[int, tuple[weakref.ref[Any], WakeupHub]] = {}
        self.lock = threading.Lock()


_state = _ProcessState()


def _after_fork_in_child() -> None:
    # A child inherits neither the listener threads nor the parent's waiters; its grants must
    # go to its own channel, so it gets a fresh identity.
    global _state
    _state = _ProcessState()


os.register_at_fork(after_in_child=_after_fork_in_child)


def process_id() -> str:
    """This process's id: ``"<host>/<pid>/<random>"``."""
    return _state.process_id


def new_owner_id() -> str:
    """A fresh owner id for one acquisition: ``"<process id>:<n>"``."""
    state = _state
    return f"{state.process_id}:{next(state.counter)}"


class WaitSlot:
    """Where a waiting thread is told it was granted: ``token`` is set, then it is woken.

    A pre-acquired lock is the wake-up signal: far cheaper to create than an ``Event``, and
    created on every contended acquisition. ``recheck`` asks the waiter to ask Redis again
    (its grant may have been lost); ``reading`` is the hub whose connection it reads now.
    """

    __slots__ = ("_signal", "reading", "recheck", "token")

    def __init__(self) -> None:
        self._signal = _thread.allocate_lock()
        self._signal.acquire()
        self.token: int | None = None
        self.recheck = False
        self.reading: WakeupHub | None = None

    def grant(self, token: int) -> None:
        self.token = token
        self.poke()

    def poke(self) -> None:
        """Wake the waiter (to look at its token, its recheck flag, or to take over reading)."""
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
    """Deliver ``"<waiter id> <token>"`` to a waiter of this process, if it still waits."""
    text = message.decode() if isinstance(message, bytes) else message
    owner, _, token = text.rpartition(" ")
    slot = _state.slots.get(owner)
    if slot is not None:
        slot.grant(int(token))
        reading = slot.reading
        if reading is not None:
            reading.interrupt()  # it sleeps in select() on its socket: nudge it


class WakeupHub:
    """The pub/sub connection of one Redis client in this process, read by its waiters.

    ``ensure(prefix)`` subscribes once and waits for the server's confirmation, so a grant
    published after the caller joins a queue cannot be missed for lack of a subscription.
    ``wait(slot, ...)`` sleeps a waiter until its grant, reading the connection itself when
    nobody else does.
    """

    def __init__(self, client: Any) -> None:
        self._client = weakref.ref(client)  # weak: the hub must not keep a discarded client
        self._pubsub: Any = None
        self._subscribed: set[str] = set()  # channel prefixes whose channel is confirmed
        self._confirmed: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._reader = threading.Lock()  # held by the thread reading the socket
        self._waiting: set[WaitSlot] = set()
        self._failures = 0
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
                try:
                    if self._pubsub is None:
                        client = self._client()
                        if client is None:
                            raise redis.ConnectionError("the Redis client was discarded")
                        self._pubsub = client.pubsub()
                    self._pubsub.subscribe(channel)
                except BaseException:
                    del self._confirmed[channel]  # the next caller tries again
                    raise
        end = time.monotonic() + timeout
        while not confirmed.is_set():
            left = end - time.monotonic()
            if left <= 0:
                raise redis.ConnectionError(f"no confirmation of SUBSCRIBE {channel}")
            if self._reader.acquire(blocking=False):
                try:
                    self._read(lambda: confirmed.is_set(), left)
                finally:
                    self._reader.release()
                    self._hand_over(None)
            else:
                confirmed.wait(min(left, 0.05))  # the reader will see the confirmation
        self._subscribed.add(channel_prefix)

    def wait(self, slot: WaitSlot, timeout: float | None, abort: threading.Event | None) -> None:
        """Sleep until ``slot`` is granted or asked to recheck, ``timeout`` seconds pass
        (None: no limit) or ``abort`` is set (noticed within ABORT_CHECK seconds)."""
        end = None if timeout is None else time.monotonic() + timeout
        self._waiting.add(slot)
        try:
            while slot.token is None and not slot.recheck:
                if abort is not None and abort.is_set():
                    return
                step = None if end is None else end - time.monotonic()
                if step is not None and step <= 0:
                    return
                if abort is not None:
                    step = ABORT_CHECK if step is None else min(step, ABORT_CHECK)
                if self._reader.acquire(blocking=False):
                    slot.reading = self
                    try:
                        if slot.token is None:  # a local grant may have come just now
                            self._read(lambda: slot.token is not None or slot.recheck, step)
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
        # joins _waiting before it tries the role, so none can be missed.
        for other in list(self._waiting):
            if other is not me:
                other.poke()
                return

    def _read(self, done: Callable[[], bool], timeout: float | None) -> None:
        """Read and dispatch messages until ``done()`` or ``timeout`` seconds pass.

        Sleeps in poll() on the socket and the nudge pipe together; reads only when the socket
        is readable or redis-py's parser still holds buffered data, and then straight from the
        connection (this is the hot path of every cross-process handoff).
        """
        pubsub = self._pubsub
        end = None if timeout is None else time.monotonic() + timeout
        buffered = True  # a previous reader may have left messages in the parser's buffer
        while not done():
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                return
            try:
                conn = pubsub.connection
                # can_read() also reconnects (and so re-subscribes) a dropped connection.
                if buffered and conn.can_read(timeout=0):
                    self._dispatch(conn.read_response(**_READ_OPTIONS))
                    continue
                buffered = False
                poller = self._poller_for(conn._sock)
                events = poller.poll(None if left is None else max(0, int(left * 1000) + 1))
                for fd, _ in events:
                    if fd == self._nudge_r:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._nudge_r, 4096)
                    else:
                        self._dispatch(conn.read_response(**_READ_OPTIONS))
                        buffered = True  # one recv may have brought several messages
                self._failures = 0
            except (redis.ConnectionError, redis.TimeoutError, OSError, ValueError) as exc:
                with contextlib.suppress(Exception):
                    pubsub.connection.disconnect()  # the next read reconnects and re-subscribes
                self._connection_lost(exc)
                return

    def _poller_for(self, sock: Any) -> Any:
        # One poll object per socket: made again only after redis-py reconnected.
        if sock is not self._polled_sock:
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            poller.register(self._nudge_r, select.POLLIN)
            self._poller, self._polled_sock = poller, sock
        return self._poller

    def _dispatch(self, response: Any) -> None:
        if response is None:
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

    def _connection_lost(self, exc: BaseException) -> None:
        # redis-py reconnects and re-subscribes on the next read. Grants published meanwhile
        # are lost: every local waiter asks Redis again at once.
        self._failures += 1
        if self._failures == 1:
            log.warning("rediskit wake-up connection lost (%s); reconnecting", exc)
        for slot in list(_state.slots.values()):
            slot.recheck = True
            slot.poke()
        time.sleep(min(0.05 * self._failures, 1.0))  # back off while the server is down


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
            hub = WakeupHub(client)
            key = id(client)

            def forget(ref: weakref.ref[Any]) -> None:
                entry = state.hubs.get(key)
                if entry is not None and entry[0] is ref:
                    del state.hubs[key]
                hub.close()

            found = state.hubs[key] = (weakref.ref(client, forget), hub)
        return found[1]
