"""How cached values become bytes: kombu's serializer registry, with pickle refused by default.

A stored entry is ``<content type>\\n<tags>\\n<payload>``: the content type travels with the
value, so any process can decode it, and only the content types the reader accepts are ever
decoded. Pickle (and yaml) can run code while loading: anyone able to write to Redis could
then run code in every reader, so they are refused unless the user opts in with
``allow_unsafe=True``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from kombu.serialization import registry
from kombu.utils import json as kombu_json

from ..errors import ConfigurationError, SerializationError

__all__ = ["Serializer", "UNSAFE_SERIALIZERS"]

UNSAFE_SERIALIZERS = frozenset({"pickle", "yaml"})
"""Serializers whose decoders can run arbitrary code: refused unless explicitly allowed."""

TAG_SEPARATOR = "\x1f"


class Serializer:
    """Encodes values with kombu serializer ``name`` and decodes accepted content types.

    ``accept`` (default: only ``name``'s content type) lists serializer names or content types
    that entries may be decoded from. Unsafe serializers (pickle, yaml) may be used or accepted
    only with ``allow_unsafe=True``.
    """

    __slots__ = ("name", "content_type", "_encoding", "_encoder", "_decoders", "_header")

    def __init__(
        self, name: str = "json", *, accept: Iterable[str] | None = None, allow_unsafe: bool = False
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"serializer must be a kombu serializer name, got {name!r}")
        encoders: dict[str, tuple[str, str, Callable[[Any], Any]]] = registry._encoders
        if name not in encoders:
            raise ConfigurationError(
                f"serializer {name!r} is not registered with kombu "
                f"(registered: {', '.join(sorted(encoders))})"
            )
        wanted = [name] if accept is None else list(accept)
        for item in [name, *wanted]:
            if _serializer_name(item) in UNSAFE_SERIALIZERS and not allow_unsafe:
                raise ConfigurationError(
                    f"serializer {item!r} can run code while loading: anyone who can write to "
                    "Redis could run code in every process reading the cache. Pass "
                    "allow_unsafe=True only if you trust every writer of this Redis."
                )
        self.name = name
        self.content_type, self._encoding, self._encoder = encoders[name]
        self._header = self.content_type.encode() + b"\n"
        self._decoders: dict[bytes, Callable[[Any], Any]] = {}
        for item in wanted:
            content_type = registry.name_to_type.get(item, item)
            decoder = registry._decoders.get(content_type)
            if decoder is None:
                raise ConfigurationError(f"accept: no kombu decoder for {item!r}")
            if decoder is kombu_json.loads:
                decoder = _fast_json
            self._decoders[content_type.encode()] = decoder

    def dumps(self, value: Any, tags: Iterable[str] = ()) -> bytes:
        """The stored form of ``value`` with ``tags``; ``SerializationError`` if impossible."""
        try:
            payload = self._encoder(value)
        except Exception as exc:
            raise SerializationError(
                f"cannot serialize a {type(value).__module__}.{type(value).__qualname__} "
                f"with {self.name!r}: {exc}"
            ) from exc
        if isinstance(payload, str):
            payload = payload.encode(self._encoding if self._encoding != "binary" else "utf-8")
        body: bytes = payload
        return self._header + TAG_SEPARATOR.join(tags).encode() + b"\n" + body

    def loads(self, data: bytes) -> Any:
        """Decode a stored entry; ``SerializationError`` if malformed or not accepted."""
        content_type, _, rest = data.partition(b"\n")
        decoder = self._decoders.get(content_type)
        if decoder is None:
            raise SerializationError(
                f"refusing to decode a cache entry of content type {content_type[:60]!r}: "
                "not accepted by this provider's serializer"
            )
        payload = rest.partition(b"\n")[2]
        try:
            return decoder(payload)
        except Exception as exc:
            raise SerializationError(f"cannot decode a cache entry: {exc}") from exc


def _fast_json(payload: bytes) -> Any:
    """kombu's JSON decoding, without its per-object hook when it cannot apply.

    kombu's hook only rewrites objects ``{"__type__": ..., "__value__": ...}`` (its encoding of
    datetime, Decimal, UUID, bytes...). A payload that contains neither ``__type__`` nor a
    ``\\u`` escape (which could spell it) has no such object, so plain ``json.loads`` gives the
    same result, about twice as fast.
    """
    if b"__type__" in payload or b"\\u" in payload:
        return kombu_json.loads(payload)  # type: ignore[no-untyped-call]
    return _json_decode(payload.decode())


_json_decode = json.JSONDecoder().decode  # what json.loads(str) calls, minus its checks


def _serializer_name(item: str) -> str:
    for name, content_type in registry.name_to_type.items():
        if item == content_type:
            return str(name)
    return item


def entry_tags(data: bytes) -> list[str]:
    """The tags recorded in a stored entry."""
    tags = data.partition(b"\n")[2].partition(b"\n")[0]
    return tags.decode().split(TAG_SEPARATOR) if tags else []
