"""The key space: every key and channel the library uses lives under one configurable prefix.

All keys of one lock or semaphore share the hash tag ``{name}`` so that a Lua script touching
them all runs on one Redis Cluster node (scripts may only touch keys declared as their key
arguments, all in one slot).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .._validate import resource_key
from ..errors import ConfigurationError

__all__ = ["KeySpace", "LockKeys", "SemaphoreKeys"]


@dataclass(frozen=True)
class LockKeys:
    """The Redis keys of one mutex: owner (with the lease as its TTL), fencing counter, waiters."""

    lock: str
    fence: str
    queue: str
    waiters: str

    def as_list(self) -> list[str]:
        return [self.lock, self.fence, self.queue, self.waiters]


@dataclass(frozen=True)
class SemaphoreKeys:
    """The Redis keys of one semaphore: holders (zset of lease ends), total, initial, waiters,
    and ``pinned``: present while the total is one an operator set (``initialize``,
    ``increase_permits``, ``decrease_permits``), which declared permits leave alone until
    ``reset``. ``as_list`` is what most scripts take; ``with_pin`` adds ``pinned``."""

    holders: str
    total: str
    initial: str
    queue: str
    waiters: str
    pinned: str

    def as_list(self) -> list[str]:
        return [self.holders, self.total, self.initial, self.queue, self.waiters]

    def with_pin(self) -> list[str]:
        return [*self.as_list(), self.pinned]


@dataclass(frozen=True)
class KeySpace:
    """Names of keys and channels under ``prefix`` (default ``"rediskit"``)."""

    prefix: str = "rediskit"
    # Hot path: key lists are built once per resource name (bounded; see _cached).
    _lists: dict[tuple[str, str], list[str]] = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, str) or not self.prefix:
            raise ConfigurationError(f"prefix must be a non-empty string, got {self.prefix!r}")
        if "{" in self.prefix or "}" in self.prefix:
            raise ConfigurationError(
                f"prefix must not contain '{{' or '}}' (hash tags are added per resource), "
                f"got {self.prefix!r}"
            )

    def lock(self, name: str) -> LockKeys:
        base = f"{self.prefix}:lock:{{{resource_key(name)}}}"
        return LockKeys(base, base + ":fence", base + ":queue", base + ":waiters")

    def semaphore(self, name: str) -> SemaphoreKeys:
        base = f"{self.prefix}:sem:{{{resource_key(name)}}}"
        return SemaphoreKeys(
            base + ":holders", base + ":total", base + ":initial", base + ":queue",
            base + ":waiters", base + ":pinned",
        )

    def lock_list(self, name: str) -> list[str]:
        """``lock(name).as_list()``, built once per name (do not mutate the list)."""
        return self._lists.get(("m", name)) or self._cached("m", name)

    def semaphore_list(self, name: str) -> list[str]:
        """``semaphore(name).as_list()``, built once per name (do not mutate the list)."""
        return self._lists.get(("s", name)) or self._cached("s", name)

    def semaphore_pin_list(self, name: str) -> list[str]:
        """``semaphore(name).with_pin()``, built once per name (do not mutate the list)."""
        return self._lists.get(("p", name)) or self._cached("p", name)

    def _cached(self, kind: str, name: str) -> list[str]:
        if len(self._lists) >= 4096:
            self._lists.clear()  # crude but bounded; names repeat far more than they vary
        if kind == "m":
            made = self.lock(name).as_list()
        elif kind == "s":
            made = self.semaphore(name).as_list()
        else:
            made = self.semaphore(name).with_pin()
        self._lists[(kind, name)] = made
        return made

    @property
    def wake_channel_prefix(self) -> str:
        """Grants are published on ``<prefix>:wake:<process id>``: one channel per process."""
        return f"{self.prefix}:wake:"

    def cache_entry(self, name: str) -> str:
        """Key of cache entry ``name``. Its hash tag is that of the entry's fill lock,
        ``lock(cache_lock_name(name))``, so one script can store the entry and release the lock."""
        return f"{self.prefix}:cache:e:{{cache/{resource_key(name)}}}"

    @staticmethod
    def cache_lock_name(name: str) -> str:
        """Name of the mutex that single-flights the computation of cache entry ``name``."""
        return f"cache/{name}"

    @property
    def cache_tag_prefix(self) -> str:
        """Tag ``t`` of the cache is the zset ``<cache_tag_prefix>{t}``."""
        return f"{self.prefix}:cache:t:"

    def cache_pattern(self) -> str:
        """SCAN pattern matching every cache entry and tag set under this prefix."""
        return f"{self.prefix}:cache:*"

    def lock_pattern(self) -> str:
        """SCAN pattern matching the owner key of every lock under this prefix."""
        return f"{self.prefix}:lock:{{*}}"
