"""A Sentinel setup on loopback: one master, one replica and three sentinels, and failovers.

What it models: the smallest Sentinel deployment that can fail over (a quorum of 2 out of 3
sentinels, one replica to promote), with ``SENTINEL FAILOVER`` as the fault. After a failover
the replica is the master; the old master keeps serving the connections it already had until
the sentinels demote it (``REPLICAOF`` the new master, then ``CLIENT KILL`` of its normal and
pub/sub clients), after which it resynchronises from the new master and so loses every write
made on it since the promotion: the split-brain window of asynchronous replication.

Facts it relies on (measured with Redis 7.0.15, see /work/shared/brief/scale-out-notes.md):

- A sentinel is ``redis-server CONF --sentinel``, one config file each (a sentinel rewrites it).
- ``--repl-diskless-sync-delay 0`` on the data nodes links a replica in well under a second.
- Sentinel's own timers (2 s hello messages, INFO every 10 s to a demoted master) make a
  setup ready in about 2 s and demote the old master about 10 s after a failover. They are
  shortened here with ``SENTINEL DEBUG`` (Redis 7.0+): ready in about 0.3 s, demoted in 2 s.
  Production timings are the defaults; the README gives those.

Every server is started daemonized with a pidfile and stopped by that pid.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis
from redis.sentinel import Sentinel

from celery_rediskit.devserver import PrivateServer, find_server_binary, free_port
from tests.faults.tls import TLSFiles

__all__ = [
    "MASTER_NAME",
    "SentinelServer",
    "SentinelSetup",
    "stop_process",
    "tls_client_options",
    "wait_until",
]

MASTER_NAME = "rk-master"

# Sentinel's timers, shortened (milliseconds): how often it pings, sends INFO and hello messages.
# A demoted master is reconfigured once it has reported the wrong role for 4 publish periods.
FAST_TIMERS = ("ping-period", "250", "info-period", "250", "publish-period", "250")


def stop_process(pid: int, timeout: float = 5.0, *, kill: bool = False) -> None:
    """SIGTERM ``pid`` (SIGKILL with ``kill``), SIGKILL it if it still runs after ``timeout``
    seconds, and return once it has exited. Watched through a pidfd, which is readable as soon
    as the process has exited (a daemonized server is reaped by init, seconds later)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        for sig in ((signal.SIGKILL,) if kill else (signal.SIGTERM, signal.SIGKILL)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            if select.select([pidfd], [], [], timeout)[0]:
                return
        raise RuntimeError(f"process {pid} did not exit")
    finally:
        os.close(pidfd)


def tls_client_options(tls: TLSFiles | None) -> dict[str, Any]:
    """redis-py options of a TLS client checking the servers' certificates (none without)."""
    return {"ssl": True, **tls.client_options()} if tls else {}


def wait_until(condition: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    """Poll ``condition`` (another process's state: nothing to wait on but polling)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except (redis.ConnectionError, redis.TimeoutError):
            pass  # a server restarting or being reconfigured: ask again
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting until {what}")
        time.sleep(0.02)


class SentinelServer:
    """One sentinel: ``redis-server CONF --sentinel``, stopped by the pid in its pidfile."""

    def __init__(self, folder: Path, master_port: int, *, tls: TLSFiles | None = None) -> None:
        self.port = free_port()
        self.folder = folder
        self.tls = tls
        self.conf = folder / f"sentinel-{self.port}.conf"
        self.pidfile = folder / f"sentinel-{self.port}.pid"
        lines = [
            f"port {0 if tls else self.port}", "bind 127.0.0.1", "daemonize yes",
            f"pidfile {self.pidfile}", f"logfile {folder / f'sentinel-{self.port}.log'}",
            f"dir {folder}",
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2",
            f"sentinel down-after-milliseconds {MASTER_NAME} 5000",
            f"sentinel failover-timeout {MASTER_NAME} 4000",
        ]
        if tls:  # clients and the monitored servers are reached over TLS only
            lines += [f"tls-port {self.port}", f"tls-cert-file {tls.cert}",
                      f"tls-key-file {tls.key}", f"tls-ca-cert-file {tls.ca}",
                      "tls-auth-clients no", "tls-replication yes"]
        self.conf.write_text("\n".join(lines) + "\n")

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5.0, socket_connect_timeout=2.0,
                           **tls_client_options(self.tls))

    def start(self, binary: str) -> None:
        subprocess.run([binary, str(self.conf), "--sentinel"], check=True,
                       stdout=subprocess.DEVNULL)
        client = self.client()
        try:
            wait_until(lambda: client.execute_command("SENTINEL", "DEBUG", *FAST_TIMERS),
                       f"sentinel {self.port} answers", timeout=10.0)
        finally:
            client.close()

    def pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it is still running after ``timeout`` seconds."""
        pid = self.pid()
        if pid is not None:
            stop_process(pid, timeout)
        self.pidfile.unlink(missing_ok=True)


class SentinelSetup:
    """One master, one replica, three sentinels (quorum 2) on free loopback ports.

    ``persistent`` gives both data nodes an append-only file; ``tls`` serves every node and
    sentinel over TLS only (replication too). Use as a context manager.
    """

    def __init__(self, *, persistent: bool = False, tls: TLSFiles | None = None) -> None:
        self.binary = find_server_binary()
        self.persistent = persistent
        self.tls = tls
        self.folder = Path(tempfile.mkdtemp(prefix="rediskit-sentinel-"))
        self.nodes = [self._data_node(), self._data_node()]
        self.master_port = self.nodes[0].port
        self.sentinels: list[SentinelServer] = []

    def _data_node(self) -> PrivateServer:
        extra = ["--repl-diskless-sync-delay", "0", "--enable-debug-command", "yes"]
        if self.persistent:
            extra += ["--appendonly", "yes", "--appendfsync", "no"]
        return PrivateServer(binary=self.binary, extra_args=tuple(extra))

    # -- addresses ------------------------------------------------------------------------
    @property
    def ports(self) -> list[int]:
        """The data nodes' client ports (the TLS ports with ``tls``)."""
        return [node.port for node in self.nodes]

    @property
    def replica_port(self) -> int:
        return next(p for p in self.ports if p != self.master_port)

    @property
    def url(self) -> str:
        """The sentinels in kombu's form: ``sentinel://127.0.0.1:P1;sentinel://...``."""
        return ";".join(f"sentinel://127.0.0.1:{s.port}" for s in self.sentinels)

    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", s.port) for s in self.sentinels]

    def node(self, port: int, **options: Any) -> redis.Redis:
        """An admin client of data node ``port`` (the default user)."""
        options.setdefault("socket_timeout", 5.0)
        options.setdefault("socket_connect_timeout", 2.0)
        return redis.Redis(port=port, **{**tls_client_options(self.tls), **options})

    def sentinel(self, **options: Any) -> Sentinel:
        """A redis-py ``Sentinel`` over the three sentinels (``options`` for the data nodes)."""
        tls = tls_client_options(self.tls)
        sentinel_kwargs: dict[str, Any] = {"socket_timeout": 2.0, **tls}
        options = {**tls, **options}
        return Sentinel(self.sentinel_addresses(), sentinel_kwargs=sentinel_kwargs, **options)

    # -- life -----------------------------------------------------------------------------
    def start(self) -> SentinelSetup:
        master, replica = self.nodes
        self._start_node(master, ())
        self._start_node(replica, ("--replicaof", "127.0.0.1", str(master.port)))
        self.sentinels = [SentinelServer(self.folder, master.port, tls=self.tls)
                          for _ in range(3)]
        for s in self.sentinels:
            s.start(self.binary)
        self.wait_ready()
        return self

    def _start_node(self, server: PrivateServer, extra: Sequence[str]) -> None:
        if self.tls:
            port = server.port
            base = server.extra_args
            server.extra_args = (*base, "--port", "0", "--tls-port", str(port),
                                 *self.tls.server_args(), "--tls-replication", "yes", *extra)
            self._start_tls_node(server)
            server.extra_args = base
        else:
            base = server.extra_args
            server.extra_args = (*base, *extra)
            server.start()
            server.extra_args = base

    def _start_tls_node(self, server: PrivateServer) -> None:
        # PrivateServer.start() waits for a plain PING; a TLS-only node needs a TLS one.
        server.pidfile.unlink(missing_ok=True)
        args = [server.binary, "--bind", "127.0.0.1", "--daemonize", "yes",
                "--pidfile", str(server.pidfile), "--dir", str(server.pidfile.parent),
                "--save", "", "--appendonly", "no",
                "--logfile", str(server.pidfile.parent / "server.log"), *server.extra_args]
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
        client = self.node(server.port)
        try:
            wait_until(client.ping, f"node {server.port} answers", timeout=10.0)
        finally:
            client.close()

    def restart_master(self) -> None:
        """Crash the master (SIGKILL) and start it again at once, on the same port, before
        the sentinels notice (their down-after is 5 s): with ``persistent`` it comes back with
        every acknowledged write (AOF), without it comes back empty, and its replica then
        resynchronises from it, empty too."""
        node = next(n for n in self.nodes if n.port == self.master_port)
        pid = node.pid()
        if pid is not None:
            stop_process(pid, kill=True)
        self._start_node(node, ())
        wait_until(lambda: self.linked(self.replica_port), "the replica is linked again")

    def close(self) -> None:
        for s in self.sentinels:
            s.stop()
        for node in self.nodes:  # killed: no save, no wait for a replica to catch up
            pid = node.pid()
            if pid is not None:
                stop_process(pid, kill=True)
            node.pidfile.unlink(missing_ok=True)
        shutil.rmtree(self.folder, ignore_errors=True)
        for node in self.nodes:
            shutil.rmtree(node.pidfile.parent, ignore_errors=True)

    def __enter__(self) -> SentinelSetup:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- state ----------------------------------------------------------------------------
    def role(self, port: int) -> str:
        client = self.node(port)
        try:
            return str(client.info("replication")["role"])
        finally:
            client.close()

    def linked(self, port: int) -> bool:
        """True when replica ``port`` is linked to its master and in sync."""
        client = self.node(port)
        try:
            info = client.info("replication")
            return info.get("role") == "slave" and info.get("master_link_status") == "up"
        finally:
            client.close()

    def masters_seen(self) -> set[int]:
        """The master port each sentinel names."""
        seen = set()
        for s in self.sentinels:
            c = s.client()
            try:
                _host, port = c.sentinel_get_master_addr_by_name(MASTER_NAME)
                seen.add(int(port))
            finally:
                c.close()
        return seen

    def _healthy(self) -> bool:
        # Every sentinel agrees on the master, knows the other two and sees one live replica.
        if self.masters_seen() != {self.master_port}:
            return False
        for s in self.sentinels:
            c = s.client()
            try:
                state = c.sentinel_master(MASTER_NAME)
                replicas = c.sentinel_slaves(MASTER_NAME)
            finally:
                c.close()
            if state["num-other-sentinels"] < 2 or not state["is_master"]:
                return False
            if not any(r["port"] == self.replica_port and not r["is_sdown"]
                       and r.get("master-link-status") == "ok" for r in replicas):
                return False
        return self.linked(self.replica_port)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until a failover is possible: the replica is linked, every sentinel knows
        the master, the replica and the other two sentinels."""
        wait_until(self._healthy, "the Sentinel setup is healthy", timeout)

    def failover(self, *, hold_demotion: bool = False,
                 timeout: float = 20.0) -> tuple[int, int]:
        """``SENTINEL FAILOVER`` and wait until the replica is master and every sentinel
        names it. Returns (old master port, new master port). The old master is not yet
        demoted: it still serves the connections it had (see :meth:`wait_demoted`).

        ``hold_demotion``: the sentinels cannot demote the old master until
        :meth:`end_hold` (its ``REPLICAOF`` is denied to them by ACL meanwhile), so the time
        it keeps serving its connections is the test's to choose, as it is the sentinels'
        timers' in production (about 10 s by default)."""
        old, new = self.master_port, self.replica_port
        if hold_demotion:
            self._allow_replicaof(old, False)
        c = self.sentinels[0].client()
        try:
            c.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
        finally:
            c.close()
        wait_until(lambda: self.role(new) == "master", "the replica is promoted", timeout)
        wait_until(lambda: self.masters_seen() == {new}, "every sentinel names the new master",
                   timeout)
        self.master_port = new
        return old, new

    def _allow_replicaof(self, port: int, allow: bool) -> None:
        # Sentinel sends SLAVEOF (and CONFIG REWRITE, CLIENT KILL) in one MULTI: a command
        # the default user may not run aborts it all.
        sign = "+" if allow else "-"
        client = self.node(port)
        try:
            client.acl_setuser("default", enabled=True, commands=[f"{sign}slaveof",
                                                                  f"{sign}replicaof"])
        finally:
            client.close()

    def end_hold(self, port: int, timeout: float = 20.0) -> None:
        """Let the sentinels demote old master ``port`` (held by ``failover(hold_demotion=
        True)``) and wait until they have."""
        self._allow_replicaof(port, True)
        self.wait_demoted(port, timeout)

    def wait_demoted(self, port: int, timeout: float = 20.0) -> None:
        """Wait until the sentinels have made old master ``port`` a replica of the new one."""
        wait_until(lambda: self.linked(port), f"the old master {port} is a linked replica",
                   timeout)

    def replicated(self, timeout: float = 5.0) -> bool:
        """True once the replica acknowledged every write made on the master so far."""
        client = self.node(self.master_port)
        try:
            return int(client.wait(1, int(timeout * 1000))) >= 1
        finally:
            client.close()
