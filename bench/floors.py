"""Floors: the least a lock or semaphore can cost on Redis, ignoring safety.

A token list (``BLPOP`` a token, hold, ``LPUSH`` it back) is fair and wakes exactly one waiter
per release, in two round trips; it is unsafe (a holder that dies takes its token with it,
forever), so a safe implementation should come close to it but can hardly beat it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .common import CommandProfile

BLPOP_PROFILE = CommandProfile(client=frozenset({"blpop", "lpush"}))
SETDEL_PROFILE = CommandProfile(client=frozenset({"set", "del"}))


def blpop_tokens(client: Any, key: str) -> Callable[[], Callable[[], Any]]:
    """Contender factory: acquire = BLPOP a token; release = LPUSH it back."""
    def acquire() -> Callable[[], Any]:
        token = client.blpop([key], 0)[1]
        return lambda: client.lpush(key, token)

    return acquire


def _fill(admin: Any, key: str, tokens: int) -> None:
    admin.delete(key)
    admin.lpush(key, *(f"t{i}" for i in range(tokens)))


def one_token(admin: Any, key: str) -> None:
    _fill(admin, key, 1)


def four_tokens(admin: Any, key: str) -> None:
    _fill(admin, key, 4)


def set_del_cycle(client: Any, key: str) -> Callable[[], None]:
    """Uncontended floor: ``SET key owner NX PX 30000`` then ``DEL key``."""
    def cycle() -> None:
        client.set(key, "owner", nx=True, px=30000)
        client.delete(key)

    return cycle
