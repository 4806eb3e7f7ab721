"""The tests' Redis Cluster: ``celery_rediskit.devserver.PrivateCluster`` (masters, a replica
per master if asked, joined with CLUSTER MEET, stopped by pid) plus what the tests do to it.

``migrate_slot`` moves one slot between masters the way ``redis-cli --cluster reshard`` does
(IMPORTING / MIGRATING, MIGRATE of the keys, SETSLOT NODE on every master), and can stop
half-way so that clients meet ASK redirections; a node's ``kill``/``pause`` are SIGKILL and
SIGSTOP, and ``wait_promoted`` waits until the replica of a killed master has taken its place.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import redis

from celery_rediskit.devserver import SLOTS, NodeServer, PrivateCluster

__all__ = ["Cluster", "Node", "key_slot"]

Node = NodeServer


@dataclass
class Cluster(PrivateCluster):
    """A :class:`PrivateCluster` with the faults and look-ups of the cluster tests."""

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
