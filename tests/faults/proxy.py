"""A loopback TCP proxy that puts network faults between Redis clients and a Redis server.

What it models: the network path of every connection a client opens to Redis. Clients connect
to ``proxy.url`` (127.0.0.1 only) instead of the server; each accepted connection (a *link*) is
paired with a fresh connection to the server, and one thread moves the bytes with ``selectors``.
The faults, each applied by one synchronous call that returns once it is in force:

- ``heal()`` (the start state): traffic passes untouched, without added delay.
- ``delay(up, down)``: every byte is held ``up`` seconds client -> server and ``down`` seconds
  server -> client (latency, not a bandwidth limit: order is kept and bytes in flight overlap).
- ``blackhole()``: a partition. Nothing moves in either direction and nothing is closed, so a
  client blocks until its own socket timeout; connections opened meanwhile are accepted (the
  kernel completes the handshake anyway) and frozen too. Bytes already sent stay queued and
  move again after ``heal()``, as TCP retransmission delivers them when a partition ends.
- ``reset()``: every current connection is closed abruptly on both sides (RST, through
  ``SO_LINGER`` 0). New connections pass normally.
- ``drop(client_port)``: one connection, chosen by the client's local port (for a redis-py
  ``PubSub``: ``ps.connection._sock.getsockname()[1]``), goes silent for good, as when a NAT or
  a load balancer forgets an idle connection: whatever either side sends is discarded, and
  neither side is told. ``heal()`` does not revive it (the NAT entry is gone).
- ``swallow_reply(match)``: the next command whose bytes contain ``match`` reaches the server,
  but its reply never reaches the client: the proxy discards it and resets that connection, as
  a network failing between the server's execution and the client's read. The client sees a
  read error after the command ran (``swallowed`` counts the replies discarded so).

A connection the server refuses (it is down or restarting) is reset towards the client. A side
that closes or resets its socket has the other side closed or reset in turn. ``close()`` stops
the thread and closes every socket; a proxy leaks neither threads nor descriptors.
"""

from __future__ import annotations

import contextlib
import errno
import queue
import selectors
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["FaultProxy", "LinkInfo", "local_port"]

T = TypeVar("T")

_CHUNK = 65536
_MAX_QUEUED = 4 * 1024 * 1024  # bytes held per direction before the proxy stops reading
_CONNECT_TIMEOUT = 1.0  # seconds to connect to the server (loopback: refused or instant)


def local_port(sock: socket.socket) -> int:
    """The local port of a client's socket: the key ``FaultProxy.drop`` chooses a link by."""
    return int(sock.getsockname()[1])


def _abort(sock: socket.socket) -> None:
    """Close ``sock`` with an RST instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@dataclass(frozen=True)
class LinkInfo:
    """A snapshot of one proxied connection.

    ``client_port`` is the client's local port; ``subscribed`` is True once the client sent a
    (P/S)SUBSCRIBE on it (a pub/sub connection); ``dropped`` once ``drop`` silenced it;
    ``bytes_up`` / ``bytes_down`` count bytes read from the client / from the server.
    """

    client_port: int
    subscribed: bool
    dropped: bool
    bytes_up: int
    bytes_down: int


class _Pipe:
    """One direction of a link: bytes read from ``src``, queued until due, written to ``dst``."""

    __slots__ = ("dst", "eof", "last_due", "pending", "src", "want_write")

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src = src
        self.dst = dst
        self.pending: deque[tuple[float, bytes]] = deque()  # (due, data), in order
        self.last_due = 0.0
        self.eof = False  # src closed its side
        self.want_write = False  # dst's buffer was full: wait until it is writable

    def queued(self) -> int:
        return sum(len(data) for _, data in self.pending)


class _Link:
    __slots__ = ("bytes_down", "bytes_up", "client", "client_port", "down", "dropped",
                 "recent", "subscribed", "swallow", "tail", "up", "upstream")

    def __init__(self, client: socket.socket, upstream: socket.socket, client_port: int) -> None:
        self.client = client
        self.upstream = upstream
        self.client_port = client_port
        self.up = _Pipe(client, upstream)
        self.down = _Pipe(upstream, client)
        self.dropped = False
        self.subscribed = False
        self.tail = b""  # the last bytes sent upstream, so a command split across reads is seen
        self.bytes_up = 0
        self.bytes_down = 0
        self.recent = b""  # the last bytes sent upstream, for swallow_reply's match
        self.swallow = False  # discard the next reply and reset (see FaultProxy.swallow_reply)

    def info(self) -> LinkInfo:
        return LinkInfo(self.client_port, self.subscribed, self.dropped, self.bytes_up,
                        self.bytes_down)


class FaultProxy:
    """A TCP proxy from ``127.0.0.1:<port>`` to a Redis server at ``upstream_port``.

    Use as a context manager, or call ``start()`` and ``close()``. Every fault method runs on
    the proxy's thread and returns once the fault is in force.
    """

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.setblocking(False)
        self.port: int = int(self._listener.getsockname()[1])
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._masks: dict[socket.socket, int] = {}
        self._links: list[_Link] = []
        self._link_by_sock: dict[socket.socket, _Link] = {}
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], _Reply[Any]]] = (
            queue.SimpleQueue()
        )
        self._delay_up = 0.0
        self._delay_down = 0.0
        self._blackholed = False
        self._closing = False
        self._thread: threading.Thread | None = None
        self.accepted = 0  # connections accepted so far
        self.refused = 0  # connections reset because the server refused them
        self._swallow_match: bytes | None = None
        self.swallowed = 0  # replies discarded by swallow_reply

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``: give this to clients instead of the server's URL."""
        return f"redis://127.0.0.1:{self.port}/0"

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        if self._thread is not None:
            raise RuntimeError("the proxy is already started")
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name=f"fault-proxy-{self.port}",
                                        daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread and close every socket (idempotent)."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._closing = True
            self._poke()
            thread.join(timeout)
            if thread.is_alive():
                raise RuntimeError(f"fault proxy thread on port {self.port} did not stop")
        self._teardown()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open_sockets(self) -> int:
        """Sockets this proxy still holds open (0 after ``close()``)."""
        own = [self._listener, self._wake_r, self._wake_w]
        links = [s for link in self._links for s in (link.client, link.upstream)]
        return sum(1 for s in own + links if s.fileno() != -1)

    # ---- faults ----------------------------------------------------------------------------

    def heal(self) -> None:
        """Back to passing traffic without delay (dropped links stay dropped)."""
        def apply() -> None:
            self._blackholed = False
            self._delay_up = self._delay_down = 0.0
        self._call(apply)

    def delay(self, up: float, down: float | None = None) -> None:
        """Hold bytes ``up`` seconds client -> server and ``down`` (default: ``up``) back."""
        down = up if down is None else down
        if up < 0 or down < 0:
            raise ValueError(f"delays must be >= 0 seconds, got up={up} down={down}")

        def apply() -> None:
            self._delay_up, self._delay_down = float(up), float(down)
        self._call(apply)

    def blackhole(self) -> None:
        """Stop moving bytes on every connection, closing nothing (until ``heal()``)."""
        def apply() -> None:
            self._blackholed = True
        self._call(apply)

    def reset(self) -> int:
        """Reset every current connection (RST on both sides); return how many."""
        def apply() -> int:
            self._accept_pending()
            links = list(self._links)
            for link in links:
                self._close_link(link, abort=True)
            return len(links)
        return self._call(apply)

    def drop(self, client_port: int) -> None:
        """Silence the connection whose client's local port is ``client_port``, for good.

        Raises ``LookupError`` if the proxy has no such connection (a connection whose
        ``connect()`` returned is always found: pending ones are accepted first).
        """
        def apply() -> None:
            self._accept_pending()
            for link in self._links:
                if link.client_port == client_port:
                    link.dropped = True
                    link.up.pending.clear()
                    link.down.pending.clear()
                    return
            raise LookupError(f"no proxied connection from client port {client_port}")
        self._call(apply)

    def swallow_reply(self, match: bytes) -> None:
        """Arm a one-shot fault: the next command sent with ``match`` in its bytes is forwarded
        to the server, and the server's reply to it is discarded and its connection reset.

        The command must be the only one in flight on its connection (not pipelined behind
        commands whose replies are still to come): the first bytes back are taken as its reply.
        """
        if not match:
            raise ValueError("swallow_reply needs a non-empty match")

        def apply() -> None:
            self._swallow_match = bytes(match)
        self._call(apply)

    def links(self) -> list[LinkInfo]:
        """Snapshots of the current connections."""
        def apply() -> list[LinkInfo]:
            self._accept_pending()
            return [link.info() for link in self._links]
        return self._call(apply)

    # ---- the proxy thread ------------------------------------------------------------------

    def _call(self, fn: Callable[[], T]) -> T:
        thread = self._thread
        if thread is None or not thread.is_alive() or self._closing:
            raise RuntimeError("the proxy is not running")
        reply: _Reply[T] = _Reply()
        self._commands.put((fn, reply))
        self._poke()
        return reply.wait(thread)

    def _poke(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"!")

    def _run(self) -> None:
        try:
            while not self._closing:
                self._run_commands()
                if self._closing:
                    break
                now = time.monotonic()
                self._flush(now)
                timeout = self._update_interest(now)
                for key, _events in self._sel.select(timeout):
                    self._on_ready(key.fileobj)  # type: ignore[arg-type]
        finally:
            self._run_commands()  # answer callers still waiting (the proxy is closing)
            self._teardown()

    def _run_commands(self) -> None:
        while True:
            try:
                fn, reply = self._commands.get_nowait()
            except queue.Empty:
                return
            if self._closing:
                reply.fail(RuntimeError("the proxy is closing"))
                continue
            try:
                reply.set(fn())
            except BaseException as exc:  # handed to the caller
                reply.fail(exc)

    def _on_ready(self, sock: socket.socket) -> None:
        if sock is self._wake_r:
            with contextlib.suppress(BlockingIOError):
                while sock.recv(4096):
                    pass
        elif sock is self._listener:
            self._accept_pending()
        else:
            link = self._link_by_sock.get(sock)
            if link is not None:
                self._read(link, sock)

    def _accept_pending(self) -> None:
        while True:
            try:
                client, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # the listener is closed
            self.accepted += 1
            try:
                upstream = socket.create_connection(self.upstream, timeout=_CONNECT_TIMEOUT)
            except OSError:
                self.refused += 1
                _abort(client)  # the server is down: the client sees its connection reset
                continue
            for s in (client, upstream):
                s.setblocking(False)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(client, upstream, int(addr[1]))
            self._links.append(link)
            self._link_by_sock[client] = self._link_by_sock[upstream] = link

    def _read(self, link: _Link, sock: socket.socket) -> None:
        pipe = link.up if sock is link.client else link.down
        try:
            data = sock.recv(_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close_link(link, abort=True)  # reset by the peer: pass the reset on
            return
        if not data:
            pipe.eof = True
            if link.dropped:
                self._close_link(link, abort=False)
            return
        if pipe is link.up:
            link.bytes_up += len(data)
            match = self._swallow_match
            if match is not None:
                if match in link.recent + data:
                    link.swallow = True
                    self._swallow_match = None
                link.recent = data[-len(match):]
            if not link.subscribed:
                seen = (link.tail + data).upper()
                link.subscribed = b"SUBSCRIBE" in seen
                link.tail = data[-16:]
        else:
            link.bytes_down += len(data)
            if link.swallow:  # the reply of the command swallow_reply matched: lose it
                self.swallowed += 1
                self._close_link(link, abort=True)
                return
        if link.dropped:
            return  # the NAT forgot this connection: bytes vanish
        delay = self._delay_up if pipe is link.up else self._delay_down
        due = max(time.monotonic() + delay, pipe.last_due)
        pipe.last_due = due
        pipe.pending.append((due, data))

    def _flush(self, now: float) -> None:
        for link in list(self._links):
            if link.dropped or self._blackholed:
                continue
            for pipe in (link.up, link.down):
                if not self._flush_pipe(link, pipe, now):
                    break  # the link was closed
            else:
                if (link.up.eof and not link.up.pending) or (
                    link.down.eof and not link.down.pending
                ):
                    self._close_link(link, abort=False)  # a side hung up: hang up the other

    def _flush_pipe(self, link: _Link, pipe: _Pipe, now: float) -> bool:
        """Write ``pipe``'s due bytes; False if that closed the link."""
        pipe.want_write = False
        while pipe.pending and pipe.pending[0][0] <= now:
            due, data = pipe.pending[0]
            try:
                sent = pipe.dst.send(data)
            except (BlockingIOError, InterruptedError):
                pipe.want_write = True
                return True
            except OSError as exc:
                self._close_link(link, abort=exc.errno != errno.EPIPE)
                return False
            if sent < len(data):
                pipe.pending[0] = (due, data[sent:])
                pipe.want_write = True
                return True
            pipe.pending.popleft()
        return True

    def _update_interest(self, now: float) -> float | None:
        """Register what each socket waits for; return the select timeout (seconds)."""
        timeout: float | None = None
        frozen = self._blackholed
        for link in self._links:
            for pipe in (link.up, link.down):
                moving = not frozen and not link.dropped
                wants = 0
                if link.dropped or (moving and not pipe.eof and pipe.queued() < _MAX_QUEUED):
                    wants |= selectors.EVENT_READ
                self._want(pipe.src, wants, selectors.EVENT_READ)
                writing = moving and pipe.want_write
                self._want(pipe.dst, selectors.EVENT_WRITE if writing else 0,
                           selectors.EVENT_WRITE)
                if moving and pipe.pending and not pipe.want_write:
                    left = max(0.0, pipe.pending[0][0] - now)
                    timeout = left if timeout is None else min(timeout, left)
        return timeout

    def _want(self, sock: socket.socket, events: int, which: int) -> None:
        current = self._masks.get(sock, 0)
        mask = (current & ~which) | events
        if mask == current:
            return
        if current == 0:
            self._sel.register(sock, mask)
        elif mask == 0:
            self._sel.unregister(sock)
        else:
            self._sel.modify(sock, mask)
        if mask:
            self._masks[sock] = mask
        else:
            self._masks.pop(sock, None)

    def _close_link(self, link: _Link, *, abort: bool) -> None:
        if link in self._links:
            self._links.remove(link)
        for sock in (link.client, link.upstream):
            self._link_by_sock.pop(sock, None)
            if self._masks.pop(sock, 0):
                with contextlib.suppress(KeyError, ValueError):
                    self._sel.unregister(sock)
            if abort:
                _abort(sock)
            else:
                sock.close()

    def _teardown(self) -> None:
        for link in list(self._links):
            self._close_link(link, abort=False)
        with contextlib.suppress(Exception):
            self._sel.close()
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()


class _Reply(Generic[T]):
    """The result of one command run on the proxy thread, handed back to its caller."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._value: T | None = None
        self._error: BaseException | None = None

    def set(self, value: T) -> None:
        self._value = value
        self._done.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._done.set()

    def wait(self, thread: threading.Thread) -> T:
        """The result, once the proxy thread ran the command (or an error if it stopped)."""
        while not self._done.wait(0.5):
            if not thread.is_alive() and not self._done.is_set():
                raise RuntimeError("the proxy stopped before running the command")
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]
