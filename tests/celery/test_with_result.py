"""A worker's run sends its releases in the transaction that stores its result, when the
result backend is on the library's server and database (``integration/with_result.py``); else,
or when no result is stored, on their own as before. The library's client records its round
trips (``tests/roundtrips.py``); Celery's backend has a client of its own."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from celery import Celery
from celery.exceptions import Ignore
from celery.signals import task_postrun

from celery_rediskit._redis.scripts import wrapped_script
from celery_rediskit.testing import PrivateServer
from tests.interrupts import wait_until
from tests.keyspace import keyspace_events
from tests.monitor import client_commands, command_names
from tests.roundtrips import round_trip_client

from .conftest import in_process_worker, make_app

WAIT = 20


def _locked(client: redis.Redis, prefix: str) -> list[Any]:
    """Lock owner keys and semaphore holders left (a lock's fence and release records stay)."""
    return [k for k in client.scan_iter(match=f"{prefix}:*") if b":cache:" not in k and (
            k.endswith(b"}") or k.endswith(b":holders") or b":claims:" in k)]


def _scripts(trips: list[list[str]]) -> list[list[str]]:
    return [t for t in trips if "EVALSHA" in t]


def _app(redis_url: str, prefix: str, backend: str | None = None,
         ) -> tuple[Celery, redis.Redis, list[list[str]]]:
    c, trips = round_trip_client(redis_url)
    app = make_app(redis_url, prefix, client=c)
    if backend is not None:
        app.conf.result_backend = backend
    return app, c, trips


def _run(app: Celery, trips: list[list[str]], call: Callable[[], Any]) -> list[list[str]]:
    with in_process_worker(app, concurrency=1):
        call()  # warm-up: scripts loaded, backend checked
        trips.clear()
        call()
        return _scripts(list(trips))


def test_a_run_releases_in_the_round_trip_storing_its_result(
    redis_url: str, prefix: str, client: redis.Redis
) -> None:
    """A singleton + limited task: the library's client sends the two acquires and the
    result's store, which carries the releases and the claims record's deletion (done when
    the result can be read): no round trip of their own."""
    app, c, trips = _app(redis_url, prefix)

    @app.task(shared=False, singleton=True, concurrency_limit="db:2")
    def job(x: int) -> int:
        return x

    def call() -> None:
        assert job.delay(3).get(timeout=WAIT) == 3
        assert _locked(client, prefix) == []  # visible together with the result

    try:
        sent = _run(app, trips, call)
    finally:
        app.close()
        c.close()
    assert sent == [["EVALSHA"], ["EVALSHA"], ["MULTI", "EVALSHA", "EVALSHA", "EXEC"]], (
        "the two acquires, then the store: the first release, the last with the store")


def test_a_failed_run_releases_with_its_stored_failure(
    redis_url: str, prefix: str, client: redis.Redis
) -> None:
    app, c, trips = _app(redis_url, prefix)

    @app.task(shared=False, singleton=True)
    def boom(x: int) -> int:
        raise ValueError(x)

    def call() -> None:
        with pytest.raises(ValueError):
            boom.delay(1).get(timeout=WAIT)
        assert _locked(client, prefix) == []

    try:
        sent = _run(app, trips, call)
    finally:
        app.close()
        c.close()
    assert sent == [["EVALSHA"], ["EVALSHA"]], "the acquire, the release with the store"


@pytest.mark.parametrize("how", ["ignore_result", "Ignore"])
def test_without_a_stored_result_the_releases_go_on_their_own(
    redis_url: str, prefix: str, client: redis.Redis, how: str
) -> None:
    """No store to ride in (the task ignores its result, or raises Ignore): the releases
    are sent by the library's client, right after the body (ignore_result) or in the
    backend's cleanup after the run (Ignore)."""
    app, c, trips = _app(redis_url, prefix)
    ran: list[int] = []

    @app.task(shared=False, singleton=True, ignore_result=how == "ignore_result")
    def job(x: int) -> None:
        ran.append(x)
        if how == "Ignore":
            raise Ignore()

    idle = threading.Event()

    @app.task(shared=False, ignore_result=True)
    def ping() -> None:
        idle.set()

    def call() -> None:
        count = len(ran) + 1
        job.delay(count)
        wait_until(lambda: len(ran) == count and _locked(client, prefix) == [])

    try:
        with in_process_worker(app, concurrency=1):
            call()  # warm-up
            # Its release's trip is recorded a moment after the lock is seen free: the one
            # pool thread runs the next task only once that run (and its cleanup) is done.
            ping.delay()
            assert idle.wait(WAIT)
            trips.clear()
            call()
            # the release's trip is recorded just after it was sent, so a moment after the
            # lock is seen free: wait for it (a release in a store would never show here)
            wait_until(lambda: _scripts(trips) == [["EVALSHA"], ["EVALSHA"]], timeout=5)
    finally:
        app.close()
        c.close()


def test_a_backend_on_another_database_is_left_alone(
    redis_url: str, prefix: str, client: redis.Redis
) -> None:
    other_db = redis_url.rsplit("/", 1)[0] + "/" + ("2" if redis_url.endswith("/1") else "1")
    app, c, trips = _app(redis_url, prefix, backend=other_db)

    @app.task(shared=False, singleton=True)
    def job(x: int) -> int:
        return x

    def call() -> None:
        assert job.delay(3).get(timeout=WAIT) == 3
        assert _locked(client, prefix) == []

    try:
        sent = _run(app, trips, call)
    finally:
        app.close()
        c.close()
    assert sent == [["EVALSHA"], ["EVALSHA"]], "acquire, then release on their own"


@pytest.mark.parametrize("loaded", ["none", "store only"])
@pytest.mark.parametrize("task", ["single", "limited", "both", "queued"])
def test_scripts_the_server_forgot_still_release_before_the_result_is_stored(
    private_server: PrivateServer, prefix: str, task: str, loaded: str
) -> None:
    """After the server lost its scripts (a restart, a failover, SCRIPT FLUSH) a run's
    releases and the deletion of its claims record still come before its result is stored,
    in the server's own order (keyspace events): a caller that has the result finds them
    done. Before, the store went through and the releases followed it in a round trip of
    their own (test_long_tasks saw the record outlive its task)."""
    url = private_server.url
    client = redis.Redis.from_url(url)
    client.config_set("notify-keyspace-events", "Kg$z")
    app, c, _trips = _app(url, prefix)
    options: dict[str, Any] = {
        "single": {"singleton": True},
        "limited": {"concurrency_limit": "db:2"},
        "both": {"singleton": True, "concurrency_limit": "db:2"},
        "queued": {"singleton": True, "singleton_scope": "queued"},
    }[task]

    @app.task(shared=False, **options)
    def job(x: int) -> int:
        return x

    try:
        with in_process_worker(app, concurrency=1):
            assert job.delay(1).get(timeout=WAIT) == 1  # warm-up: scripts loaded, backend
            client.script_flush()
            if loaded == "store only":  # reloaded meanwhile by another run's store
                last = {"limited": "claims_sem_release", "queued": "claims_queued_release",
                        }.get(task, "claims_mutex_release")
                client.script_load(wrapped_script("store_after", last).source)
            result: list[Any] = []
            events = keyspace_events(client, lambda: result.append(job.delay(2)), b"set")
            assert result[0].get(timeout=WAIT) == 2
            assert _locked(client, prefix) == []
    finally:
        app.close()
        c.close()
        client.close()
    mine = [(k, e) for k, e in events if k.startswith(prefix.encode())]
    record = [e for k, e in mine if b":claims:" in k]
    released = [e for k, e in mine if k.endswith(b"}") or k.endswith(b":holders")]
    # the record written by the acquire, then deleted; each lease taken, then given back
    assert record[-1] == b"del", events
    assert released and released[-1] in (b"del", b"zrem"), events


def _meta(client: redis.Redis, task_id: str) -> dict[str, Any] | None:
    raw = client.get(f"celery-task-meta-{task_id}")
    return None if raw is None else json.loads(raw)


@contextmanager
def _watched_run(url: str, prefix: str, options: dict[str, Any], *, scripts: bool = False,
                 after_warm_up: Callable[[redis.Redis], None] | None = None,
                 ) -> Iterator[tuple[Any, str, list[str], redis.Redis]]:
    """One run of a task with ``options`` (its body returns its argument) on an in-process
    worker, after a warm-up run, under a MONITOR (``tests.monitor.client_commands``): yields, while
    the worker still runs, the task, the run's id, the commands seen and a client, once the
    result is stored and nothing is held. The result is not fetched (``AsyncResult.get()``
    would read the key itself)."""
    client = redis.Redis.from_url(url)
    app, c, _trips = _app(url, prefix)

    @app.task(shared=False, **options)
    def job(x: int) -> int:
        return x

    try:
        with in_process_worker(app, concurrency=1):
            assert job.delay(1).get(timeout=WAIT) == 1  # warm-up: scripts loaded, backend
            if after_warm_up is not None:
                after_warm_up(client)
            task_id = str(uuid.uuid4())
            with client_commands(url, scripts=scripts) as seen:
                job.apply_async((2,), task_id=task_id)
                wait_until(lambda: client.exists(f"celery-task-meta-{task_id}") == 1
                           and _locked(client, prefix) == [])
            yield job, task_id, seen, client
    finally:
        app.close()
        c.close()
        client.close()


@pytest.mark.parametrize("options", [{"singleton": True}, {"concurrency_limit": "db:2"}])
def test_the_store_carrying_the_releases_skips_celerys_read_before_it(
    private_server: PrivateServer, prefix: str, options: dict[str, Any]
) -> None:
    """Celery reads a task's result key before storing (never to overwrite a SUCCESS); with
    the releases in the store, the store's script checks that itself: no GET of the key in a
    round trip of its own (one on main), and the result still stored and published."""
    with _watched_run(private_server.url, prefix, options) as (job, task_id, sent, client):
        assert f"GET celery-task-meta-{task_id}" not in sent
        meta = _meta(client, task_id)
        assert meta is not None and (meta["status"], meta["result"]) == ("SUCCESS", 2)
        assert job.AsyncResult(task_id).get(timeout=WAIT) == 2  # published as before


@pytest.mark.parametrize("options", [{"singleton": True}, {"concurrency_limit": "db:2"},
                                     {"singleton": True, "concurrency_limit": "db:2"}],
                         ids=["singleton", "limit", "both"])
def test_the_last_release_and_the_store_are_one_script(
    private_server: PrivateServer, prefix: str, options: dict[str, Any]
) -> None:
    """The run's last release (with its claims record's deletion) and the store of its
    result are one script (``lua/store_after.lua``): one script call less per run on
    the server, and no check of what that script releases itself. Scripts sent for the run:
    its acquires, the releases before the last, and that one (on main: the last release and
    the store, two). The releases in the store's transaction write no release record (a
    re-send is told apart by the stored result)."""

    def forget_release_records(client: redis.Redis) -> None:
        for warm in client.scan_iter(match=f"{prefix}:*:released:*"):
            client.delete(warm)  # the warm-up's (its releases went on their own)

    with _watched_run(private_server.url, prefix, options,
                      after_warm_up=forget_release_records) as (job, task_id, sent, client):
        assert job.AsyncResult(task_id).get(timeout=WAIT) == 2
        records = set(client.scan_iter(match=f"{prefix}:*:released:*"))
    assert records == set(), "the releases with the store write no release record"
    scripts = [t for t in sent if t.startswith("EVALSHA") and (
        prefix in t or task_id in t)]
    assert len(scripts) == 2 * len(options), scripts  # acquires, releases: the store in the last
    store = [t for t in scripts if f"celery-task-meta-{task_id}" in t]
    assert len(store) == 1 and f"{prefix}:claims:{task_id}" in store[0], store


@pytest.mark.parametrize("options", [{"singleton": True}, {"concurrency_limit": "db:2"},
                                     {"singleton": True, "singleton_scope": "queued"},
                                     {"cache_ttl": 60}],
                         ids=["singleton", "limit", "queued", "cached"])
def test_the_commands_a_run_makes_inside_its_scripts(
    private_server: PrivateServer, prefix: str, options: dict[str, Any]
) -> None:
    """What the server runs for a run's lease, inside the two scripts: the acquire (the
    claims record written, the queue checked, the lease taken, its fencing token) and the
    release with the store (the record read and deleted in one GETDEL, the queue checked,
    the lease given back, the result written reading what was there in the same SET, and
    published). No release record, no separate check of the lease or record before the
    store, no GET of the result key (on main: 16 commands for a singleton run, 11 now; 22
    for a limited one, 16 now: its total and pin are read in one MGET). A queued-scope run
    gives back its claim (never waited for: an owner-checked DEL), its record and its lock
    in the storing script (before: the lock's release a script of its own, checked by the
    store, and the claim's a full release with its queue's LLEN: 11 commands and 2 scripts
    where there are 8 and 1); its claim at apply_async is tried without a queue check
    and its record written once the claim is its own (before: a GET of the claim, then the
    record, then the claim's queue, then the claim: 6 calls, 4 now); its run writes its
    record once its lock is its own (before: a GET of the lock first). A cache miss writes its
    entry reading the entry it replaces in the same SET (for that one's tags; before: a GET
    first), then stores the result."""
    with _watched_run(private_server.url, prefix, options, scripts=True) as (_job, _id, run, _c):
        pass
    names = command_names(run)
    if options.get("singleton_scope") == "queued":
        assert names == [
            "SET", "SET", "TIME", "SET",  # apply_async: the claim, its record, its token
            "GET", "PEXPIRE",  # its send with a task_id chosen by the caller: a re-send's
            "GET", "PEXPIRE", "GET",  # the run: the claim renewed to its lease, its token
            "LLEN", "SET", "TIME", "SET",  # the lock tried,
            "SET",  # and the run's record written once the lock is its own
            "GET", "DEL", "GETDEL",  # the end: the claim given back, the record
            "GET", "LLEN", "DEL",  # the lock
            "SET", "PUBLISH"], run  # the result
    elif "cache_ttl" in options:
        assert names == ["SET",  # the entry, reading the one it replaces
                         "SET", "PUBLISH"], run  # the result
    elif "singleton" in options:
        assert names == ["SET", "LLEN", "SET", "TIME", "SET",  # record, queue, lock, token
                         "GETDEL", "GET", "LLEN", "DEL",  # record, lock (owner), queue
                         "SET", "PUBLISH"], run  # the result
    else:
        assert names == [
            "SET", "TIME", "MGET", "PTTL",  # record; the total and its pin, its lifetime
            "LLEN", "ZCARD", "ZADD", "PTTL", "PEXPIRE",  # queue, holders (a new zset here)
            "GETDEL", "TIME", "ZREMRANGEBYSCORE", "LLEN", "ZREM",  # record, permit
            "SET", "PUBLISH"], run  # the result


def test_a_queued_claim_another_task_took_meanwhile_is_left_to_it(
    redis_url: str, prefix: str, client: redis.Redis
) -> None:
    """The queued scope's claim is given back in the run's last release script by an
    owner-checked deletion: a claim that another task holds by then (the run's expired and
    was taken again) is left as it is, while the run's lock and record go."""
    app, c, _trips = _app(redis_url, prefix)
    other = b"q:another-task"

    @app.task(shared=False, bind=True, singleton=True, singleton_scope="queued")
    def job(self: Any, x: int) -> int:
        claims = [k for k in client.scan_iter(match=f"{prefix}:lock:{{queued:*")
                  if k.endswith(b"}")]
        assert len(claims) == 1, claims
        client.set(claims[0], other, px=60_000)  # as if expired and taken by another task
        return x

    try:
        with in_process_worker(app, concurrency=1):
            assert job.delay(2).get(timeout=WAIT) == 2
            wait_until(lambda: len(_locked(client, prefix)) == 1)
            left = _locked(client, prefix)
            assert len(left) == 1 and b"{queued:" in left[0], left
            assert client.get(left[0]) == other
    finally:
        app.close()
        c.close()


@pytest.mark.parametrize("worker", [True, False], ids=["worker", "apply"])
@pytest.mark.parametrize("options", [{"singleton": True}, {"concurrency_limit": "db:2"}],
                         ids=["singleton", "limit"])
def test_a_claims_record_another_run_rewrote_is_left_to_it(
    redis_url: str, prefix: str, client: redis.Redis, options: dict[str, Any], worker: bool
) -> None:
    """Another delivery of the same task id rewrote the run's claims record while the body
    ran: the run's end (its last release reads and deletes the record in one step) puts that
    record back, with a lifetime, for the other run's renewals to keep; the run's own lease
    is released and its result stored."""
    app, c, _trips = _app(redis_url, prefix)
    other = "another run's record"

    @app.task(shared=False, bind=True, **options)
    def job(self: Any, x: int) -> int:
        client.set(f"{prefix}:claims:{self.request.id}", other, ex=600)
        return x

    task_id = str(uuid.uuid4())
    try:
        if worker:
            with in_process_worker(app, concurrency=1):
                assert job.apply_async((2,), task_id=task_id).get(timeout=WAIT) == 2
                wait_until(lambda: _locked(client, prefix) == [
                    f"{prefix}:claims:{task_id}".encode()])
        else:
            assert job.apply((2,), task_id=task_id).get() == 2
        record = f"{prefix}:claims:{task_id}"
        assert client.get(record) == other.encode()
        assert client.ttl(record) > 0
        assert _locked(client, prefix) == [record.encode()], "only the other run's record"
    finally:
        app.close()
        c.close()


@pytest.mark.parametrize("readable", [True, False], ids=["json", "unreadable-by-lua"])
def test_a_success_stored_already_is_kept_by_a_later_run_of_its_task_id(
    private_server: PrivateServer, prefix: str, readable: bool
) -> None:
    """A run of a task id whose SUCCESS is stored already (a redelivered copy of a task that
    ran) leaves that result as it is, as Celery's own check does, and still releases. A
    stored value the script cannot decode (here JSON behind a leading space, as a value of
    another serializer or compressed is) is read and checked by Celery's decoder instead."""
    url = private_server.url
    client = redis.Redis.from_url(url)
    app, c, _trips = _app(url, prefix)

    @app.task(shared=False, singleton=True)
    def job(x: int) -> int:
        return x

    task_id = str(uuid.uuid4())
    first = json.dumps({"status": "SUCCESS", "result": 1, "traceback": None, "children": [],
                        "date_done": None, "task_id": task_id})
    try:
        with in_process_worker(app, concurrency=1):
            assert job.delay(0).get(timeout=WAIT) == 0  # warm-up
            client.set(f"celery-task-meta-{task_id}", first if readable else " " + first)
            ended = threading.Event()  # task_postrun: sent after the result's store

            def seen(task_id: str = "", **_: Any) -> None:
                if task_id == run_id:
                    ended.set()

            run_id = task_id
            task_postrun.connect(seen, weak=False)
            try:
                job.apply_async((2,), task_id=task_id)
                assert ended.wait(WAIT)
            finally:
                task_postrun.disconnect(seen)
            stored = client.get(f"celery-task-meta-{task_id}")
            assert stored is not None and json.loads(stored)["result"] == 1  # kept
            assert _locked(client, prefix) == []
    finally:
        app.close()
        c.close()
        client.close()


def test_a_state_stored_before_the_run_is_overwritten_by_its_result(
    private_server: PrivateServer, prefix: str
) -> None:
    """``task_track_started``: the STARTED state stored before the body is replaced by the
    result (the script's check keeps only a SUCCESS)."""
    url = private_server.url
    app, c, _trips = _app(url, prefix)
    app.conf.task_track_started = True

    @app.task(shared=False, singleton=True)
    def job(x: int) -> int:
        return x

    try:
        with in_process_worker(app, concurrency=1):
            assert job.delay(1).get(timeout=WAIT) == 1
            assert job.delay(2).get(timeout=WAIT) == 2
    finally:
        app.close()
        c.close()
