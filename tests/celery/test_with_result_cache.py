"""A worker's cache miss writes the cache entry in the transaction that stores the run's
result, when the result backend is on the library's server and database
(``integration/with_result.py``); else, or when no result is stored, on its own as before.
The round trips of the worker's pool thread are recorded on both clients, the library's and
the result backend's (``tests/roundtrips.py``)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from celery.signals import task_postrun

from celery_rediskit._redis.scripts import LuaScript, wrapped_script
from celery_rediskit.testing import PrivateServer
from tests.interrupts import wait_until
from tests.keyspace import keyspace_events
from tests.roundtrips import record_round_trips

from .conftest import in_process_worker, make_app

WAIT = 20

Trips = list[tuple[int, list[str]]]


class Worker:
    """An app whose one worker thread's round trips are recorded, and its task ``job``
    (``cache_ttl``; each call's body is noted in ``ran``)."""

    def __init__(self, url: str, prefix: str, **options: Any) -> None:
        self.client = redis.Redis.from_url(url)
        self.trips: Trips = []
        record_round_trips(self.client, self.trips)
        self.app = make_app(url, prefix, client=self.client)
        self.ran: list[Any] = []
        self.thread: list[int] = []  # the pool thread that runs the body

        @self.app.task(shared=False, bind=True, cache_ttl="5m", **options)
        def job(task: Any, x: Any) -> Any:
            if not self.thread:  # the first run: the backend's round trips recorded too
                self.thread.append(threading.get_ident())
                record_round_trips(task.backend.client, self.trips)
            self.ran.append(x)
            return x

        self.job = job
        self.ended: dict[str, threading.Event] = {}  # task id: its task_postrun was sent

        def ended(task_id: str = "", **_: Any) -> None:  # after the result's store
            self.ended.setdefault(task_id, threading.Event()).set()

        self._ended = ended
        task_postrun.connect(ended, weak=False)

    def close(self) -> None:
        task_postrun.disconnect(self._ended)
        self.app.close()
        self.client.close()

    def sent(self) -> list[list[str]]:
        """The round trips of the worker's pool thread, both clients, in order."""
        return [names for thread, names in self.trips if thread == self.thread[0]]

    def sent_by(self, result: Any) -> list[list[str]]:
        """:meth:`sent` once the run of ``result`` is over in the worker: a caller can get
        the result before the worker has read the reply of the transaction storing it."""
        assert self.ended.setdefault(result.id, threading.Event()).wait(WAIT)
        return self.sent()


@contextmanager
def _worker(url: str, prefix: str, **options: Any) -> Iterator[Worker]:
    w = Worker(url, prefix, **options)
    try:
        with in_process_worker(w.app, concurrency=1):
            yield w
    finally:
        w.close()


def _entries(client: redis.Redis, prefix: str) -> dict[bytes, bytes]:
    return {k: client.get(k) for k in client.scan_iter(match=f"{prefix}:cache:e:*")}


def test_a_cache_miss_stores_its_entry_in_the_round_trip_storing_its_result(
    redis_url: str, prefix: str, client: redis.Redis
) -> None:
    """A miss: the lookup, then the entry and the result written in one script (the entry
    first). Before, the entry's store was a round trip of its own, between the body and the
    result's store; then a script of its own in the store's transaction."""
    with _worker(redis_url, prefix) as w:
        warm = w.job.delay("warm")  # scripts loaded, backend
        assert warm.get(timeout=WAIT) == "warm"
        w.sent_by(warm)
        w.trips.clear()
        miss = w.job.delay("miss")
        assert miss.get(timeout=WAIT) == "miss"
        sent = w.sent_by(miss)
        entries = _entries(client, prefix)  # a caller with the result finds the entry
    # the lookup, then one round trip: one script writing the entry, then the result
    # (Celery's read of the stored state before it skipped, as for a store carrying releases)
    assert sent == [["GET"], ["EVALSHA"]]
    assert sorted(v.rsplit(b"\n", 1)[1] for v in entries.values()) == [b'"miss"', b'"warm"']
    assert w.ran == ["warm", "miss"]
    assert w.job.delay("miss").get(timeout=WAIT) == "miss"  # served from the cache
    assert w.ran == ["warm", "miss"]


def _store_script(task: str) -> LuaScript:
    """The script that stores the result of a run of ``task`` (with_result.py)."""
    if task == "single":  # the lock's release and the store
        return wrapped_script("store_after", "claims_mutex_release")
    return wrapped_script("store_after", "cache_set")  # the entry's write and the store


@pytest.mark.parametrize("loaded", ["none", "store only"])
@pytest.mark.parametrize("task", ["cached", "single"])
def test_a_cache_script_the_server_forgot_still_writes_the_entry_before_the_result(
    private_server: PrivateServer, prefix: str, task: str, loaded: str
) -> None:
    """After the server lost its scripts (a restart, a failover, SCRIPT FLUSH), the entry's
    script fails in the store's transaction (NOSCRIPT fails that command only): the entry is
    still written, and before the result is stored (in the server's own order: keyspace
    events), so a caller that has the result finds it; a singleton's lock is released too."""
    url = private_server.url
    admin = redis.Redis.from_url(url)
    admin.config_set("notify-keyspace-events", "Kg$z")
    options = {"singleton": True} if task == "single" else {}
    try:
        with _worker(url, prefix, **options) as w:
            warm = w.job.delay("warm")
            assert warm.get(timeout=WAIT) == "warm"
            w.sent_by(warm)
            admin.script_flush()
            if loaded == "store only":  # reloaded meanwhile by another run's store
                admin.script_load(_store_script(task).source)
            w.trips.clear()
            result: list[Any] = []
            events = keyspace_events(admin, lambda: result.append(w.job.delay("miss")),
                                      b"set")
            assert result[0].get(timeout=WAIT) == "miss"
            sent = w.sent_by(result[0])
            entries = _entries(admin, prefix)
            locks = [k for k in admin.scan_iter(match=f"{prefix}:lock:*") if k.endswith(b"}")]
    finally:
        admin.close()
    # the entry's write, then the store with the release (a transaction); with no release,
    # one script
    store = ["MULTI", "EVALSHA", "EVALSHA", "EXEC"] if task == "single" else ["EVALSHA"]
    assert store in sent, f"the store did not take the write: {sent}"
    entry = [k for k in entries if entries[k].endswith(b'"miss"')]
    assert len(entry) == 1, entries
    written = [i for i, (k, e) in enumerate(events) if k == entry[0] and e == b"set"]
    assert written, f"the entry was not written before the result: {events}"
    assert locks == []


def test_an_ignore_result_task_still_caches(
    redis_url: str, prefix: str, client: redis.Redis
) -> None:
    """No store to ride in: the entry is written on its own, right after the body."""
    with _worker(redis_url, prefix, ignore_result=True) as w:
        w.job.delay("warm")
        wait_until(lambda: len(_entries(client, prefix)) == 1)
        w.trips.clear()
        w.job.delay("miss")
        wait_until(lambda: len(_entries(client, prefix)) == 2)
        # the entry's trip is recorded just after it was sent, so a moment after the entry
        # is seen: wait for it (an entry in a store would never show here)
        wait_until(lambda: ["EVALSHA"] in w.sent(), timeout=5)
        assert w.job.delay("miss").get(timeout=WAIT) == "miss"  # served from the cache
    assert w.ran == ["warm", "miss"]
    assert all(t in (["GET"], ["EVALSHA"]) for t in w.sent()), w.sent()


def test_a_success_stored_already_is_kept_and_the_entry_written(
    redis_url: str, prefix: str, client: redis.Redis
) -> None:
    """No result is stored over a SUCCESS stored already (a redelivered run that had
    finished): the entry handed to the store is written all the same."""
    with _worker(redis_url, prefix) as w:
        assert w.job.delay("warm").get(timeout=WAIT) == "warm"
        task_id = f"done-{prefix}"
        meta = w.app.backend.encode({"status": "SUCCESS", "result": "before", "traceback": None,
                                     "children": [], "task_id": task_id})
        client.set(f"celery-task-meta-{task_id}", meta, ex=600)
        w.job.apply_async(("again",), task_id=task_id)
        wait_until(lambda: len(_entries(client, prefix)) == 2)
        assert w.job.delay("again").get(timeout=WAIT) == "again"  # served from the cache
    assert w.ran == ["warm", "again"]
    assert client.get(f"celery-task-meta-{task_id}") == meta.encode()  # left as it was
