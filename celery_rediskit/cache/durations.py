"""Durations for cache lifetimes: seconds (int/float) or strings like ``"30s"``, ``"5m"``."""

from __future__ import annotations

import math
import re
from typing import Any

from ..errors import ConfigurationError

__all__ = ["Duration", "parse_duration"]

Duration = float | int | str
"""A lifetime: seconds as a number, or ``"<number><unit>"`` with unit ms, s, m, h, d or w."""

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$", re.IGNORECASE)


def parse_duration(value: Any, name: str = "ttl") -> float:
    """Return ``value`` as seconds (float > 0).

    Accepts a number of seconds or a string such as ``"500ms"``, ``"30s"``, ``"5m"``, ``"1h"``,
    ``"2d"``, ``"1w"``. Raises ``ConfigurationError`` naming ``name`` otherwise.
    """
    if isinstance(value, str):
        match = _PATTERN.match(value)
        if match is None:
            raise ConfigurationError(
                f"{name} must be seconds or a duration like '30s', '5m', '1h', '2d', got {value!r}"
            )
        seconds = float(match.group(1)) * _UNITS[match.group(2).lower()]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ConfigurationError(
            f"{name} must be seconds or a duration like '30s', '5m', '1h', '2d', got {value!r}"
        )
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigurationError(f"{name} must be greater than 0 seconds, got {value!r}")
    return seconds


def optional_duration(value: Any, name: str = "ttl") -> float | None:
    """Like :func:`parse_duration`, but ``None`` (no expiry) passes through."""
    return None if value is None else parse_duration(value, name)
