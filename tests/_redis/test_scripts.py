"""The script loader: how scripts are composed, one EVALSHA per operation, and scripts
re-loaded when the server has forgotten them."""

from __future__ import annotations

import re
import signal
import time

import pytest
import redis

from celery_rediskit import RedisMutexStorage, create_mutex
from celery_rediskit._redis.scripts import call, compose, load_script
from tests.roundtrips import counting_client


def test_the_server_clock_is_defined_once_in_every_script() -> None:
    for name in ("mutex_acquire", "mutex_release", "sem_acquire", "sem_release", "sem_info",
                 "renew_batch", "cache_claim", "cache_unlock", "cache_set", "rate_check",
                 "rate_cancel", "rate_info"):
        source = compose(name)
        assert source.count("local function now_ms()") == 1, name
        assert source.count("redis.call('TIME')") == 1, name


def test_a_prefix_script_continues_into_the_script_it_names() -> None:
    claim = compose("cache_claim")
    acquire = compose("mutex_acquire")
    # The mutex's own acquire body follows the cache prefix; the libraries come once each.
    body = acquire.split("-- Fast path", 1)[1]
    assert body in claim
    assert claim.index("local cached = redis.call('GET', KEYS[5])") < claim.index("-- Fast path")
    for library in ("local function wq_take", "local function cache_store"):
        assert claim.count(library) == 1, library


def test_early_libraries_sit_above_the_fast_path_and_others_below_it() -> None:
    source = compose("mutex_acquire")
    fast = source.index("-- Fast path")
    assert source.index("local function now_ms()") < fast < source.index("local function wq_take")


def test_composed_scripts_run_on_the_server(client: redis.Redis) -> None:
    for name in ("mutex_acquire", "sem_acquire", "cache_claim", "renew_batch"):
        sha = client.script_load(load_script(name).source)
        assert re.fullmatch(r"[0-9a-f]{40}", sha) and sha == load_script(name).sha


def test_every_operation_is_one_evalsha(redis_url: str, prefix: str) -> None:
    c, sent = counting_client(redis_url)
    storage = RedisMutexStorage(c, prefix=prefix)
    mutex = create_mutex(storage=storage)
    mutex.acquire("warm", auto_renew=False).release()  # loads the scripts
    storage.get_lock_info("warm")
    storage.extend_lock("warm", 1)
    storage.force_release("warm")
    sent.clear()
    for _ in range(10):
        mutex.acquire("res", auto_renew=False).release()
    assert sent == ["EVALSHA"] * 20
    sent.clear()
    storage.get_lock_info("res")
    storage.extend_lock("res", 1)
    storage.force_release("res")
    assert sent == ["EVALSHA"] * 3


def test_scripts_reload_after_a_server_restart(private_server: object, prefix: str) -> None:
    c = redis.Redis.from_url(private_server.url)  # type: ignore[attr-defined]
    mutex = create_mutex(storage=RedisMutexStorage(c, prefix=prefix))
    before = mutex.acquire("res", auto_renew=False)
    before.release()
    private_server.restart()  # type: ignore[attr-defined]
    with mutex.lock("res") as lease:
        # A fresh server lost the counter, yet the token rises: it follows the server's clock.
        assert lease.fencing_token > before.fencing_token



class _Interrupted(Exception):
    """Stands for Celery's SoftTimeLimitExceeded, raised into whatever the task is doing."""


def test_an_exception_raised_into_a_read_propagates_and_the_command_is_not_sent_again(
    redis_url: str, prefix: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    client.ping()  # the pooled connection exists: the read is what gets interrupted

    def interrupt(signum: int, frame: object) -> None:
        raise _Interrupted()

    previous = signal.signal(signal.SIGALRM, interrupt)
    started = time.monotonic()
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(_Interrupted):
            call(client, "BLPOP", f"{prefix}:empty", 2)  # the server answers after 2 s
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - started < 1.5, "the command was sent again after the interrupt"
    assert client.ping() is True  # the interrupted connection was dropped, not reused
    client.close()
