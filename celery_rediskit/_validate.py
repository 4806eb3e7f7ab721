"""Argument checks shared by the primitives: bad input fails early with a message naming it."""

from __future__ import annotations

import math
from typing import Any

from .errors import ConfigurationError


def positive_seconds(name: str, value: Any) -> float:
    """Return ``value`` (a number) as float seconds, or raise ``ConfigurationError`` (a
    ``ValueError``) naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(
            f"{name} must be a number of seconds greater than 0, got {value!r}"
        )
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigurationError(
            f"{name} must be a number of seconds greater than 0, got {value!r}"
        )
    return seconds


def optional_seconds(name: str, value: Any) -> float | None:
    """Like :func:`positive_seconds`, but ``None`` (meaning "no limit") passes through."""
    return None if value is None else positive_seconds(name, value)


def positive_int(name: str, value: Any) -> int:
    """Return ``value`` as an int >= 1, or raise ``ConfigurationError`` (a ``ValueError``)
    naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be an integer of at least 1, got {value!r}")
    return value


def resource_key(value: Any) -> str:
    """Check a lock/semaphore key: a non-empty string without braces (they carry the hash tag);
    ``ConfigurationError`` (a ``ValueError``) otherwise."""
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"key must be a non-empty string, got {value!r}")
    if "{" in value or "}" in value:
        raise ConfigurationError(
            f"key must not contain '{{' or '}}' (reserved for the Redis Cluster hash tag), "
            f"got {value!r}"
        )
    return value


def to_ms(seconds: float) -> int:
    """Seconds (float) to whole milliseconds for Redis, never below 1."""
    ms = int(seconds * 1000 + 0.5)
    return ms if ms > 0 else 1
