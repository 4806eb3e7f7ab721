"""An example Celery app using celery-rediskit: run it with ``celery -A tasks worker``.

``REDIS_URL`` (default ``redis://localhost:6379/0``) is the broker, the result backend and
where locks, permits and cached results live. ``examples/demo.py`` starts a private Redis,
two of these workers and a producer.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

from celery_rediskit.integration import RedisKit

URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")

app = Celery("examples", broker=URL, backend=URL)
app.conf.update(
    task_default_queue=os.environ.get("DEMO_QUEUE", "rediskit-demo"),
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    rediskit_prefix=os.environ.get("DEMO_PREFIX", "rediskit-demo"),
    rediskit_lease=10,          # seconds; renewed every lease/3 while a task runs
    rediskit_retry_delay=0.2,   # re-queue countdown for locked/limited tasks (jittered)
)
RedisKit(app)  # settings come from app.conf (rediskit_*); define tasks after this line

stats = redis.Redis.from_url(URL)  # only for the demo's own counters
STATS = app.conf.rediskit_prefix + ":demo"
_ENTER = stats.register_script("""
local n = redis.call('INCR', KEYS[1])
redis.call('INCR', KEYS[2])
if n > tonumber(redis.call('GET', KEYS[3]) or '0') then redis.call('SET', KEYS[3], n) end
return n
""")


def stat(name: str, what: str) -> int:
    """The demo's counters: ``runs`` of a body, its ``peak`` of bodies at once."""
    return int(stats.get(f"{STATS}:{name}:{what}") or 0)


def _enter(name: str) -> None:
    _ENTER(keys=[f"{STATS}:{name}:now", f"{STATS}:{name}:runs", f"{STATS}:{name}:peak"])


def _exit(name: str) -> None:
    stats.decr(f"{STATS}:{name}:now")


@app.task(singleton=True, singleton_scope="queued", singleton_key=("account_id",))
def refresh_report(account_id: int) -> str:
    """At most one queued or running per account: duplicates get the first task's id."""
    _enter("report")
    time.sleep(1.0)
    _exit("report")
    return f"report {account_id} refreshed"


@app.task(concurrency_limit="db:3")
def heavy_query(i: int) -> int:
    """At most 3 run at once across every worker; the rest are re-queued, not parked."""
    _enter("db")
    time.sleep(0.3)
    _exit("db")
    return i


@app.task(cache_ttl="5m", cache_tags=["sku:{sku}"])
def price(sku: str) -> float:
    """Computed once, then served from the shared cache (without running the body)."""
    time.sleep(0.5)
    return round(sum(map(ord, sku)) / 7, 2)


@app.task(bind=True, singleton=True, singleton_key=())
def nightly_export(self) -> int:  # type: ignore[no-untyped-def]
    """A singleton that writes with its fencing token, so a stale holder can be refused."""
    time.sleep(3)
    return int(self.lease.fencing_token)
