"""Prometheus metrics of the integration (extra ``[metrics]``: ``prometheus_client``).

One source of truth: every metric here is counted by a receiver of the integration's
signals (``signals.py``); nothing in the task's code paths knows of Prometheus.
:func:`enable` makes the metrics and connects those receivers in this process (a worker
does it itself with ``rediskit_metrics_port``, see ``worker_metrics.py``; a process that
sends tasks may call it to count its send-time cache hits and duplicates). The gauges read
from Redis are ``exporter.py``'s.

Labels are bounded by the code, never by the data: ``name`` is the declared name
(``naming.py``: ``tenant:{tenant_id}``, ``singleton:<task>``), ``kind`` is ``lock`` or
``semaphore``, ``reason`` a fixed word, ``task`` a task name.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, make_wsgi_app

from .signals import (
    acquire_timeout,
    cache_hit,
    cache_miss,
    lease_acquired,
    lease_lost,
    lease_released,
    task_parked,
    task_requeued,
    task_skipped,
)

__all__ = ["HOLD_BUCKETS", "WAIT_BUCKETS", "Metrics", "disable", "enable", "serve"]

WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0, 300.0)
"""Buckets (seconds) of ``rediskit_acquire_wait_seconds``: a free resource is granted in
one round trip (about a millisecond), a ``wait`` can last up to ``limit_timeout``."""

HOLD_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
                3600.0)
"""Buckets (seconds) of ``rediskit_hold_seconds``: how long task bodies hold a resource."""

_LEASE = ("name", "kind")


@dataclass(frozen=True)
class Metrics:
    """The metric objects, as :func:`enable` made them."""

    acquire_wait: Histogram
    hold: Histogram
    grants: Counter
    acquire_timeouts: Counter
    leases_lost: Counter
    task_requeues: Counter
    tasks_skipped: Counter
    tasks_parked: Counter
    cache_requests: Counter
    registry: CollectorRegistry | None


def _make(registry: CollectorRegistry | None) -> Metrics:
    return Metrics(
        acquire_wait=Histogram(
            "rediskit_acquire_wait_seconds",
            "Seconds from a task's first attempt at a lock or permit to its grant, in one run",
            _LEASE, registry=registry, buckets=WAIT_BUCKETS),
        hold=Histogram(
            "rediskit_hold_seconds",
            "Seconds a task held a lock or permit, from its grant to its release",
            _LEASE, registry=registry, buckets=HOLD_BUCKETS),
        grants=Counter(
            "rediskit_grants",
            "Locks and permits granted to tasks", _LEASE, registry=registry),
        acquire_timeouts=Counter(
            "rediskit_acquire_timeouts",
            "Blocking waits for a lock or permit that ran out (limit_timeout)",
            _LEASE, registry=registry),
        leases_lost=Counter(
            "rediskit_leases_lost",
            "Locks and permits a running task lost (expired or taken away)",
            _LEASE, registry=registry),
        task_requeues=Counter(
            "rediskit_task_requeues",
            "Tasks sent again because their lock was held (reason=locked) or their limit "
            "full (reason=limited)", ("reason", "name"), registry=registry),
        tasks_skipped=Counter(
            "rediskit_tasks_skipped",
            "Task runs skipped: lock held with on_locked=skip (reason=locked), or a "
            "queued-scope duplicate (reason=duplicate)", ("reason", "name"),
            registry=registry),
        tasks_parked=Counter(
            "rediskit_tasks_parked",
            "Task runs parked in Redis: lock held with on_locked=park (reason=locked), or "
            "limit full with on_limited=park (reason=limited)", ("reason", "name"),
            registry=registry),
        cache_requests=Counter(
            "rediskit_cache_requests",
            "Lookups of cached task results (result=hit|miss), at send and at run time",
            ("task", "result"), registry=registry),
        registry=registry,
    )


_lock = threading.Lock()
_current: Metrics | None = None
_handlers: list[tuple[Any, Callable[..., None]]] = []


def _receivers(m: Metrics) -> list[tuple[Any, Callable[..., None]]]:
    def acquired(name: str = "", kind: str = "", wait: float = 0.0, **_: Any) -> None:
        m.grants.labels(name, kind).inc()
        m.acquire_wait.labels(name, kind).observe(wait)

    def released(name: str = "", kind: str = "", held: float = 0.0, **_: Any) -> None:
        m.hold.labels(name, kind).observe(held)

    def timed_out(name: str = "", kind: str = "", **_: Any) -> None:
        m.acquire_timeouts.labels(name, kind).inc()

    def lost(name: str = "", kind: str = "", **_: Any) -> None:
        m.leases_lost.labels(name, kind).inc()

    def requeued(reason: str = "", name: str = "", **_: Any) -> None:
        m.task_requeues.labels(reason, name).inc()

    def skipped(reason: str = "", name: str = "", **_: Any) -> None:
        m.tasks_skipped.labels(reason, name).inc()

    def parked(reason: str = "", name: str = "", **_: Any) -> None:
        m.tasks_parked.labels(reason, name).inc()

    def hit(sender: Any = None, **_: Any) -> None:
        m.cache_requests.labels(getattr(sender, "name", ""), "hit").inc()

    def miss(sender: Any = None, **_: Any) -> None:
        m.cache_requests.labels(getattr(sender, "name", ""), "miss").inc()

    return [(lease_acquired, acquired), (lease_released, released),
            (acquire_timeout, timed_out), (lease_lost, lost), (task_requeued, requeued),
            (task_skipped, skipped), (task_parked, parked), (cache_hit, hit),
            (cache_miss, miss)]


def enable(registry: CollectorRegistry | None = REGISTRY) -> Metrics:
    """Make the metrics (registered in ``registry``; default: prometheus_client's global
    one, which ``prometheus_client.start_http_server`` serves) and count the signals of this
    process into them. Idempotent: a second call returns the same metrics."""
    global _current
    with _lock:
        if _current is None:
            metrics = _make(registry)
            handlers = _receivers(metrics)
            for signal, handler in handlers:
                signal.connect(handler, weak=False)
            _handlers[:] = handlers
            _current = metrics
        return _current


def disable() -> None:
    """Stop counting: disconnect the receivers and unregister the metrics."""
    global _current
    with _lock:
        metrics, _current = _current, None
        for signal, handler in _handlers:
            signal.disconnect(handler)
        _handlers.clear()
        if metrics is not None and metrics.registry is not None:
            for metric in (metrics.acquire_wait, metrics.hold, metrics.grants,
                           metrics.acquire_timeouts, metrics.leases_lost, metrics.task_requeues,
                           metrics.tasks_skipped, metrics.tasks_parked,
                           metrics.cache_requests):
                metrics.registry.unregister(metric)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        pass  # one line per scrape would flood the worker's log


def serve(registry: CollectorRegistry, address: str, port: int) -> WSGIServer:
    """Serve ``registry`` at ``http://address:port/`` (any path, ``/metrics`` included) from
    a daemon thread; ``port`` 0 picks a free one (``server.server_port``). Stop it with
    ``server.shutdown()`` and ``server.server_close()``."""
    server = make_server(address, port, make_wsgi_app(registry), _Server, _QuietHandler)
    threading.Thread(target=server.serve_forever, name="rediskit-metrics", daemon=True).start()
    return server
