"""Memoised functions: ``@cached``, and ``cache_tag`` / ``cache_life`` / ``revalidate_tag``.

``@cached`` keys each call by the function's identity (module and qualified name, plus an
optional ``version``) and the canonical encoding of its bound arguments (see ``encoding``),
so every process calling the same function with the same arguments shares one entry. Inside
the function, ``cache_tag(...)`` and ``cache_life(...)`` shape the entry being computed.

The cache is an optimisation: when the provider is unavailable (a Redis outage) the function
just runs; when its result cannot be serialized, a warning is logged and the result returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from contextvars import ContextVar
from typing import Any, Generic, ParamSpec, TypeVar, overload

from .._validate import positive_seconds
from ..durations import parse_duration
from ..errors import CacheError, ConfigurationError
from .base import MISSING, CacheProvider, CacheUnavailable, Claim, check_tags
from .encoding import ArgumentEncoder, digest, function_name, key_name
from .memory import MemoryCacheProvider

__all__ = [
    "get_cache_provider",
    "set_cache_provider",
    "DEFAULT_LEASE",
    "DEFAULT_TTL",
    "DEFAULT_WAIT",
    "AsyncCachedFunction",
    "CacheContextError",
    "CachedFunction",
    "cache_life",
    "cache_tag",
    "cached",
    "compute_cached",
    "revalidate_tag",
]

_provider: CacheProvider | None = None
_provider_lock = threading.Lock()


def set_cache_provider(provider: CacheProvider) -> None:
    """Make ``provider`` the process-wide cache of memoised functions without their own."""
    if not isinstance(provider, CacheProvider):
        raise ConfigurationError(f"expected a CacheProvider, got {provider!r}")
    global _provider
    _provider = provider


def get_cache_provider() -> CacheProvider:
    """The process-wide provider; a :class:`MemoryCacheProvider` until one is set."""
    global _provider
    provider = _provider
    if provider is None:
        with _provider_lock:
            if _provider is None:
                _provider = MemoryCacheProvider()
            provider = _provider
    return provider

log = logging.getLogger("celery_rediskit.cache")

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_TTL = 300.0
"""Seconds a memoised result lives unless ``ttl=`` or ``cache_life()`` says otherwise."""
DEFAULT_WAIT = 30.0
"""Seconds a caller waits for another caller computing the same entry before computing itself."""
DEFAULT_LEASE = 30.0
"""Seconds the fill lock outlives a computer that died (renewed while it computes)."""


class CacheContextError(CacheError, RuntimeError):
    """``cache_tag`` / ``cache_life`` were called outside the computation of a cached call."""


class _Computation:
    __slots__ = ("ttl", "tags")

    def __init__(self, ttl: float, tags: tuple[str, ...]) -> None:
        self.ttl = ttl
        self.tags = list(tags)


_current: ContextVar[_Computation | None] = ContextVar("rediskit_cache_computation", default=None)


def _computation(what: str) -> _Computation:
    comp = _current.get()
    if comp is None:
        raise CacheContextError(
            f"{what}() must be called inside a function decorated with @cached, while it "
            "computes a result (it shapes the cache entry being computed)"
        )
    return comp


def cache_tag(*tags: str) -> None:
    """Add ``tags`` to the entry being computed; ``revalidate_tag(tag)`` later drops it.

    Raises :class:`CacheContextError` outside a ``@cached`` computation.
    """
    comp = _computation("cache_tag")
    for tag in check_tags(tags):
        if tag not in comp.tags:
            comp.tags.append(tag)


def cache_life(ttl: float | str) -> None:
    """Set the lifetime of the entry being computed: seconds or ``"30s"``, ``"5m"``, ``"1h"``...

    Raises :class:`CacheContextError` outside a ``@cached`` computation.
    """
    comp = _computation("cache_life")
    comp.ttl = parse_duration(ttl, "cache_life")


def revalidate_tag(tag: str, provider: CacheProvider | None = None) -> int:
    """Drop every entry carrying ``tag`` (in every process sharing the provider's backend).

    Uses the process-wide provider unless ``provider`` is given; returns the number dropped.
    """
    return (get_cache_provider() if provider is None else provider).revalidate_tag(tag)


class _Policy:
    """How one memoised function (or one ``compute_cached`` call) uses the cache."""

    __slots__ = ("label", "ttl", "tags", "wait", "lease", "provider", "_warned")

    def __init__(
        self,
        label: str,
        ttl: float | str | None,
        tags: Iterable[str],
        wait: float,
        lease: float,
        provider: CacheProvider | None,
    ) -> None:
        self.label = label
        self.ttl = DEFAULT_TTL if ttl is None else parse_duration(ttl, "ttl")
        self.tags = check_tags(tags)
        self.wait = float(wait) if wait == 0 else positive_seconds("wait", wait)
        self.lease = positive_seconds("lease", lease)
        if provider is not None and not isinstance(provider, CacheProvider):
            raise CacheError(f"provider must be a CacheProvider, got {provider!r}")
        self.provider = provider
        self._warned: set[type[BaseException]] = set()

    def warn(self, what: str, exc: BaseException) -> None:
        if type(exc) not in self._warned:  # once per function and kind of error
            self._warned.add(type(exc))
            log.warning("rediskit cache: %s for %s: %s", what, self.label, exc)

    def lookup(self, provider: CacheProvider, key: str) -> Any:
        """The cached value or MISSING; errors other than bad arguments count as a miss."""
        try:
            return provider.get(key, MISSING)
        except CacheUnavailable:
            return _UNAVAILABLE
        except CacheError as exc:  # an unreadable entry: recompute and overwrite it
            self.warn("cached entry unreadable, recomputing", exc)
            return MISSING

    def store(self, provider: CacheProvider, claim: Claim, value: Any, comp: _Computation) -> None:
        try:
            if claim.state == "owner":
                provider.fill(claim, value, comp.ttl, comp.tags)
            elif claim.store:
                provider.set(claim.key, value, comp.ttl, tags=comp.tags)
        except CacheUnavailable:
            pass
        except CacheError as exc:  # SerializationError and the like: the caller still gets it
            self.warn("result not cached", exc)

    def drop(self, provider: CacheProvider, claim: Claim) -> None:
        if claim.state == "owner":
            with contextlib.suppress(CacheError):
                provider.abandon(claim)


_UNAVAILABLE: Any = object()


def _provider_of(policy: _Policy) -> CacheProvider:
    # Not ``policy.provider or ...``: an empty MemoryCacheProvider is falsy (it has __len__).
    return get_cache_provider() if policy.provider is None else policy.provider

_SCALARS = frozenset({str, int, bool, bytes, type(None)})  # not float: 0.0 == -0.0
_KEY_MEMO_SIZE = 4096


def _run_sync(
    policy: _Policy,
    key: str,
    compute: Callable[[], R],
    provider: CacheProvider | None = None,
    value: Any = None,
) -> R:
    if provider is None:
        provider = _provider_of(policy)
        value = policy.lookup(provider, key)
    if value is _UNAVAILABLE:
        return _computed(policy, compute)
    if value is not MISSING:
        return value  # type: ignore[no-any-return]
    try:
        claim = provider.claim(key, lease=policy.lease, wait=policy.wait)
    except CacheUnavailable:
        return _computed(policy, compute)
    if claim.state == "hit":
        return claim.value  # type: ignore[no-any-return]
    comp = _Computation(policy.ttl, policy.tags)
    token = _current.set(comp)
    try:
        result = compute()
    except BaseException:
        policy.drop(provider, claim)
        raise
    finally:
        _current.reset(token)
    policy.store(provider, claim, result, comp)
    return result


def _computed(policy: _Policy, compute: Callable[[], R]) -> R:
    token = _current.set(_Computation(policy.ttl, policy.tags))
    try:
        return compute()
    finally:
        _current.reset(token)


class _ClaimWait:
    """An async caller's wait for the fill lock, run in a worker thread (not on the loop).

    The caller may be cancelled while the thread waits (``task.cancel()``, ``wait_for``'s
    timeout). Then nobody would compute under a lock the thread obtains, and it would be
    renewed for ever while later callers wait their full ``wait``. So the cancellation ends
    the thread's wait (``abort``: it leaves the queue), and a claim made for the departed
    caller is abandoned at once: by the cancellation when the thread delivered it just before,
    by the thread when it gets it after. ``_lock`` makes the two exclusive.
    """

    __slots__ = ("policy", "provider", "key", "abort", "_lock", "_left", "_delivered")

    def __init__(self, policy: _Policy, provider: CacheProvider, key: str) -> None:
        self.policy = policy
        self.provider = provider
        self.key = key
        self.abort = threading.Event()
        self._lock = threading.Lock()
        self._left = False
        self._delivered: Claim | None = None

    async def wait(self) -> Claim:
        try:
            return await asyncio.to_thread(self._run)
        except BaseException:  # cancelled (or the wait failed): give up the claim
            self._leave()
            raise

    def _run(self) -> Claim:  # in the worker thread
        policy = self.policy
        claim = self.provider.claim(self.key, lease=policy.lease, wait=policy.wait,
                                    abort=self.abort)
        with self._lock:
            if not self._left:
                self._delivered = claim
                return claim
        policy.drop(self.provider, claim)  # the caller is gone: give the lock back now
        return claim

    def _leave(self) -> None:  # on the loop, as the caller is cancelled
        self.abort.set()
        with self._lock:
            self._left = True
            claim, self._delivered = self._delivered, None
        if claim is not None:  # obtained, but the caller never resumed to receive it
            self.policy.drop(self.provider, claim)


async def _run_async(
    policy: _Policy, key: str, compute: Callable[[], Awaitable[R]]
) -> R:
    provider = _provider_of(policy)
    value = policy.lookup(provider, key)
    comp = _Computation(policy.ttl, policy.tags)
    if value is _UNAVAILABLE:
        token = _current.set(comp)
        try:
            return await compute()
        finally:
            _current.reset(token)
    if value is not MISSING:
        return value  # type: ignore[no-any-return]
    try:
        claim = provider.claim(key, lease=policy.lease, wait=0)
        if claim.state == "busy":  # someone computes it: wait in a thread, not on the loop
            claim = await _ClaimWait(policy, provider, key).wait()
    except CacheUnavailable:
        claim = Claim(key, "bypass", store=False)
    if claim.state == "hit":
        return claim.value  # type: ignore[no-any-return]
    token = _current.set(comp)
    try:
        result = await compute()
    except BaseException:
        policy.drop(provider, claim)
        raise
    finally:
        _current.reset(token)
    policy.store(provider, claim, result, comp)
    return result


def compute_cached(
    key: str,
    compute: Callable[[], R],
    *,
    provider: CacheProvider | None = None,
    ttl: float | str | None = None,
    tags: Iterable[str] = (),
    wait: float = DEFAULT_WAIT,
    lease: float = DEFAULT_LEASE,
) -> R:
    """Return the value cached under ``key``, or compute it once with ``compute()``.

    The building block of ``@cached`` for callers that pick their own key (such as
    ``cache_key_for(...)``): single-flight across processes, ``cache_tag``/``cache_life``
    usable inside ``compute``, and the value returned even when it cannot be cached.
    ``ttl`` (seconds or ``"5m"``; default ``DEFAULT_TTL``), ``wait`` and ``lease`` in seconds.
    """
    policy = _Policy(key, ttl, tags, wait, lease, provider)
    return _run_sync(policy, key, compute)


class CachedFunction(Generic[P, R]):
    """A memoised function. Call it like the function; ``invalidate(*args, **kwargs)`` drops
    the entry of one call, ``key_for(*args, **kwargs)`` tells its key."""

    def __init__(
        self,
        fn: Callable[P, Any],
        *,
        ttl: float | str | None = None,
        tags: Iterable[str] = (),
        version: str | int | None = None,
        name: str | None = None,
        provider: CacheProvider | None = None,
        wait: float = DEFAULT_WAIT,
        lease: float = DEFAULT_LEASE,
    ) -> None:
        self.__wrapped__ = fn
        self.name = name or function_name(fn)
        self.version = version
        self._encoder = ArgumentEncoder(fn)
        self._base = self.name if version is None else f"{self.name}@{version}"
        self._policy = _Policy(self.name, ttl, tags, wait, lease, provider)
        self._keys: dict[tuple[Any, ...], str] = {}
        functools.update_wrapper(self, fn)

    @property
    def provider(self) -> CacheProvider:
        """The provider this function uses (its own, else the process-wide one)."""
        return _provider_of(self._policy)

    @property
    def ttl(self) -> float:
        """Default lifetime of this function's entries, seconds."""
        return self._policy.ttl

    @property
    def tags(self) -> tuple[str, ...]:
        return self._policy.tags

    def key_for(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The cache key of the call ``fn(*args, **kwargs)``."""
        return key_name(self.name, self.version, self._encoder.encode(args, kwargs))

    def _key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        # Calls with scalar positional arguments only (the common case) remember their key:
        # the types are part of the memo key, since 1, 1.0 and True are equal but keyed apart.
        memo_key: tuple[Any, ...] | None
        if not kwargs:
            memo_key = (args, *map(type, args))
            try:
                return self._keys[memo_key]
            except KeyError:
                pass
            except TypeError:  # unhashable arguments
                memo_key = None
        else:
            memo_key = None
        key = f"{self._base}:{digest(self._encoder.encode(args, kwargs))}"
        if memo_key is not None and all(type(a) in _SCALARS for a in args):
            if len(self._keys) >= _KEY_MEMO_SIZE:
                self._keys.clear()
            self._keys[memo_key] = key
        return key

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Drop the cached result of ``fn(*args, **kwargs)``; True if there was one."""
        return self.provider.delete(self._key(args, kwargs))

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        key = self._key(args, kwargs)
        policy = self._policy
        provider = _provider_of(policy)
        value = policy.lookup(provider, key)  # the hit path: one GET
        if value is not MISSING and value is not _UNAVAILABLE:
            return value  # type: ignore[no-any-return]
        fn = self.__wrapped__
        return _run_sync(policy, key, lambda: fn(*args, **kwargs), provider, value)  # type: ignore[no-any-return]

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        # As a method: ``self`` is an argument like any other (give the class __cache_key__).
        return self if obj is None else functools.partial(self, obj)

    def __repr__(self) -> str:
        return f"<cached {self.name}>"


class AsyncCachedFunction(CachedFunction[P, R]):
    """A memoised ``async def`` function: ``await fn(...)``.

    A call that finds another caller computing its entry waits for it in a worker thread, not
    on the event loop. Cancelling a call (``task.cancel()``, ``asyncio.wait_for``'s timeout),
    while it waits or while it computes, gives the entry's fill lock back at once.
    """

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:  # type: ignore[override]
        key = self._key(args, kwargs)
        fn = self.__wrapped__
        return await _run_async(self._policy, key, lambda: fn(*args, **kwargs))


@overload
def cached(fn: Callable[P, Coroutine[Any, Any, R]], /) -> AsyncCachedFunction[P, R]: ...


@overload
def cached(fn: Callable[P, R], /) -> CachedFunction[P, R]: ...


@overload
def cached(
    *,
    ttl: float | str | None = None,
    tags: Iterable[str] = (),
    version: str | int | None = None,
    name: str | None = None,
    provider: CacheProvider | None = None,
    wait: float = DEFAULT_WAIT,
    lease: float = DEFAULT_LEASE,
) -> Callable[[Callable[P, R]], CachedFunction[P, R]]: ...


def cached(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    ttl: float | str | None = None,
    tags: Iterable[str] = (),
    version: str | int | None = None,
    name: str | None = None,
    provider: CacheProvider | None = None,
    wait: float = DEFAULT_WAIT,
    lease: float = DEFAULT_LEASE,
) -> Any:
    """Memoise a function (plain or ``async def``) in the cache provider.

    ``@cached``, ``@cached(ttl=300)``, ``@cached(ttl="5m", tags=["users"], version=2)``.
    ``ttl``: lifetime in seconds or ``"30s"``/``"5m"``/``"1h"``/``"2d"`` (default
    ``DEFAULT_TTL``, 300 s; ``cache_life()`` inside the function overrides it per entry).
    ``tags``: tags of every entry (``cache_tag()`` inside adds more). ``version``: part of the
    key; bump it when the function's results change meaning. ``name``: the identity in the key
    (default ``"<module>.<qualified name>"``). ``provider``: default the process-wide one, looked
    up at each call. ``wait``: seconds to wait for another caller computing the same entry
    before computing anyway. ``lease``: seconds after which a crashed computer's claim lapses.
    """
    options = dict(ttl=ttl, tags=tags, version=version, name=name, provider=provider,
                   wait=wait, lease=lease)

    def wrap(f: Callable[..., Any]) -> Any:
        if not callable(f):
            raise CacheError(f"@cached decorates a function, got {f!r}")
        if inspect.iscoroutinefunction(f):
            return AsyncCachedFunction(f, **options)  # type: ignore[arg-type]
        return CachedFunction(f, **options)  # type: ignore[arg-type]

    return wrap if fn is None else wrap(fn)


