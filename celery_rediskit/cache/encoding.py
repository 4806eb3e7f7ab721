"""Canonical argument encoding: the part of a cache key that comes from a call's arguments.

The encoding is the same in every process and across restarts: it never uses ``repr`` of
objects, ``id()`` or ``hash()`` (randomised per process for strings). Values are tagged with
their type, so ``(1, 2)`` and ``[1, 2]``, ``1`` and ``1.0`` and ``True`` give different keys;
dict and set items are sorted by their encoding, so insertion order does not matter.

Encodable: None, bool, int, float, str, bytes, tuple, list, dict, set, frozenset, Decimal,
UUID, date/time/datetime/timedelta, Enum members, dataclass instances, and any object with a
``__cache_key__()`` method returning an encodable value. Anything else raises
``CacheError`` naming the argument.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
import inspect
import uuid
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any

from ..errors import CacheError, ConfigurationError

__all__ = [
    "ArgumentEncoder",
    "UnencodableArgument",
    "cache_key_for",
    "encode_value",
    "function_name",
]


class UnencodableArgument(CacheError, TypeError):
    """An argument of a cached call has no stable encoding. ``argument`` names it."""

    def __init__(self, message: str, argument: str) -> None:
        super().__init__(message)
        self.argument = argument


class _Unencodable(Exception):
    def __init__(self, path: str, value: Any) -> None:
        super().__init__(path)
        self.path = path
        self.value = value


def _text(s: str) -> str:
    return f"{len(s)}:{s}"


def _encode(value: Any, out: list[str], path: str) -> None:  # noqa: C901 - one flat dispatch
    kind = type(value)
    if value is None:
        out.append("N")
    elif kind is str:
        out.append("s" + _text(value))
    elif kind is bool:
        out.append("T" if value else "F")
    elif kind is int:
        out.append(f"i{value};")
    elif kind is float:
        out.append(f"f{value!r};")  # repr of a float is exact and stable
    elif kind is tuple or kind is list:
        out.append(("t" if kind is tuple else "l") + f"{len(value)}[")
        for i, item in enumerate(value):
            _encode(item, out, f"{path}[{i}]")
        out.append("]")
    elif kind is dict:
        items = sorted((_encoded(k, f"{path} key"), v, k) for k, v in value.items())
        out.append(f"d{len(items)}{{")
        for key_text, item, key in items:
            out.append(key_text)
            _encode(item, out, f"{path}[{key!r}]" if type(key) in (str, int) else f"{path}[...]")
        out.append("}")
    elif kind is bytes:
        out.append(f"b{len(value)}:{value.hex()}")
    elif kind is set or kind is frozenset:
        parts = sorted(_encoded(item, f"{path} item") for item in value)
        out.append(("S" if kind is set else "Z") + f"{len(parts)}[" + "".join(parts) + "]")
    elif isinstance(value, enum.Enum):
        out.append("e" + _text(f"{kind.__module__}.{kind.__qualname__}.{value.name}"))
    elif hasattr(value, "__cache_key__"):
        out.append("k" + _text(f"{kind.__module__}.{kind.__qualname__}"))
        _encode(value.__cache_key__(), out, f"{path}.__cache_key__()")
    elif isinstance(value, Decimal):
        out.append("D" + _text(str(value)))
    elif isinstance(value, uuid.UUID):
        out.append(f"u{value.hex};")
    elif isinstance(value, dt.datetime):  # before date: datetime is a date
        out.append("W" + _text(value.isoformat()))
    elif isinstance(value, (dt.date, dt.time)):
        out.append(("a" if isinstance(value, dt.date) else "h") + _text(value.isoformat()))
    elif isinstance(value, dt.timedelta):
        out.append(f"x{value.days},{value.seconds},{value.microseconds};")
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = dataclasses.fields(value)
        out.append("c" + _text(f"{kind.__module__}.{kind.__qualname__}") + f"{len(fields)}{{")
        for f in fields:
            out.append(_text(f.name))
            _encode(getattr(value, f.name), out, f"{path}.{f.name}")
        out.append("}")
    elif isinstance(value, (str, int, float, tuple, list, dict)):
        # Subclasses of the builtins (named tuples, str enums handled above, ...): by type and
        # builtin value, so a subclass never collides with the plain value.
        out.append("y" + _text(f"{kind.__module__}.{kind.__qualname__}"))
        base: Any = next(b for b in (str, int, float, tuple, list, dict) if isinstance(value, b))
        _encode(base(value), out, path)
    else:
        raise _Unencodable(path, value)


def _encoded(value: Any, path: str) -> str:
    out: list[str] = []
    _encode(value, out, path)
    return "".join(out)


def encode_value(value: Any, name: str = "value") -> str:
    """The canonical text of ``value``; raises ``UnencodableArgument`` naming ``name``."""
    try:
        return _encoded(value, name)
    except _Unencodable as exc:
        raise _unencodable(name, exc) from None


def _unencodable(argument: str, exc: _Unencodable) -> UnencodableArgument:
    kind = type(exc.value)
    return UnencodableArgument(
        f"cannot build a cache key: argument {exc.path!r} is a "
        f"{kind.__module__}.{kind.__qualname__}, which has no stable encoding "
        "(use None, bool, int, float, str, bytes, tuple, list, dict, set, Decimal, UUID, "
        "date/time, Enum, a dataclass, or give the class a __cache_key__() method)",
        argument,
    )


def function_name(fn: Callable[..., Any]) -> str:
    """``"<module>.<qualified name>"`` of ``fn``: the identity part of its cache keys."""
    module = getattr(fn, "__module__", None) or "?"
    qualname = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if not qualname:
        raise ConfigurationError(f"cannot name {fn!r} for its cache key: pass name=")
    return f"{module}.{qualname}"


class ArgumentEncoder:
    """Encodes the bound arguments of calls to one function, defaults filled in.

    Calls with positional arguments only take a fast path that skips ``inspect`` binding.
    """

    __slots__ = ("_signature", "_names", "_defaults", "_simple")

    def __init__(self, fn: Callable[..., Any]) -> None:
        self._signature = inspect.signature(fn)
        params = list(self._signature.parameters.values())
        simple = all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)
        self._simple = simple
        self._names: tuple[str, ...] = tuple(p.name for p in params)
        self._defaults: tuple[Any, ...] = tuple(p.default for p in params)

    def encode(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        """Canonical text of the call ``fn(*args, **kwargs)``; raises on bad arguments."""
        names = self._names
        if self._simple and not kwargs and len(args) <= len(names):
            values = list(args)
            empty = inspect.Parameter.empty
            for i in range(len(args), len(names)):
                default = self._defaults[i]
                if default is empty:
                    values = []
                    break
                values.append(default)
            else:
                return self._join(zip(names, values, strict=True))
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"cannot build a cache key for this call: {exc}") from None
        bound.apply_defaults()
        return self._join(bound.arguments.items())

    @staticmethod
    def _join(pairs: Any) -> str:
        out: list[str] = []
        for name, value in pairs:
            out.append(_text(name))
            try:
                _encode(value, out, name)
            except _Unencodable as exc:
                raise _unencodable(name, exc) from None
        return "".join(out)


def digest(text: str) -> str:
    """A short stable digest (32 hex characters) of an encoding."""
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def cache_key_for(
    fn: Callable[..., Any],
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    version: str | int | None = None,
    name: str | None = None,
) -> str:
    """The cache key of the call ``fn(*args, **kwargs)``: ``"<name>[@<version>]:<digest>"``.

    ``name`` defaults to ``"<module>.<qualified name>"`` of ``fn`` (pass it to key by something
    else, e.g. a Celery task name). The digest covers the bound arguments with defaults filled
    in, so ``f(1)``, ``f(x=1)`` and ``f(1, y=<default>)`` share one key.
    """
    encoder = ArgumentEncoder(fn)
    return key_name(name or function_name(fn), version, encoder.encode(args, kwargs or {}))


def key_name(name: str, version: str | int | None, encoded: str) -> str:
    base = name if version is None else f"{name}@{version}"
    return f"{base}:{digest(encoded)}"
