"""Server faults: a private Redis that can be killed and restarted, keeping or losing its data,
and stalled with ``DEBUG SLEEP``.

What it models:

- ``restart(keep_data=True)``: a crash (SIGKILL: no save, no goodbye) and a restart of a server
  that persists every write to its append-only file. Writes acknowledged before the crash
  survive: with ``appendfsync no`` Redis still ``write()``s the AOF before it answers a client,
  and a killed process loses nothing the kernel already holds (only a machine crash would).
- ``restart(keep_data=False)``: a crash of a server without persistence (or a FLUSHALL, or a
  failover to an empty replica): it comes back empty on the same port.
- ``stall(seconds)``: the server does nothing for ``seconds`` (a slow command, a fork on a big
  dataset, a long Lua script), through ``DEBUG SLEEP`` sent on a connection of its own. Since
  Redis 7, ``DEBUG`` is refused unless the server runs with ``--enable-debug-command``, so every
  ``FaultServer`` passes it.

It wraps ``celery_rediskit.devserver.PrivateServer``, whose ``start()`` always passes
``--save "" --appendonly no`` and then its ``extra_args``: a later argument wins, so the
append-only file is switched on through ``extra_args``. The server listens on the same port
across restarts, so clients (and fault proxies) reconnect to the same address.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import redis

from celery_rediskit.devserver import PrivateServer

__all__ = ["DEBUG_ARGS", "PERSISTENCE_ARGS", "FaultServer", "Stall"]

DEBUG_ARGS = ("--enable-debug-command", "yes")
PERSISTENCE_ARGS = ("--appendonly", "yes", "--appendfsync", "no")


class Stall:
    """A ``DEBUG SLEEP`` in progress on its own connection; ``wait()`` until it is over."""

    def __init__(self, port: int, seconds: float) -> None:
        self.seconds = seconds
        self.error: BaseException | None = None
        self._client = redis.Redis(port=port, socket_timeout=seconds + 10.0,
                                   socket_connect_timeout=2.0)
        self._conn: Any = self._client.connection_pool.get_connection()
        # Sent here, so the server stalls as soon as it reads it: when ``stall()`` returns,
        # the command is on its way, and the server serves nobody else until it wakes.
        self._conn.send_command("DEBUG", "SLEEP", repr(float(seconds)))  # type: ignore[no-untyped-call]
        self.sent_at = time.monotonic()
        self.ended_at: float | None = None
        self._thread = threading.Thread(target=self._read, name="fault-stall", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            self._conn.read_response()
        except BaseException as exc:  # the server was killed meanwhile, for instance
            self.error = exc
        finally:
            self.ended_at = time.monotonic()
            self._client.connection_pool.release(self._conn)
            self._client.close()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the server to answer (at most ``timeout`` seconds); True once it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()


class FaultServer:
    """A private Redis server with ``DEBUG`` enabled, persistent (append-only file) unless
    ``persistent=False``. Use as a context manager, or ``start()`` and ``close()``."""

    def __init__(self, *, persistent: bool = True) -> None:
        self.persistent = persistent
        extra = DEBUG_ARGS + (PERSISTENCE_ARGS if persistent else ())
        self.server = PrivateServer(extra_args=extra)
        self.restarts = 0

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def data_dir(self) -> Path:
        """The server's working directory (where its append-only file lives)."""
        return self.server.pidfile.parent

    def start(self) -> FaultServer:
        self.server.start()
        return self

    def close(self) -> None:
        """Kill the server and remove its directory."""
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def client(self, **kwargs: Any) -> redis.Redis:
        """A client connected straight to the server (not through any proxy)."""
        kwargs.setdefault("socket_timeout", 5.0)
        kwargs.setdefault("socket_connect_timeout", 2.0)
        return redis.Redis(port=self.port, **kwargs)

    def stop(self, timeout: float = 10.0) -> None:
        """Kill the server (SIGKILL) and return once it is dead (its port closed).

        ``PrivateServer.stop`` waits until the pid is gone, which for a daemonized server
        takes as long as init needs to reap it (about 2 s on some machines); a pidfd becomes
        readable as soon as the process has exited, which is all a restart needs.
        """
        pid = self.server.pid()
        if pid is None:
            return
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            pidfd = None
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if pidfd is not None:
            try:
                ready, _, _ = select.select([pidfd], [], [], timeout)
                if not ready:
                    raise RuntimeError(f"redis-server {pid} did not die within {timeout} s")
            finally:
                os.close(pidfd)
        self.server.pidfile.unlink(missing_ok=True)

    def wipe(self) -> None:
        """Delete the stopped server's data files, so it starts empty."""
        if self.server.pid() is not None:
            raise RuntimeError("wipe() needs a stopped server")
        for path in self.data_dir.iterdir():
            if path.name.startswith("appendonly") or path.suffix == ".rdb":
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()

    def restart(self, *, keep_data: bool, down_for: float = 0.0) -> None:
        """Kill the server and start it again after ``down_for`` seconds, on the same port.

        ``keep_data=True`` needs a persistent server: acknowledged writes survive.
        ``keep_data=False`` brings it back empty.
        """
        if keep_data and not self.persistent:
            raise ValueError("restart(keep_data=True) needs a FaultServer(persistent=True)")
        self.stop()
        if not keep_data:
            self.wipe()
        if down_for > 0:
            time.sleep(down_for)  # the outage itself: clients meet a closed port meanwhile
        self.server.start()
        self.restarts += 1

    def stall(self, seconds: float) -> Stall:
        """Make the server sleep ``seconds`` (``DEBUG SLEEP``) without blocking the caller;
        ``wait()`` on the result to know it is over."""
        if seconds <= 0:
            raise ValueError(f"seconds must be > 0, got {seconds}")
        return Stall(self.port, seconds)
