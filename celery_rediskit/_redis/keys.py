"""The key space: every key and channel the library uses lives under one configurable prefix.

All keys of one lock or semaphore share the hash tag ``{name}`` so that a Lua script touching
them all runs on one Redis Cluster node (scripts may only touch keys declared as their key
arguments, all in one slot).

Every key the library writes expires: none is left behind by a name that is never used again
(per-user lock names, ``tenant:{id}`` templates). What each key lives:

- a lock's owner key: its lease. Its fence key (the last fencing token): ``idle_ttl`` after
  the last grant's lease (set by the SET that writes each token). A
  fence that expired costs nothing: tokens come from the server's clock when it is gone, so
  they keep rising (see ``lua/_fence.lua``).
- a semaphore's ``total`` and ``initial``: ``idle_ttl / 2`` to ``idle_ttl`` after the last
  acquire, ``idle_ttl`` after an admin change; then the next acquire initialises it again
  from the permits it declares. Its ``holders``: as long, and never before the last holder's
  lease ends.
- the queue of waiters (``queue``, ``waiters``): until the last queued waiter's deadline.
- cache entries: their ``ttl``, and ``idle_ttl`` when stored without one; a tag set lives as
  long as its longest-lived entry (on a cluster, a tag's directory of slot groups as long as
  its longest-lived entry plus a minute). Claims records (the Celery layer):
  ``rediskit_claims_ttl``.
- a rate limiter (one key, ``<prefix>:rate:{<name>}``): until the time its bucket is full
  again, when its state is the same as no key at all (``lua/rate_check.lua``).
- a thread's release record (``..:released:<process>/<thread>``): 15 s after its last
  release of that lock or semaphore (``_redis/release.py``).

Prefixes and names are checked by ``_validate`` (``key_prefix``, ``resource_key``): no braces
(the hash tag), no control characters, at most ``MAX_NAME_BYTES``; prefixes also without glob
characters. Every SCAN pattern built from a prefix or a name escapes it with :func:`glob_escape`
all the same, so a name such as ``report[1]`` matches only itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .._validate import MAX_NAME_BYTES, key_prefix, resource_key, to_ms
from ..durations import Duration, parse_duration
from .slots import slot_tag

__all__ = ["IDLE_TTL", "KeySpace", "LockKeys", "SemaphoreKeys", "glob_escape"]

IDLE_TTL = 7 * 86400.0
"""Seconds a key outlives its last use by default (a week): see the module docstring."""

# Lock and semaphore names: a user's key (checked against MAX_NAME_BYTES where it comes in), or
# a name derived from one (the fill lock "cache/<key>"), which may be a little longer.
_DERIVED_LIMIT = MAX_NAME_BYTES + 64

# The waiters hash of a lock or semaphore queue. Its entries name the waiter's check-in number
# since 0.2 (lua/_waitqueue.lua); the hash was renamed with that change, so 0.1 workers still
# running beside newer ones (a rolling deploy) never read an entry they cannot parse: each
# side drops the other's waiters from the queue, and those re-join at their next re-check.
WAITERS = ":waitq"


def glob_escape(text: str) -> str:
    """``text`` with SCAN MATCH's special characters (``* ? [ ] \\``) escaped, so that it
    matches only itself inside a pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


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
    """Names of keys and channels under ``prefix`` (default ``"rediskit"``), and how long
    keys outlive their last use: ``idle_ttl`` seconds, or a duration text such as ``"7d"``
    (default :data:`IDLE_TTL`, a week). ``idle_ms`` is the same in milliseconds."""

    prefix: str = "rediskit"
    idle_ttl: Duration = IDLE_TTL
    idle_ms: int = field(init=False, compare=False, repr=False)
    # Hot path: key lists are built once per resource name (bounded; see _cached).
    _lists: dict[tuple[str, str], list[str]] = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )

    def __post_init__(self) -> None:
        key_prefix(self.prefix)
        seconds = parse_duration(self.idle_ttl, "idle_ttl")
        object.__setattr__(self, "idle_ttl", seconds)
        object.__setattr__(self, "idle_ms", to_ms(seconds))

    def lock(self, name: str) -> LockKeys:
        base = f"{self.prefix}:lock:{{{resource_key(name, _DERIVED_LIMIT)}}}"
        return LockKeys(base, base + ":fence", base + ":queue", base + WAITERS)

    def semaphore(self, name: str) -> SemaphoreKeys:
        base = f"{self.prefix}:sem:{{{resource_key(name, _DERIVED_LIMIT)}}}"
        return SemaphoreKeys(
            base + ":holders", base + ":total", base + ":initial", base + ":queue",
            base + WAITERS, base + ":pinned",
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
        elif kind == "r":
            made = [self.rate_limiter(name)]
        else:
            made = self.semaphore(name).with_pin()
        self._lists[(kind, name)] = made
        return made

    def rate_limiter(self, name: str) -> str:
        """The one key of rate limiter ``name`` (its own hash tag: a check touches only it)."""
        return f"{self.prefix}:rate:{{{resource_key(name)}}}"

    def rate_list(self, name: str) -> list[str]:
        """``[rate_limiter(name)]``, built once per name (do not mutate the list)."""
        return self._lists.get(("r", name)) or self._cached("r", name)

    def rate_pattern(self, pattern: str = "*") -> str:
        """SCAN pattern matching rate limiters under this prefix whose name matches the glob
        ``pattern``."""
        return f"{glob_escape(self.prefix)}:rate:{{{pattern}}}"

    @property
    def wake_channel_prefix(self) -> str:
        """Grants are published on ``<prefix>:wake:<process id>``: one channel per process."""
        return f"{self.prefix}:wake:"

    def sharded_wake_prefix(self, slot: int) -> str:
        """Redis Cluster: grants of keys in hash slot ``slot`` are published with SPUBLISH on
        ``<prefix>:wake:{<slot tag>}:<process id>``, a channel of that slot, so a message goes
        only to the shard of its key (one channel per process and slot in use)."""
        return f"{self.prefix}:wake:{{{slot_tag(slot)}}}:"

    def cache_entry(self, name: str) -> str:
        """Key of cache entry ``name``. Its hash tag is that of the entry's fill lock,
        ``lock(cache_lock_name(name))``, so one script can store the entry and release the lock."""
        return f"{self.prefix}:cache:e:{{cache/{resource_key(name)}}}"

    @staticmethod
    def cache_lock_name(name: str) -> str:
        """Name of the mutex that single-flights the computation of cache entry ``name``."""
        return f"cache/{name}"

    def cache_tag_group(self, slot: int) -> str:
        """Redis Cluster: the tag prefix of cache entries in hash slot ``slot``. Tag ``t`` of
        those entries is the zset ``<cache_tag_group(slot)>t``, in that slot (its hash tag is
        :func:`~._redis.slots.slot_tag` of the slot), so one script updates an entry and its
        tag sets together."""
        return self.cache_tag_group_of(slot_tag(slot))

    def cache_tag_group_of(self, group: str) -> str:
        """:meth:`cache_tag_group` of the slot whose slot tag is ``group`` (as a tag's
        directory lists it)."""
        return f"{self.prefix}:cache:t:{{{group}}}:"

    def cache_tag_directory(self, tag: str) -> str:
        """Redis Cluster: the zset of slot tags whose slot holds entries with tag ``tag``."""
        return f"{self.prefix}:cache:tg:{{{tag}}}"

    @property
    def cache_tag_prefix(self) -> str:
        """Tag ``t`` of the cache is the zset ``<cache_tag_prefix>{t}``."""
        return f"{self.prefix}:cache:t:"

    def cache_pattern(self) -> str:
        """SCAN pattern matching every cache entry and tag set under this prefix."""
        return f"{glob_escape(self.prefix)}:cache:*"

    def lock_pattern(self) -> str:
        """SCAN pattern matching the owner key of every lock under this prefix."""
        return f"{glob_escape(self.prefix)}:lock:{{*}}"
