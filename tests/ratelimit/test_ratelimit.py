"""The rate limiter against a real Redis, and in memory where the semantics are shared."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from celery_rediskit import (
    AcquireAborted,
    ConfigurationError,
    LockTimeout,
    MemoryRateLimitStorage,
    RateLimited,
    RateLimitStorage,
    RedisRateLimitStorage,
    create_rate_limiter,
)
from celery_rediskit._redis.keys import KeySpace
from celery_rediskit.ratelimit import parse_rate
from tests.interrupts import Background, wait_until
from tests.roundtrips import counting_client


@pytest.mark.parametrize(("text", "limit", "period", "shown"), [
    ("10/s", 10, 1, "10/s"), ("100/m", 100, 60, "100/m"), ("1000/h", 1000, 3600, "1000/h"),
    (" 5 / m ", 5, 60, "5/m"), ("0.5/s", 0.5, 1, "0.5/s"), ("7", 7, 1, "7/s"), (3, 3, 1, "3/s"),
    (2.5, 2.5, 1, "2.5/s"),
])
def test_rates_are_read_as_celery_writes_them(text: object, limit: float, period: float,
                                               shown: str) -> None:
    rate = parse_rate(text)
    assert (rate.limit, rate.period, rate.text) == (limit, period, shown)
    assert rate.interval == pytest.approx(period / limit)


@pytest.mark.parametrize("bad", ["", "10/d", "10/x", "/s", "-1/s", "0/m", "0", 0, -5, True,
                                 "ten/s", None, float("inf"), "10/s/s"])
def test_a_bad_rate_is_refused_naming_the_argument(bad: object) -> None:
    with pytest.raises(ConfigurationError, match=r"^rate must be 'N/s', 'N/m' or 'N/h'"):
        create_rate_limiter(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -1, 1.5, "3", True])
def test_a_bad_burst_is_refused_naming_the_argument(bad: object) -> None:
    with pytest.raises(ConfigurationError, match=r"^burst must be an integer of at least 1"):
        create_rate_limiter("10/s", burst=bad)  # type: ignore[arg-type]


def test_the_burst_passes_at_once_then_one_per_interval(storage: RateLimitStorage) -> None:
    rl = create_rate_limiter("10/s", burst=3, storage=storage)
    assert [rl.try_acquire("api")[0] for _ in range(3)] == [True, True, True]
    allowed, retry_after = rl.try_acquire("api")
    assert not allowed and 0.08 < retry_after <= 0.1
    # A refused check takes nothing: the next one is told the same time, a little less.
    again = rl.try_acquire("api")
    assert not again[0] and again[1] <= retry_after
    info = rl.get_rate_info("api")
    assert (info.rate, info.burst, info.remaining, info.active) == ("10/s", 3, 0, True)
    assert 0.08 < info.next_free <= 0.1 and 0.28 < info.full_in <= 0.3


def test_no_window_boundary_lets_twice_the_rate_through(storage: RateLimitStorage) -> None:
    """A fixed window of 1 s would let 2 through around its edge; GCRA spaces them by the
    interval whatever the clock reads."""
    rl = create_rate_limiter("2/s", storage=storage)
    assert rl.try_acquire("k") == (True, 0.0)
    allowed, retry_after = rl.try_acquire("k")
    assert not allowed and 0.45 < retry_after <= 0.5


def test_keys_are_independent(storage: RateLimitStorage) -> None:
    rl = create_rate_limiter("1/h", storage=storage)
    assert rl.try_acquire("a")[0] and rl.try_acquire("b")[0]
    allowed, retry_after = rl.try_acquire("a")
    assert not allowed and 3590 < retry_after <= 3600


def test_cost_takes_several_slots(storage: RateLimitStorage) -> None:
    rl = create_rate_limiter("10/s", burst=4, storage=storage)
    assert rl.try_acquire("k", cost=3)[0]
    assert rl.get_rate_info("k").remaining == 1
    allowed, retry_after = rl.try_acquire("k", cost=2)
    assert not allowed and 0.08 < retry_after <= 0.1
    with pytest.raises(ConfigurationError, match=r"^cost must be at most the burst \(4\)"):
        rl.try_acquire("k", cost=5)
    with pytest.raises(ConfigurationError, match=r"^cost must be an integer"):
        rl.try_acquire("k", cost=0)


def test_acquire_reserves_the_next_slot_and_sleeps_until_it(storage: RateLimitStorage) -> None:
    rl = create_rate_limiter("20/s", storage=storage)
    assert rl.acquire("k") == 0.0
    started = time.monotonic()
    waited = rl.acquire("k")
    assert 0.04 < waited <= 0.05
    assert time.monotonic() - started >= waited


def test_waiters_get_distinct_slots_in_order(storage: RateLimitStorage) -> None:
    """Reserving checks from many threads at once: each gets its own slot (the check's time
    plus its wait), one interval after the one before: no two share one, none is skipped."""
    rl = create_rate_limiter("10/s", storage=storage)
    waits: list[float] = []
    lock = threading.Lock()

    def reserve() -> None:
        d = rl.check("k", max_wait=None)
        with lock:
            waits.append(d.now + d.retry_after)

    threads = [threading.Thread(target=reserve) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    waits.sort()
    gaps = [b - a for a, b in zip(waits, waits[1:], strict=False)]
    assert all(abs(g - 0.1) < 0.002 for g in gaps), waits


def test_acquire_beyond_the_timeout_fails_at_once_taking_nothing(
        storage: RateLimitStorage) -> None:
    rl = create_rate_limiter("1/m", storage=storage)
    assert rl.try_acquire("k")[0]
    started = time.monotonic()
    with pytest.raises(RateLimited) as caught:
        rl.acquire("k", timeout=5.0)
    assert time.monotonic() - started < 1.0
    assert isinstance(caught.value, LockTimeout) and caught.value.key == "k"
    assert 55 < caught.value.retry_after <= 60
    assert "rate limit 'k' (1/m)" in str(caught.value)
    with pytest.raises(RateLimited):
        rl.acquire("k", timeout=0)
    assert 55 < rl.get_rate_info("k").next_free <= 60  # nothing was reserved


def test_abort_ends_the_wait_and_gives_the_slot_back(storage: RateLimitStorage) -> None:
    rl = create_rate_limiter("1/m", storage=storage)
    assert rl.try_acquire("k")[0]
    abort = threading.Event()
    waiter = Background(lambda: rl.acquire("k", abort=abort))
    waiter.start()
    wait_until(lambda: rl.get_rate_info("k").full_in > 90)  # the waiter's slot is reserved
    abort.set()
    waiter.join(5)
    assert isinstance(waiter.error, AcquireAborted) and waiter.error.key == "k"
    assert 50 < rl.get_rate_info("k").full_in <= 60  # given back: only the first slot is taken
    with pytest.raises(AcquireAborted):
        rl.acquire("k", abort=abort)  # already set: nothing is taken


def test_an_aborted_slot_stays_taken_when_a_later_one_was_reserved(
        storage: RateLimitStorage) -> None:
    rl = create_rate_limiter("1/m", storage=storage)
    rl.try_acquire("k")
    first = rl.check("k", max_wait=None)
    second = rl.check("k", max_wait=None)
    assert first.reserved and second.reserved
    assert not storage.cancel("k", first, rl.rate)  # giving it back would let two share a slot
    assert storage.cancel("k", second, rl.rate)


def test_info_of_an_unused_key_and_reset(storage: RateLimitStorage) -> None:
    rl = create_rate_limiter("5/s", burst=2, storage=storage)
    info = rl.get_rate_info("fresh")
    assert (info.remaining, info.next_free, info.full_in, info.active) == (2, 0.0, 0.0, False)
    assert storage.get_rate_info("fresh").rate == ""  # the storage knows nothing of it
    rl.try_acquire("fresh")
    rl.try_acquire("fresh")
    assert not rl.try_acquire("fresh")[0]
    stored = storage.get_rate_info("fresh")  # the storage reports the last check's rate
    assert (stored.rate, stored.burst, stored.remaining) == ("5/s", 2, 0)
    assert rl.reset("fresh") and not rl.reset("fresh")
    assert rl.try_acquire("fresh") == (True, 0.0)


def test_bad_keys_are_refused(storage: RateLimitStorage) -> None:
    rl = create_rate_limiter("5/s", storage=storage)
    for bad in ("", "a{b}", "x\n"):
        with pytest.raises(ConfigurationError, match="^key must be"):
            rl.try_acquire(bad)
    with pytest.raises(ConfigurationError, match="^timeout must be a number of seconds >= 0"):
        rl.acquire("k", timeout=-1)


def test_the_default_storage_is_memory_and_the_default_rate_100_per_minute() -> None:
    rl = create_rate_limiter()
    assert isinstance(rl.storage, MemoryRateLimitStorage)
    assert (rl.rate.text, rl.burst) == ("100/m", 1)


# -- Redis ------------------------------------------------------------------------------------

def test_one_key_that_expires_when_the_bucket_is_full_again(
        redis_storage: RedisRateLimitStorage, client: redis.Redis, prefix: str) -> None:
    rl = create_rate_limiter("10/m", burst=5, storage=redis_storage)
    key = KeySpace(prefix).rate_limiter("api")
    assert key == f"{prefix}:rate:{{api}}"
    for _ in range(5):
        assert rl.try_acquire("api")[0]
    assert list(client.scan_iter(match=f"{prefix}:*")) == [key.encode()]
    # Five slots of 6 s from the first check (rounded up to the ms), less the time since.
    assert 25_000 < client.pttl(key) <= 30_001
    rl = create_rate_limiter("1/h", storage=redis_storage)
    rl.try_acquire("hourly")
    assert 3_590_000 < client.pttl(KeySpace(prefix).rate_limiter("hourly")) <= 3_600_001


def test_a_refused_check_writes_nothing(redis_storage: RedisRateLimitStorage,
                                        client: redis.Redis, prefix: str) -> None:
    rl = create_rate_limiter("1/m", storage=redis_storage)
    rl.try_acquire("k")
    key = KeySpace(prefix).rate_limiter("k")
    before = client.get(key)
    assert not rl.try_acquire("k")[0]
    assert client.get(key) == before


def test_every_check_is_one_evalsha(redis_url: str, prefix: str) -> None:
    c, sent = counting_client(redis_url)
    rl = create_rate_limiter("1000/s", burst=10, storage=RedisRateLimitStorage(c, prefix=prefix))
    rl.try_acquire("warm")  # loads the script
    sent.clear()
    for _ in range(50):
        rl.try_acquire("k")
    rl.acquire("k")
    assert sent == ["EVALSHA"] * 51
    c.close()


def test_the_server_clock_decides(redis_storage: RedisRateLimitStorage,
                                  client: redis.Redis) -> None:
    rl = create_rate_limiter("10/s", storage=redis_storage)
    seconds, micros = client.time()
    decision = rl.check("k")
    assert abs(decision.now - (seconds + micros / 1e6)) < 1.0


def test_memory_state_is_dropped_once_the_bucket_is_full() -> None:
    storage = MemoryRateLimitStorage()
    rl = create_rate_limiter("1000/s", storage=storage)
    for i in range(3000):
        rl.try_acquire(f"tenant:{i}")
    wait_until(lambda: rl.get_rate_info("tenant:0").full_in == 0.0)
    rl.try_acquire("one more")
    assert len(storage._state) < 2100  # the sweep dropped the full buckets
