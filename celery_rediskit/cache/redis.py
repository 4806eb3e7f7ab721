"""``RedisCacheProvider``: a cache shared by every process using the same Redis and prefix.

Keys of entry ``K`` under prefix ``P``: ``P:cache:e:{cache/K}`` holds the entry (its lifetime
as PX expiry, server clock); the fill lock of ``K`` is the mutex ``cache/K`` (keys
``P:lock:{cache/K}...``), so entry and lock share a Redis Cluster slot and one script can
store the one and release the other. Tag ``T`` is the zset ``P:cache:t:{T}`` (see
``lua/_cache_entry.lua``).

Round trips: a hit is one GET. A miss that computes is GET, then ``cache_claim`` (re-check the
entry and take the fill lock, in one script), then ``cache_unlock`` (store the value and hand
the lock to the first waiter, in one script). Waiters queue on the mutex and are woken when it
is handed to them; they then find the entry and pass the lock on.

Tags on Redis Cluster, where a script may only touch keys of one slot. An entry's tag
bookkeeping stays in the entry's own slot: tag ``T`` of the entries in slot ``s`` is the zset
``P:cache:t:{<slot tag of s>}:T`` (``KeySpace.cache_tag_group``), updated by the entry's own
script, so an entry is always indexed under exactly the tags it carries. A directory per tag,
``P:cache:tg:{T}``, lists the slot groups holding its entries; ``set``/``fill`` with tags add
the entry's group to it before storing the entry (one more round trip, pipelined over the
tags), so the directory names at least every group that holds an entry with the tag (a group
emptied since stays listed until its entries' lifetime, plus a minute for clock differences
between nodes, has passed). ``revalidate_tag`` reads the directory, then revalidates each group
in its slot (pipelined: one round trip per master).

The one limit: ``revalidate_tag`` is atomic per slot, not across the cluster. While it runs, a
reader may find an entry of one slot already gone and one of another slot still there. Once it
returns, every entry that carried the tag when it was called is gone; an entry stored while it
ran may survive, as a ``set`` just after it would.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from redis.cluster import RedisCluster
from redis.exceptions import NoScriptError

from .._redis.clients import check_client
from .._redis.keys import IDLE_TTL, KeySpace
from .._redis.scripts import LuaScript, as_text, call, load_script
from .._redis.slots import key_slot, slot_tag
from .._redis.waiting import wakeup
from .._validate import positive_seconds, resource_key, to_ms
from ..durations import Duration, optional_duration
from ..errors import AcquireAborted, LockError, SerializationError
from ..lease import Grant, new_owner_id
from ..mutex.base import MutexLease
from ..mutex.redis import RedisMutexStorage
from ..renewal import renewer
from .base import MISSING, CacheProvider, CacheUnavailable, Claim, check_tags
from .breaker import OUTAGE_ERRORS, CircuitBreaker
from .serializers import Serializer

__all__ = ["RedisCacheProvider"]

log = logging.getLogger("celery_rediskit.cache")

TAG_DIRECTORY_MARGIN = 60.0
"""Redis Cluster: seconds a tag's directory remembers a slot group past the lifetime of the
entry that put it there, so that clocks of different nodes that differ by up to this much
never drop a group while one of its entries lives."""


class _FillLease(MutexLease):
    """The fill lock held while computing an entry; released by the ``cache_unlock`` script."""


    def detach(self) -> None:
        """Stop renewing: the caller releases the lock itself, in a combined script."""
        self.released = True
        if self.auto_renew:
            renewer().unregister(self)


class RedisCacheProvider(CacheProvider):
    """A cache in Redis, shared across processes and restarts.

    ``redis_client`` is a ``redis.Redis`` or a ``RedisCluster``; ``prefix``
    (default ``"rediskit"``) starts every key it uses, and ``clear()`` deletes only entries
    under it. ``serializer`` names a kombu serializer (default ``"json"``); ``accept`` lists
    the serializers whose entries may be read (default: ``serializer`` only). ``pickle`` and
    ``yaml`` are refused unless ``allow_unsafe=True``: their loaders run code, so anyone able to
    write to this Redis could run code in every process reading it.

    ``idle_ttl`` (seconds or a duration text, default a week) is the lifetime of an entry
    stored without ``ttl`` (``ttl=None``, ``expire(key, None)``): every key this provider
    writes expires, so entries of functions or arguments no longer used do not pile up.

    During a Redis outage every operation raises :class:`CacheUnavailable` at once (after the
    first failure, until a background probe every ``cooldown`` seconds finds Redis back);
    memoised functions then just run. One warning is logged per outage.
    """

    def __init__(
        self,
        redis_client: Any,
        prefix: str = "rediskit",
        serializer: str = "json",
        *,
        accept: Iterable[str] | None = None,
        allow_unsafe: bool = False,
        cooldown: float = 2.0,
        idle_ttl: Duration = IDLE_TTL,
    ) -> None:
        self.client = check_client("redis_client", redis_client)
        self.keys = KeySpace(prefix, idle_ttl)
        self.serializer = Serializer(serializer, accept=accept, allow_unsafe=allow_unsafe)
        self.breaker = CircuitBreaker(redis_client.ping, positive_seconds("cooldown", cooldown),
                                      name=prefix)
        self.is_cluster = isinstance(redis_client, RedisCluster)
        self._locks = RedisMutexStorage(redis_client, prefix, idle_ttl=idle_ttl)
        self._tag_prefix = self.keys.cache_tag_prefix
        self._entry_prefix = f"{self.keys.prefix}:cache:e:{{cache/"
        self._set = load_script("cache_set")
        self._delete = load_script("cache_delete")
        self._expire = load_script("cache_expire")
        self._revalidate = load_script("cache_revalidate")
        self._claim = load_script("cache_claim")  # continues into mutex_acquire.lua
        self._tag_group = load_script("cache_tag_group")
        self._unlock = load_script("cache_unlock")  # continues into mutex_release.lua

    # -- helpers -------------------------------------------------------------------------------

    def entry_key(self, key: str) -> str:
        """The Redis key holding entry ``key``."""
        return self._entry_prefix + resource_key(key) + "}"

    def _lifetime_ms(self, seconds: float | None) -> int:
        """An entry's lifetime in ms: ``seconds``, or the idle lifetime for None."""
        return self.keys.idle_ms if seconds is None else to_ms(seconds)

    def _unavailable(self) -> CacheUnavailable:
        return CacheUnavailable("Redis is unavailable: the cache is bypassed until it is back")

    def _outage(self, exc: BaseException) -> CacheUnavailable:
        self.breaker.failure(exc)
        err = CacheUnavailable(f"Redis is unavailable: {exc}")
        err.__cause__ = exc
        return err

    def _tags_of(self, entry: str) -> str:
        """The tag prefix for the scripts of ``entry``: on a cluster, its slot group's."""
        if self.is_cluster:
            return self.keys.cache_tag_group(key_slot(entry))
        return self._tag_prefix

    def _note_groups(self, entry: str, tags: tuple[str, ...], ttl_ms: int) -> None:
        """Cluster: add the slot group of ``entry`` to the directory of each of ``tags``
        (before the entry is stored: the directory must never miss a stored entry)."""
        if not (tags and self.is_cluster):
            return
        group = slot_tag(key_slot(entry))
        cover = ttl_ms + to_ms(TAG_DIRECTORY_MARGIN)
        self._run_each(self._tag_group, [
            ([self.keys.cache_tag_directory(tag)], [group, cover]) for tag in tags
        ])

    def _run_each(self, script: LuaScript, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """Run ``script`` once per (keys, args) in ``calls``, pipelined (a cluster client
        sends each node its share in one round trip); the replies in order."""
        if self.breaker.is_open:
            raise self._unavailable()
        try:
            replies = self._pipelined(script, calls)
            if any(isinstance(r, NoScriptError) for r in replies):
                self.client.script_load(script.source)  # on a cluster client: every primary
                replies = self._pipelined(script, calls)
        except OUTAGE_ERRORS as exc:
            raise self._outage(exc) from exc
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    def _pipelined(self, script: LuaScript, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for keys, args in calls:
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        return list(pipe.execute(raise_on_error=False))

    def _run(self, script: LuaScript, keys: list[str], args: list[Any]) -> Any:
        if self.breaker.is_open:
            raise self._unavailable()
        try:
            return script.run(self.client, keys, args, raw=True)  # entries are bytes
        except OUTAGE_ERRORS as exc:
            raise self._outage(exc) from exc

    # -- the provider interface -------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        if self.breaker.is_open:
            raise self._unavailable()
        try:
            data = call(self.client, "GET", self._entry_prefix + resource_key(key) + "}", raw=True)
        except OUTAGE_ERRORS as exc:
            raise self._outage(exc) from exc
        if data is None:
            return default
        return self.serializer.loads(data)

    def set(
        self, key: str, value: Any, ttl: float | str | None = None, *, tags: Iterable[str] = ()
    ) -> None:
        entry = self.entry_key(key)
        seconds = optional_duration(ttl, "ttl")
        tag_list = check_tags(tags)
        payload = self.serializer.dumps(value, tag_list)
        ttl_ms = self._lifetime_ms(seconds)
        self._note_groups(entry, tag_list, ttl_ms)
        self._run(self._set, [entry], [payload, ttl_ms, self._tags_of(entry)])

    def set_call(
        self, key: str, value: Any, ttl: float | str | None = None, *, tags: Iterable[str] = ()
    ) -> tuple[LuaScript, list[str], list[Any]]:
        """The script :meth:`set` runs, with its KEYS and ARGV, to send along with other
        commands in one round trip (its reply to :meth:`set_reply`). It may be sent again:
        it writes the same entry. Raises as :meth:`set` would before sending (an open
        breaker, a value it cannot serialize); on a cluster, the tags' directories are
        written first, as :meth:`set` writes them."""
        if self.breaker.is_open:
            raise self._unavailable()
        entry = self.entry_key(key)
        tag_list = check_tags(tags)
        payload = self.serializer.dumps(value, tag_list)
        ttl_ms = self._lifetime_ms(optional_duration(ttl, "ttl"))
        self._note_groups(entry, tag_list, ttl_ms)
        return self._set, [entry], [payload, ttl_ms, self._tags_of(entry)]

    def set_reply(self, reply: Any) -> None:
        """Take the reply of a :meth:`set_call` sent elsewhere (an error in place of a
        reply): raise as :meth:`set` would have (an outage opens the breaker)."""
        if isinstance(reply, OUTAGE_ERRORS):
            raise self._outage(reply) from reply
        if isinstance(reply, Exception):
            raise reply

    def delete(self, key: str) -> bool:
        entry = self.entry_key(key)
        return bool(self._run(self._delete, [entry], [self._tags_of(entry)]))

    def exists(self, key: str) -> bool:
        entry = self.entry_key(key)
        if self.breaker.is_open:
            raise self._unavailable()
        try:
            return bool(self.client.exists(entry))
        except OUTAGE_ERRORS as exc:
            raise self._outage(exc) from exc

    def expire(self, key: str, ttl: float | str | None) -> bool:
        ttl_ms = self._lifetime_ms(optional_duration(ttl, "ttl"))
        entry = self.entry_key(key)
        if not self.is_cluster:
            return bool(self._run(self._expire, [entry], [ttl_ms, self._tag_prefix]))
        # Cluster: the script returns the entry's tags, whose directories must then cover the
        # new lifetime. Until they do (one round trip), the directory still covers the old
        # lifetime, which has not passed: the entry was alive when the script ran.
        reply = self._run(self._expire, [entry], [ttl_ms, self._tags_of(entry), "tags"])
        if not reply:
            return False
        self._note_groups(entry, tuple(as_text(t) for t in reply[1:]), ttl_ms)
        return True

    def ttl(self, key: str) -> float | None:
        """Remaining lifetime of ``key`` in seconds; None if it is absent (or has no expiry,
        which only a key written by other means can lack)."""
        if self.breaker.is_open:
            raise self._unavailable()
        try:
            pttl = int(self.client.pttl(self.entry_key(key)))
        except OUTAGE_ERRORS as exc:
            raise self._outage(exc) from exc
        return pttl / 1000 if pttl >= 0 else None

    def clear(self) -> int:
        """Delete every cache entry and tag set under this prefix (found with SCAN).

        Fill locks are left alone: they belong to computations in flight and expire by
        themselves.
        """
        if self.breaker.is_open:
            raise self._unavailable()
        count = 0
        try:
            batch: list[Any] = []
            for key in self.client.scan_iter(match=self.keys.cache_pattern(), count=1000):
                if self.is_cluster:  # keys of many slots: one at a time
                    count += int(self.client.unlink(key))
                    continue
                batch.append(key)
                if len(batch) >= 500:
                    count += int(self.client.unlink(*batch))
                    batch = []
            if batch:
                count += int(self.client.unlink(*batch))
        except OUTAGE_ERRORS as exc:
            raise self._outage(exc) from exc
        return count

    def revalidate_tag(self, tag: str) -> int:
        (tag,) = check_tags((tag,))
        if not self.is_cluster:
            key = f"{self._tag_prefix}{{{tag}}}"
            return int(self._run(self._revalidate, [key], [self._tag_prefix]))
        # Cluster: every slot group the directory names, each atomically in its own slot.
        # The directory is left as it is: a set may have just added a group and be about to
        # store its entry there.
        if self.breaker.is_open:
            raise self._unavailable()
        try:
            groups = self.client.zrange(self.keys.cache_tag_directory(tag), 0, -1)
        except OUTAGE_ERRORS as exc:
            raise self._outage(exc) from exc
        calls: list[tuple[list[str], list[Any]]] = []
        for group in groups:
            prefix = self.keys.cache_tag_group_of(as_text(group))
            calls.append(([prefix + tag], [prefix]))
        return sum(int(n) for n in self._run_each(self._revalidate, calls)) if calls else 0

    # -- single flight across processes ---------------------------------------------------------

    def _lock_keys(self, key: str) -> tuple[str, list[str]]:
        entry = self.entry_key(key)  # checks the key itself first
        name = self.keys.cache_lock_name(key)
        return name, [*self.keys.lock_list(name), entry]

    def claim(
        self,
        key: str,
        *,
        lease: float = 30.0,
        wait: float = 30.0,
        abort: threading.Event | None = None,
    ) -> Claim:
        lease = positive_seconds("lease", lease)
        name, keys = self._lock_keys(key)
        owner = new_owner_id()
        args = self._locks.acquire_argv(owner, lease, name)
        sent = time.monotonic()  # the fill lock's lease counts from here
        try:
            result = self._run(self._claim, keys, args)
        except CacheUnavailable:
            return Claim(key, "bypass", store=False)
        if isinstance(result, bytes):
            return self._hit(key, result)
        if int(result) >= 1:
            return self._owned(key, name, owner, lease, Grant(int(result), sent))
        if wait <= 0:
            return Claim(key, "busy")
        try:
            token = self._locks.acquire(name, owner, lease, wait, abort)
        except AcquireAborted:  # the caller left (a cancelled async call): it dequeued itself
            return Claim(key, "bypass", store=False)
        except LockError:  # LockTimeout: the computer takes too long; compute ourselves
            return Claim(key, "bypass")
        except OUTAGE_ERRORS as exc:
            self.breaker.failure(exc)
            return Claim(key, "bypass", store=False)
        claim = self._owned(key, name, owner, lease, token)
        try:
            value = self.get(key, MISSING)
        except SerializationError:
            value = MISSING
        except CacheUnavailable:
            claim.handle.detach()
            return Claim(key, "bypass", store=False)
        except BaseException:
            self._abandon_quietly(claim)  # interrupted: hand the fill lock on
            raise
        if value is MISSING:
            return claim  # the computer failed or died: our turn
        self.abandon(claim)
        return Claim(key, "hit", value)

    def _abandon_quietly(self, claim: Claim) -> None:
        try:
            self.abandon(claim)
        except BaseException as exc:  # the exception being raised matters more
            log.warning("rediskit cache: could not release the fill lock of %r: %r",
                        claim.key, exc)

    def _hit(self, key: str, data: bytes) -> Claim:
        try:
            return Claim(key, "hit", self.serializer.loads(data))
        except SerializationError as exc:
            log.warning("rediskit cache: entry %r unreadable, recomputing: %s", key, exc)
            return Claim(key, "bypass")

    def _owned(self, key: str, name: str, owner: str, lease: float, token: int) -> Claim:
        held = _FillLease(self._locks, name, owner, lease, fencing_token=token)
        held.start_renewal()
        return Claim(key, "owner", handle=held)

    def fill(
        self, claim: Claim, value: Any, ttl: float | str | None, tags: Iterable[str] = ()
    ) -> None:
        try:
            seconds = optional_duration(ttl, "ttl")
            tag_list = check_tags(tags)
            payload = self.serializer.dumps(value, tag_list)
            ttl_ms = self._lifetime_ms(seconds)
            if isinstance(claim.handle, _FillLease):
                self._note_groups(self.entry_key(claim.key), tag_list, ttl_ms)
        except BaseException:
            self.abandon(claim)
            raise
        self._finish(claim, [b"1", payload, ttl_ms])

    def abandon(self, claim: Claim) -> None:
        self._finish(claim, [b"0", b"", 0])

    def _finish(self, claim: Claim, store: list[Any]) -> None:
        held = claim.handle
        if not isinstance(held, _FillLease):
            return
        claim.handle = None
        held.detach()
        name = self.keys.cache_lock_name(claim.key)
        entry = self.entry_key(claim.key)
        keys = [*self._locks.release_keys(name), entry]
        args = [*self._locks.release_argv(held.owner, name), *store, self._tags_of(entry)]
        result = self._run(self._unlock, keys, args)
        if isinstance(result, (bytes, str)):
            wakeup().hand_over_local(result)  # the next waiter is a thread of this process
