"""Functions shared by the cache tests and the processes they start (importable by name)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import redis

from celery_rediskit.cache import RedisCacheProvider, cache_tag, cached, revalidate_tag
from celery_rediskit.cache import set_cache_provider as _set_provider

STATE: dict[str, Any] = {}


def setup(url: str, prefix: str) -> redis.Redis:
    client = redis.Redis.from_url(url)
    STATE.update(client=client, prefix=prefix)
    _set_provider(RedisCacheProvider(client, prefix=prefix))
    return client


def runs(name: str) -> int:
    value = STATE["client"].get(f"{STATE['prefix']}:runs:{name}")
    return int(value or 0)


def _count(name: str) -> None:
    STATE["client"].incr(f"{STATE['prefix']}:runs:{name}")


@cached(ttl=30)
def profile(user_id: int, detail: bool = False) -> dict[str, Any]:
    _count("profile")
    cache_tag(f"user:{user_id}")
    return {"id": user_id, "detail": detail, "pid": os.getpid()}


@cached(ttl=30, wait=10)
def slow(x: int) -> dict[str, Any]:
    _count("slow")
    time.sleep(0.3)  # the work being single-flighted, not synchronisation
    return {"x": x, "pid": os.getpid()}


@cached(ttl=30, wait=10, lease=1.0)
def fragile(x: int) -> dict[str, Any]:
    _count("fragile")
    if STATE.get("die"):
        STATE["client"].rpush(f"{STATE['prefix']}:started", "1")
        os.kill(os.getpid(), signal.SIGSTOP)  # frozen while computing, until killed
    return {"x": x, "pid": os.getpid()}


# -- process entry points -----------------------------------------------------------------------

def child_profile(url: str, prefix: str, user_id: int) -> tuple[dict[str, Any], str]:
    setup(url, prefix)
    return profile(user_id), profile.key_for(user_id)


def child_revalidate(url: str, prefix: str, tag: str) -> int:
    setup(url, prefix)
    return revalidate_tag(tag)


def child_slow(url: str, prefix: str, barrier: Any, x: int) -> dict[str, Any]:
    setup(url, prefix)
    barrier.wait()
    return slow(x)


def child_fragile(url: str, prefix: str, x: int) -> None:
    setup(url, prefix)
    STATE["die"] = True
    fragile(x)
