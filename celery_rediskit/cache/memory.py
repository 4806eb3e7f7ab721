"""``MemoryCacheProvider``: a cache in this process's memory, with the same semantics as
the Redis provider (lifetimes, tags, single-flight)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from .._validate import positive_int, resource_key
from ..durations import optional_duration
from .base import CacheProvider, check_tags

__all__ = ["MemoryCacheProvider"]


class MemoryCacheProvider(CacheProvider):
    """A cache in this process's memory: at most ``max_entries`` entries, least recently used
    evicted first, lifetimes honoured (monotonic clock). Thread-safe. Values are kept as the
    objects themselves (not copied): do not mutate what you get back.
    """

    def __init__(self, max_entries: int = 1024) -> None:
        self.max_entries = positive_int("max_entries", max_entries)
        self._lock = threading.Lock()
        # key -> (value, expires_at monotonic or None, tags)
        self._data: OrderedDict[str, tuple[Any, float | None, tuple[str, ...]]] = OrderedDict()
        self._tags: dict[str, set[str]] = {}

    def _drop(self, key: str) -> None:
        _value, _expires, tags = self._data.pop(key)
        for tag in tags:
            keys = self._tags.get(tag)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._tags[tag]

    def _live(self, key: str) -> tuple[Any, float | None, tuple[str, ...]] | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry[1] is not None and entry[1] <= time.monotonic():
            self._drop(key)
            return None
        return entry

    def get(self, key: str, default: Any = None) -> Any:
        with self._lock:
            entry = self._live(resource_key(key))
            if entry is None:
                return default
            self._data.move_to_end(key)
            return entry[0]

    def set(
        self, key: str, value: Any, ttl: float | str | None = None, *, tags: Iterable[str] = ()
    ) -> None:
        key = resource_key(key)
        seconds = optional_duration(ttl, "ttl")
        tag_list = check_tags(tags)
        expires = None if seconds is None else time.monotonic() + seconds
        with self._lock:
            if key in self._data:
                self._drop(key)
            self._data[key] = (value, expires, tag_list)
            for tag in tag_list:
                self._tags.setdefault(tag, set()).add(key)
            while len(self._data) > self.max_entries:
                self._drop(next(iter(self._data)))

    def delete(self, key: str) -> bool:
        with self._lock:
            if self._live(resource_key(key)) is None:
                return False
            self._drop(key)
            return True

    def exists(self, key: str) -> bool:
        with self._lock:
            return self._live(resource_key(key)) is not None

    def expire(self, key: str, ttl: float | str | None) -> bool:
        seconds = optional_duration(ttl, "ttl")
        with self._lock:
            entry = self._live(resource_key(key))
            if entry is None:
                return False
            expires = None if seconds is None else time.monotonic() + seconds
            self._data[key] = (entry[0], expires, entry[2])
            return True

    def clear(self) -> int:
        with self._lock:
            count = len(self._data)
            self._data.clear()
            self._tags.clear()
            return count

    def revalidate_tag(self, tag: str) -> int:
        (tag,) = check_tags((tag,))
        with self._lock:
            keys = list(self._tags.get(tag, ()))
            for key in keys:
                self._drop(key)
            return len(keys)

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)
