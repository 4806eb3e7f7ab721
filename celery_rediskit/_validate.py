"""Argument checks shared by the primitives: bad input fails early with a message naming it."""

from __future__ import annotations

import math
import re
from typing import Any

from .errors import ConfigurationError

MAX_NAME_BYTES = 512
"""The longest key (a lock, semaphore or cache entry name) and the longest prefix, in bytes of
UTF-8. Redis would take far longer ones, but each is repeated in several keys per resource and
in every command: a longer one is almost surely a mistake (e.g. a whole payload as the key)."""

# Characters no key or prefix may contain: the braces of the Redis Cluster hash tag, control
# characters (newlines and the like break every line-based tool that shows keys) and lone
# surrogates (not encodable as UTF-8). One search on the hot path; the message is found after.
_REFUSED = re.compile("[{}\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_GLOB = re.compile(r"[*?\[\]\\]")
_KEY_FORM = (
    f"a non-empty string of at most {MAX_NAME_BYTES} bytes (UTF-8) without '{{', '}}' or "
    "control characters"
)
_PREFIX_FORM = (
    f"a non-empty string of at most {MAX_NAME_BYTES} bytes (UTF-8) without '{{', '}}', glob "
    "characters (* ? [ ] \\) or control characters"
)


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


def resource_key(value: Any, limit: int = MAX_NAME_BYTES) -> str:
    """Check a lock/semaphore/cache key: :data:`_KEY_FORM` (braces carry the hash tag);
    ``ConfigurationError`` (a ``ValueError``) naming ``key`` otherwise. Glob characters are
    allowed: every SCAN pattern built from a key escapes them. ``limit`` (bytes) is raised only
    for names the library derives from a checked key (``cache/<key>``)."""
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"key must be {_KEY_FORM}, got {value!r}")
    # Hot path (every acquire): isprintable() is a fast C scan that is False for every refused
    # character (and for a few allowed ones, such as a no-break space: the regex decides).
    if (not value.isprintable() or "{" in value or "}" in value) and _REFUSED.search(value):
        raise ConfigurationError(f"key must be {_KEY_FORM}: {_why(value)}, got {value!r}")
    if len(value) > limit // 4:
        _check_length("key", value, _KEY_FORM, limit)
    return value


def key_prefix(value: Any) -> str:
    """Check a key prefix: :data:`_PREFIX_FORM`; ``ConfigurationError`` (a ``ValueError``)
    naming ``prefix`` otherwise. Glob characters are refused (they would also be glob
    characters in the ACL patterns and SCAN patterns users write for the prefix)."""
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"prefix must be {_PREFIX_FORM}, got {value!r}")
    if _REFUSED.search(value) is not None:
        raise ConfigurationError(f"prefix must be {_PREFIX_FORM}: {_why(value)}, got {value!r}")
    if _GLOB.search(value) is not None:
        raise ConfigurationError(
            f"prefix must be {_PREFIX_FORM}: it contains the glob character "
            f"{_GLOB.search(value).group()!r}, got {value!r}"  # type: ignore[union-attr]
        )
    _check_length("prefix", value, _PREFIX_FORM, MAX_NAME_BYTES)
    return value


def _why(value: str) -> str:
    found = _REFUSED.search(value)
    char = found.group() if found is not None else ""
    if char in "{}":
        return f"it contains {char!r} (reserved for the Redis Cluster hash tag)"
    if "\ud800" <= char <= "\udfff":
        return f"it contains a lone surrogate {char!r} (not encodable as UTF-8)"
    return f"it contains the control character {char!r}"


def _check_length(name: str, value: str, form: str, limit: int) -> None:
    size = len(value.encode())
    if size > limit:
        shown = value[:40] + "..."
        raise ConfigurationError(f"{name} must be {form}: it is {size} bytes, got {shown!r}")


def to_ms(seconds: float) -> int:
    """Seconds (float) to whole milliseconds for Redis, never below 1."""
    ms = int(seconds * 1000 + 0.5)
    return ms if ms > 0 else 1
