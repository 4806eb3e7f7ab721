"""The registry of benchmark sections: ``python -m bench NAME`` runs one, no argument all.

A section names the library API it measures (``requires``: ``"module:attribute"`` paths) and
its runner (``"module:function"``, called as ``run(env, log)``, returning a
:class:`~bench.common.SectionResult`). When a required attribute or the runner's module is not
importable yet, the section is reported as "skipped: not available", never as a failure.

To add a section: write ``bench/<name>_bench.py`` with ``run(env, log)`` (see
``mutex_bench.py``; ``bench.contention`` runs N threads or processes against any contender)
and append a :class:`Section` here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Section:
    name: str
    title: str
    runner: str
    requires: tuple[str, ...] = ()

    def missing(self) -> str | None:
        """What is not importable (None when the section can run)."""
        for path in (*self.requires, self.runner):
            module, _, attr = path.partition(":")
            try:
                mod = importlib.import_module(module)
            except ImportError:
                return module
            if attr and not hasattr(mod, attr):
                return path
        return None


SECTIONS: list[Section] = [
    Section(
        "mutex", "Mutex: uncontended cycle; 8 threads and 4 processes on one lock",
        runner="bench.mutex_bench:run",
        requires=("celery_rediskit:create_mutex", "celery_rediskit:RedisMutexStorage"),
    ),
    Section(
        "semaphore", "Semaphore: 16 threads, 4 permits, 1 ms work (vs 4-token BLPOP, "
        "redis-semaphore)",
        runner="bench.semaphore_bench:run",
        requires=("celery_rediskit:create_semaphore", "celery_rediskit:RedisSemaphoreStorage"),
    ),
    Section(
        "cache", "Cache: @cached hit vs raw GET; round trips per hit and miss",
        runner="bench.cache_bench:run",
        requires=("celery_rediskit.cache:RedisCacheProvider", "celery_rediskit.cache:cached"),
    ),
    Section(
        "cluster", "Cluster: uncontended locks over many keys, 3 masters vs 1 master",
        runner="bench.cluster_bench:run",
        requires=("celery_rediskit.devserver:PrivateCluster",
                  "celery_rediskit:RedisMutexStorage"),
    ),
    Section(
        "ratelimit", "Rate limiter: check vs raw INCR+PEXPIRE; round trips per check",
        runner="bench.ratelimit_bench:run",
        requires=("celery_rediskit:create_rate_limiter",
                  "celery_rediskit:RedisRateLimitStorage"),
    ),
    Section(
        "celery", "Celery: plain vs singleton vs limited task throughput; cache hit",
        runner="bench.celery_bench:run",
        requires=("celery_rediskit.integration:RedisKit",),
    ),
    Section(
        "park", "Park vs retry: 1,000 tasks of 50 ms under \"x:1\" and \"x:4\", 2 workers x 4",
        runner="bench.park_bench:run",
        requires=("celery_rediskit.integration.parking:Sweeper",),
    ),
    Section(
        "renewal", "Renewal: server time per script with 5,000 and 50,000 leases held",
        runner="bench.renewal_bench:run",
        requires=("celery_rediskit._redis.renew_batch:RedisRenewal",),
    ),
    Section(
        "startup", "Startup and memory: import times, the RSS a worker process gains",
        runner="bench.startup_bench:run",
        requires=("celery_rediskit.integration:RedisKit",),
    ),
    Section(
        "peers", "Task options vs celery-once and celery-singleton: worker and Redis CPU per "
        "task, round trips, throughput",
        runner="bench.peers_bench:run",
        requires=("celery_rediskit.integration:RedisKit",),
    ),
]

BY_NAME = {s.name: s for s in SECTIONS}


def lookup(path: str) -> object:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)
