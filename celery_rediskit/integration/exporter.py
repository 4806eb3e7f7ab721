"""Gauges read from Redis, for ``celery -A proj rediskit metrics --port N``.

At each scrape, one SCAN of the keys under the app's prefix (``report.read_resources``:
``SCAN ... MATCH ... COUNT 1000``, every primary of a cluster) finds the held locks and every
semaphore, each batch read in one round trip. Gauges are summed by declared name
(``naming.py``), from the ``concurrency_limit`` templates of the app's tasks:

- ``rediskit_permits_total{name}``: the permits of the semaphores of that name;
- ``rediskit_permits_acquired{name}``: their permits held now;
- ``rediskit_locks_held{name}``: locks held now (singleton locks by task, queued-scope
  claims as ``queued:singleton:<task>``);
- ``rediskit_redis_up``: 1 when Redis answered this scrape, 0 when not (then the gauges
  above are left out, and the outage is logged once, not at every scrape).

They describe Redis, not a worker: serve them from one exporter, not from every worker.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from ..lease import LeaseKind
from ..report import read_resources
from .metrics import serve
from .naming import NameMatcher, templates_of

__all__ = ["RedisGauges", "serve_gauges"]

log = logging.getLogger("celery_rediskit")


class RedisGauges:
    """A prometheus_client collector of the gauges above, for the keys under ``prefix``."""

    def __init__(self, client: Any, prefix: str, names: NameMatcher) -> None:
        self.client = client
        self.prefix = prefix
        self.names = names
        self.down = False  # the last scrape could not read Redis

    def collect(self) -> Iterator[GaugeMetricFamily]:
        total: dict[str, int] = defaultdict(int)
        acquired: dict[str, int] = defaultdict(int)
        locks: dict[str, int] = defaultdict(int)
        up = GaugeMetricFamily("rediskit_redis_up", "1 if Redis answered this scrape, else 0")
        try:
            resources = read_resources(self.client, self.prefix, include_idle=True)
        except (redis.RedisError, OSError) as exc:
            if not self.down:
                log.warning("rediskit: metrics: cannot read Redis: %s", exc)
            self.down = True
            up.add_metric([], 0)
            yield up
            return
        if self.down:
            log.warning("rediskit: metrics: Redis answers again")
        self.down = False
        up.add_metric([], 1)
        yield up
        for resource in resources:
            name = self.names(resource.kind, resource.key)
            if resource.kind is LeaseKind.MUTEX:
                locks[name] += 1
            else:
                total[name] += resource.total or 0
                acquired[name] += resource.acquired or 0
        for metric, doc, counts in (
            ("rediskit_permits_total", "Permits of the semaphores of each declared name",
             total),
            ("rediskit_permits_acquired", "Permits held now, by declared name", acquired),
            ("rediskit_locks_held", "Locks held now, by declared name", locks),
        ):
            family = GaugeMetricFamily(metric, doc, labels=["name"])
            for name, value in sorted(counts.items()):
                family.add_metric([name], value)
            yield family


def serve_gauges(app: Any, client: Any, prefix: str, address: str, port: int | None,
                 once: bool, echo: Callable[[str], None]) -> None:
    """``rediskit metrics``: print the gauges once, or serve them until interrupted. The
    declared names come from the app's tasks (its ``imports``/``include`` modules too)."""
    app.loader.import_default_modules()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RedisGauges(client, prefix, NameMatcher(templates_of(app))))
    if once:
        echo(generate_latest(registry).decode().rstrip("\n"))
        return
    server = serve(registry, address, port or 0)
    echo(f"serving the gauges of prefix {prefix!r} on "
         f"http://{address}:{server.server_port}/metrics")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
