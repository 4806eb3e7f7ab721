"""Prefixes and keys: what is accepted, what is refused (with a message naming the argument and
the accepted form), and SCAN patterns that match only what they name."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from celery_rediskit import (
    RedisMutexStorage,
    RedisSemaphoreStorage,
    create_mutex,
    create_semaphore,
)
from celery_rediskit._redis.keys import KeySpace
from celery_rediskit.cache import RedisCacheProvider
from celery_rediskit.errors import ConfigurationError
from celery_rediskit.report import glob_escape, scan_keys

MAX_NAME_BYTES = 512  # the documented limit of keys and prefixes (_validate.MAX_NAME_BYTES)

PREFIX_FORM = "prefix must be a non-empty string of at most 512 bytes (UTF-8) without"
KEY_FORM = "key must be a non-empty string of at most 512 bytes (UTF-8) without"

BAD_PREFIXES = {
    "empty": ("", "got ''"),
    "not text": (b"rediskit", "got b'rediskit'"),
    "opening brace": ("app{1", "'{' (reserved for the Redis Cluster hash tag)"),
    "closing brace": ("app}", "'}' (reserved for the Redis Cluster hash tag)"),
    "star": ("app*", "the glob character '*'"),
    "question mark": ("app?", "the glob character '?'"),
    "bracket": ("svc[12]", "the glob character '['"),
    "closing bracket": ("svc]", "the glob character ']'"),
    "backslash": ("a\\b", "the glob character '\\\\'"),
    "newline": ("app\nx", "the control character '\\n'"),
    "tab": ("app\tx", "the control character '\\t'"),
    "nul": ("app\x00", "the control character '\\x00'"),
    "delete": ("app\x7f", "the control character '\\x7f'"),
    "C1 control": ("app\x85", "the control character '\\x85'"),
    "lone surrogate": ("app\ud800", "a lone surrogate"),
    "513 bytes": ("p" * 513, "it is 513 bytes"),
    "514 bytes of é": ("é" * 257, "it is 514 bytes"),
}

BAD_KEYS = {
    "empty": ("", "got ''"),
    "not text": (42, "got 42"),
    "opening brace": ("user{1", "'{' (reserved for the Redis Cluster hash tag)"),
    "closing brace": ("user}1", "'}' (reserved for the Redis Cluster hash tag)"),
    "newline": ("report\n2024", "the control character '\\n'"),
    "carriage return": ("report\r", "the control character '\\r'"),
    "nul": ("a\x00b", "the control character '\\x00'"),
    "escape": ("a\x1bb", "the control character '\\x1b'"),
    "lone surrogate": ("a\udfffb", "a lone surrogate"),
    "513 bytes": ("k" * 513, "it is 513 bytes"),
}

GOOD_KEYS = ["report[1]", "a*b?c", "back\\slash", "with space", "no-break\xa0space", "é" * 256,
             "k" * MAX_NAME_BYTES, "tenant:42:orders"]


def constructors(client: redis.Redis) -> dict[str, Any]:
    return {
        "KeySpace": lambda p: KeySpace(p),
        "RedisMutexStorage": lambda p: RedisMutexStorage(client, prefix=p),
        "RedisSemaphoreStorage": lambda p: RedisSemaphoreStorage(client, prefix=p),
        "RedisCacheProvider": lambda p: RedisCacheProvider(client, prefix=p),
    }


@pytest.mark.parametrize("case", sorted(BAD_PREFIXES))
def test_bad_prefixes_are_refused_naming_prefix_and_the_accepted_form(
    client: redis.Redis, case: str
) -> None:
    value, why = BAD_PREFIXES[case]
    for name, make in constructors(client).items():
        with pytest.raises(ConfigurationError) as caught:
            make(value)
        message = str(caught.value)
        assert message.startswith(PREFIX_FORM), (name, message)
        assert "glob characters (* ? [ ] \\)" in message, (name, message)
        assert why in message, (name, message)


def test_good_prefixes_are_accepted(client: redis.Redis) -> None:
    for value in ("rediskit", "app:v2", "with space", "é" * 256, "p" * MAX_NAME_BYTES):
        for make in constructors(client).values():
            make(value)


@pytest.mark.parametrize("case", sorted(BAD_KEYS))
def test_bad_keys_are_refused_naming_key_and_the_accepted_form(
    client: redis.Redis, prefix: str, case: str
) -> None:
    value, why = BAD_KEYS[case]
    mutexes = RedisMutexStorage(client, prefix=prefix)
    mutex = create_mutex(storage=mutexes)
    sem = create_semaphore(permits=1, storage=RedisSemaphoreStorage(client, prefix=prefix))
    provider = RedisCacheProvider(client, prefix=prefix)
    uses = {
        "mutex.acquire": lambda: mutex.acquire(value, blocking=False),
        "mutex.get_lock_info": lambda: mutex.get_lock_info(value),
        "storage.force_release": lambda: mutexes.force_release(value),
        "semaphore.acquire": lambda: sem.acquire(value, blocking=False),
        "cache.get": lambda: provider.get(value),
        "cache.set": lambda: provider.set(value, 1),
        "cache.claim": lambda: provider.claim(value),
    }
    for name, use in uses.items():
        with pytest.raises(ConfigurationError) as caught:
            use()
        message = str(caught.value)
        assert message.startswith(KEY_FORM), (name, message)
        assert why in message, (name, message)


def test_good_keys_are_accepted(client: redis.Redis, prefix: str) -> None:
    mutex = create_mutex(storage=RedisMutexStorage(client, prefix=prefix))
    provider = RedisCacheProvider(client, prefix=prefix)
    for key in GOOD_KEYS:
        with mutex.lock(key, timeout=5) as lease:
            assert mutex.get_lock_info(key).holder == lease.owner
        provider.set(key, key, ttl=60)
        assert provider.get(key) == key
    longest = "c" * MAX_NAME_BYTES  # its fill lock, "cache/<key>", is longer: still fine
    claim = provider.claim(longest)
    assert claim.state == "owner"
    provider.fill(claim, 1, ttl=60)
    assert provider.get(longest) == 1


def test_a_pattern_escaped_with_glob_escape_matches_only_itself(
    client: redis.Redis, prefix: str
) -> None:
    names = ["svc[12]", "svc1", "svc2", "a*", "ab", "a?", "a\\b", "a]"]
    for name in names:
        client.set(f"{prefix}:{name}:x", 1)
    for name in names:
        pattern = glob_escape(f"{prefix}:{name}:") + "*"
        assert set(scan_keys(client, pattern)) == {f"{prefix}:{name}:x"}, pattern
    space = KeySpace(prefix)
    assert space.cache_pattern() == glob_escape(prefix) + ":cache:*"
    assert space.lock_pattern() == glob_escape(prefix) + ":lock:{*}"
