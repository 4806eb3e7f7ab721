"""Cache keys: canonical, stable across processes, clear errors for what can't be encoded."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import subprocess
import sys
import uuid
from decimal import Decimal
from pathlib import Path

import pytest

from celery_rediskit.cache import UnencodableArgument, cache_key_for, cached, parse_duration
from celery_rediskit.errors import ConfigurationError


def f(a: object, b: object = 2, *rest: object, c: object = None, **extra: object) -> None:
    pass


def g(a: object, b: object = 2) -> None:
    pass


class Color(enum.Enum):
    RED = 1


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Opaque:
    pass


class Keyed:
    def __init__(self, ident: int) -> None:
        self.ident = ident

    def __cache_key__(self) -> int:
        return self.ident


def test_defaults_filled_and_keyword_order_irrelevant() -> None:
    base = cache_key_for(g, (1,), {})
    assert cache_key_for(g, (1, 2), {}) == base
    assert cache_key_for(g, (), {"a": 1}) == base
    assert cache_key_for(g, (), {"b": 2, "a": 1}) == base
    assert cache_key_for(g, (1,), {"b": 3}) != base
    k1 = cache_key_for(f, (1,), {"c": 3, "z": 1, "y": 2})
    assert k1 == cache_key_for(f, (1,), {"y": 2, "z": 1, "c": 3})
    assert k1.startswith(f"{__name__}.f:")


def test_types_are_distinct() -> None:
    keys = {
        cache_key_for(g, (value,), {})
        for value in [(1, 2), [1, 2], 1, 1.0, True, "1", b"1", None, {1, 2}, frozenset({1, 2}),
                      {"1": 2}, {1: 2}, Decimal("1"), Color.RED]
    }
    assert len(keys) == 14
    # dict and set order does not matter
    assert cache_key_for(g, ({"a": 1, "b": 2},), {}) == cache_key_for(g, ({"b": 2, "a": 1},), {})
    assert cache_key_for(g, ({3, 1, 2},), {}) == cache_key_for(g, ({2, 3, 1},), {})


def test_versions_and_names() -> None:
    assert cache_key_for(g, (1,), {}, version=2) != cache_key_for(g, (1,), {})
    assert cache_key_for(g, (1,), {}, name="tasks.add").startswith("tasks.add:")


def test_rich_values_encode_without_repr() -> None:
    values = [dt.datetime(2024, 1, 2, 3, 4, 5), dt.date(2024, 1, 2), uuid.UUID(int=7),
              Point(1, 2), Keyed(5), dt.timedelta(seconds=3), (Point(1, 2), [Color.RED])]
    for value in values:
        assert cache_key_for(g, (value,), {}) == cache_key_for(g, (value,), {})
    assert cache_key_for(g, (Keyed(5),), {}) != cache_key_for(g, (Keyed(6),), {})


def test_unencodable_argument_is_named() -> None:
    with pytest.raises(UnencodableArgument) as info:
        cache_key_for(g, (1,), {"b": {"k": [Opaque()]}})
    assert info.value.argument == "b"
    assert "b['k'][0]" in str(info.value) and "Opaque" in str(info.value)
    with pytest.raises(UnencodableArgument, match="'a'"):
        cache_key_for(g, (object(),), {})


def test_cached_function_key_matches_cache_key_for() -> None:
    @cached
    def add(x: int, y: int = 1) -> int:
        return x + y

    assert add.key_for(1) == add.key_for(x=1, y=1)
    assert add.key_for(1) == cache_key_for(add.__wrapped__, (1,), {})
    assert add.key_for(True) != add.key_for(1)  # memoised scalar keys keep types apart
    assert add._key((True,), {}) != add._key((1,), {})


def test_keys_are_stable_across_processes() -> None:
    here = Path(__file__).parent
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import cachefuncs, decimal; "
        "print(cachefuncs.profile.key_for(42)); "
        "print(cachefuncs.profile.key_for(user_id=42, detail=('a', [1, {'z': 1, 'y': 2}])))"
    )
    outputs = [
        subprocess.run([sys.executable, "-c", code, str(here)], capture_output=True, text=True,
                       check=True, env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout
        for seed in ("1", "2")
    ]
    assert outputs[0] == outputs[1]
    first, second = outputs[0].split()
    assert first.startswith("cachefuncs.profile:") and first != second


def test_durations() -> None:
    assert parse_duration(5) == 5.0
    assert parse_duration("30s") == 30.0
    assert parse_duration("5m") == 300.0
    assert parse_duration("1h") == 3600.0
    assert parse_duration("2d") == 172800.0
    assert parse_duration("250ms") == 0.25
    for bad in ("5 minutes", "", -1, 0, True, None, "1y"):
        with pytest.raises(ConfigurationError):
            parse_duration(bad)
