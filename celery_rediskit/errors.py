"""The library's errors: one root, so ``except RedisKitError`` catches everything we raise."""

from __future__ import annotations

__all__ = [
    "AcquireAborted",
    "CacheError",
    "ConfigurationError",
    "LeaseLost",
    "LockError",
    "LockTimeout",
    "RateLimited",
    "RedisKitError",
    "SerializationError",
]


class RedisKitError(Exception):
    """Root of every error raised by celery-rediskit."""


class ConfigurationError(RedisKitError, ValueError):
    """An option or setting has an invalid value; the message names it and the accepted form."""


class LockError(RedisKitError):
    """A lock or permit could not be acquired or used. ``key`` names the resource."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class LockTimeout(LockError, TimeoutError):
    """The lock or permit could not be had within the timeout (seconds)."""


class RateLimited(LockTimeout):
    """A rate limiter's next slot is further away than the caller would wait. ``key`` names
    the limiter; ``retry_after`` is the seconds until a check of the same cost would pass."""

    def __init__(self, message: str, key: str | None = None, retry_after: float = 0.0) -> None:
        super().__init__(message, key)
        self.retry_after = retry_after


class AcquireAborted(LockError):
    """The caller's ``abort`` event was set while waiting for the lock or permit."""


class LeaseLost(LockError):
    """A lease expired or was taken away while its holder still believed it held it."""


class CacheError(RedisKitError):
    """A cache operation failed for a reason other than a Redis outage."""


class SerializationError(CacheError, ValueError):
    """A value could not be encoded or decoded by the cache's serializer."""
