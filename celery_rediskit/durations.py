"""The one duration grammar of the library, and its parser.

Every option that takes a duration parses it here: the cache's ``ttl=``, ``cache_life()``,
the task options ``cache_ttl=`` and ``limit_timeout=``, and every ``rediskit_*`` setting (which
may arrive as text from environment variables or Django settings). A duration is:

- a number of seconds (``int`` or ``float``, not ``bool``), or
- text: a number with an optional unit, ``"300"``, ``"1.5"``, ``"500ms"``, ``"30s"``,
  ``"5m"``, ``"2h"``, ``"1d"``, ``"1w"`` (units are case-insensitive; spaces are allowed
  around the number and the unit; no unit means seconds).

It must be finite and greater than 0.
"""

from __future__ import annotations

import math
import re
from typing import Any

from .errors import ConfigurationError

__all__ = ["FORM", "Duration", "optional_duration", "parse_duration"]

Duration = float | int | str
"""A duration: seconds as a number, or text such as ``"30"``, ``"30s"``, ``"5m"`` (see above)."""

FORM = "a number of seconds greater than 0 or a text like '30', '500ms', '30s', '5m', '2h', " \
       "'1d', '1w'"
"""The accepted form, as error messages state it."""

_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d|w)?\s*$", re.IGNORECASE)


def parse_duration(value: Any, name: str = "duration") -> float:
    """``value`` as seconds (a float > 0), or ``ConfigurationError`` (a ``ValueError``) naming
    ``name`` and the accepted form."""
    seconds: float | None = None
    if isinstance(value, str):
        match = _PATTERN.match(value)
        if match is not None:
            seconds = float(match.group(1)) * _UNITS[(match.group(2) or "").lower()]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise ConfigurationError(f"{name} must be {FORM}, got {value!r}")
    return seconds


def optional_duration(value: Any, name: str = "duration") -> float | None:
    """Like :func:`parse_duration`, but ``None`` (no limit, no expiry) passes through."""
    return None if value is None else parse_duration(value, name)
