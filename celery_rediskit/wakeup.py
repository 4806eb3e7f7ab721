"""Waking waiters when a lock or permit is handed to them.

Release scripts hand ownership straight to the first live waiter in Redis and then tell it:
by publishing ``"<waiter id> <token>"`` on the waiter's process channel, or, when the waiter
lives in the releasing process, by returning that text so the releaser wakes it directly.

Each process has one id (``process_id()``, new after ``fork``), one registry of local waiters,
and, per Redis client, one listener thread reading a dedicated pub/sub connection. A lost
message is never fatal: every wait is also bounded by the holder's remaining lease, after which
the waiter asks Redis again.
"""

from __future__ import annotations

import _thread
import contextlib
import itertools
import logging
import os
import secrets
import socket
import threading
import time
import weakref
from typing import Any

import redis

__all__ = ["WaitSlot", "WakeupHub", "hub_for", "new_owner_id", "process_id", "wake_local"]

log = logging.getLogger(__name__)


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
    created on every contended acquisition.
    """

    __slots__ = ("_signal", "token")

    def __init__(self) -> None:
        self._signal = _thread.allocate_lock()
        self._signal.acquire()
        self.token: int | None = None

    def grant(self, token: int) -> None:
        self.token = token
        self.poke()

    def poke(self) -> None:
        """Wake the waiter without a grant, so it asks Redis again."""
        with contextlib.suppress(RuntimeError):  # woken already
            self._signal.release()

    def wait(self, timeout: float | None) -> bool:
        """Sleep until woken or ``timeout`` seconds pass (None: no limit); True if woken."""
        return self._signal.acquire(timeout=-1 if timeout is None else max(0.0, timeout))


def register_slot(owner: str) -> WaitSlot:
    slot = WaitSlot()
    _state.slots[owner] = slot
    return slot


def drop_slot(owner: str) -> None:
    _state.slots.pop(owner, None)


def wake_local(message: str | bytes) -> None:
    """Deliver ``"<waiter id> <token>"`` to a waiter of this process, if it still waits."""
    text = message.decode() if isinstance(message, bytes) else message
    owner, _, token = text.rpartition(" ")
    slot = _state.slots.get(owner)
    if slot is not None:
        slot.grant(int(token))


class WakeupHub:
    """The pub/sub listener of one Redis client in this process.

    ``ensure(channel)`` subscribes once and waits for the server's confirmation, so a grant
    published after the caller joins a queue cannot be missed for lack of a subscription.
    """

    def __init__(self, client: Any) -> None:
        # A weak reference: the listener thread must not keep a discarded client alive.
        self._client = weakref.ref(client)
        self._pubsub: Any = None
        self._subscribed: set[str] = set()  # channel prefixes whose channel is confirmed
        self._confirmed: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

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
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._listen, name="rediskit-wakeup", daemon=True
                    )
                    self._thread.start()
        if not confirmed.wait(timeout):
            raise redis.ConnectionError(f"no confirmation of SUBSCRIBE {channel} in {timeout}s")
        self._subscribed.add(channel_prefix)

    def _listen(self) -> None:
        pubsub = self._pubsub
        failures = 0
        while True:
            try:
                response = pubsub.parse_response(block=True)
                failures = 0
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                # redis-py reconnects and re-subscribes on the next read. Grants published
                # meanwhile are lost; wake every local waiter so it asks Redis at once.
                if self._client() is None:
                    pubsub.close()  # the client is gone: nobody can wait on this hub any more
                    return
                failures += 1
                if failures == 1:
                    log.warning("rediskit wake-up connection lost (%s); reconnecting", exc)
                for slot in list(_state.slots.values()):
                    slot.poke()
                time.sleep(min(0.05 * failures, 1.0))  # back off while the server is down
                continue
            except Exception:  # pragma: no cover - keep the listener alive whatever happens
                log.exception("rediskit wake-up listener error")
                continue
            if response is None:
                continue
            kind = response[0]
            if kind in (b"message", "message"):
                wake_local(response[2])
            elif kind in (b"subscribe", "subscribe"):
                channel = response[1]
                name = channel.decode() if isinstance(channel, bytes) else channel
                event = self._confirmed.get(name)
                if event is not None:
                    event.set()


def hub_for(client: Any) -> WakeupHub:
    """The wake-up hub of ``client`` in this process (created on first use)."""
    # Keyed by id() with a weak reference to check it: a plain dict lookup on the hot path.
    found = _state.hubs.get(id(client))
    if found is not None and found[0]() is client:
        return found[1]
    with _state.lock:
        found = _state.hubs.get(id(client))
        if found is None or found[0]() is not client:
            found = _state.hubs[id(client)] = (weakref.ref(client), WakeupHub(client))
        return found[1]
