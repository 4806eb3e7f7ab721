"""Task options of the integration: parsed and checked once, when the task is defined.

``parse_policy(options, fun, bound)`` turns the raw options (``singleton``, ``singleton_key``,
``singleton_scope``, ``on_locked``, ``concurrency_limit``, ``on_limited``, ``limit_timeout``,
``global_rate_limit``, ``global_rate_burst``, ``on_rate_limited``, ``cache_ttl``, ``cache_key``,
``cache_tags``) into a :class:`TaskPolicy`, or raises
``ConfigurationError`` naming the option and the accepted form.

Keys are computed from the *bound* arguments (defaults applied), canonicalised so that the
caller's values and the worker's JSON-decoded values give the same key: tuples and lists are
the same, UUIDs and datetimes are their text, dict keys are sorted.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import hashlib
import inspect
import json
import math
import re
import string
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache, cached_property
from typing import Any

from .._validate import resource_key
from ..durations import parse_duration
from ..errors import ConfigurationError
from ..ratelimit import RATE_FORM, Rate, parse_rate

__all__ = [
    "OPTION_NAMES",
    "LimitSpec",
    "RateLimitSpec",
    "TaskPolicy",
    "canonical",
    "digest",
    "parse_policy",
]

OPTION_NAMES = (
    "singleton", "singleton_key", "singleton_scope", "on_locked",
    "concurrency_limit", "on_limited", "limit_timeout",
    "global_rate_limit", "global_rate_burst", "on_rate_limited",
    "cache_ttl", "cache_key", "cache_tags",
)
SCOPES = ("running", "queued")
ON_LOCKED = ("retry", "skip", "raise", "park")
ON_LIMITED = ("retry", "wait", "park")
ON_RATE_LIMITED = ("retry", "wait")


def canonical(value: Any) -> Any:
    """``value`` as plain JSON data that is the same before and after a trip through a broker."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if type(value) is dict:  # the bound arguments: before the (slower) ABC check below
        return {str(k): canonical(v) for k, v in value.items()}
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): canonical(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        items = [canonical(v) for v in value]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    raise ConfigurationError(
        f"cannot build a key from a value of type {type(value).__name__} (its text may "
        f"differ between processes): pass singleton_key= / cache_key= naming other "
        f"arguments, or a callable returning plain data"
    )


# json.dumps with these options builds an encoder per call: one, made once, encodes the same.
_KEY_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


# Values that canonical() keeps as they are (exact types: a subclass takes the long way).
_PLAIN = frozenset({str, int, bool, type(None)})


def digest(value: Any) -> str:
    """A short stable hash of ``canonical(value)``."""
    if not _is_plain(value):
        value = canonical(value)
    text = _KEY_JSON.encode(value)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _is_plain(value: Any) -> bool:
    """Whether ``canonical(value)`` is ``value`` itself, as JSON: arguments bound by name
    whose values are text, integers, booleans or None (the common key), checked without
    copying them."""
    return type(value) is dict and all(
        type(k) is str and type(v) in _PLAIN for k, v in value.items())


def safe_name(text: str) -> str:
    """``text`` usable inside a lock key: braces (the Cluster hash tag) become parentheses."""
    return text.replace("{", "(").replace("}", ")") or "_"


@cache
def _singleton_prefix(task_name: str) -> str:
    """The part of a singleton lock's name that is the same for every call of the task."""
    return f"singleton:{safe_name(task_name)}:"


def _template_fields(option: str, template: str) -> tuple[str, ...]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigurationError(f"{option}: bad template {template!r}: {exc}") from None
    names = []
    for _text, field, _spec, _conv in parsed:
        if field is None:
            continue
        base = re.split(r"[.\[]", field, maxsplit=1)[0]
        if not base or base.isdigit():
            raise ConfigurationError(
                f"{option}: template {template!r} must name arguments, like '{{tenant_id}}'"
            )
        names.append(base)
    return tuple(names)


@dataclass(frozen=True)
class LimitSpec:
    """One ``concurrency_limit`` entry: semaphore name (maybe a template) and permits."""

    template: str
    permits: int
    fields: tuple[str, ...]

    def name(self, arguments: Mapping[str, Any]) -> str:
        if not self.fields:
            return self.template
        return safe_name(self.template.format_map(arguments))


def _parse_limit(value: Any) -> LimitSpec:
    form = "'name:permits' with permits an integer >= 1, e.g. 'db:5' or 'tenant:{tenant_id}:2'"
    if not isinstance(value, str) or ":" not in value:
        raise ConfigurationError(f"concurrency_limit must be {form}, got {value!r}")
    name, _, permits_text = value.rpartition(":")
    if not name or not permits_text.strip().isdigit() or int(permits_text) < 1:
        raise ConfigurationError(f"concurrency_limit must be {form}, got {value!r}")
    return LimitSpec(name, int(permits_text), _template_fields("concurrency_limit", name))


@dataclass(frozen=True)
class RateLimitSpec:
    """One ``global_rate_limit`` entry: the limiter's name (maybe a template) and its rate."""

    template: str
    rate: Rate
    fields: tuple[str, ...]

    def name(self, arguments: Mapping[str, Any]) -> str:
        if not self.fields:
            return self.template
        return safe_name(self.template.format_map(arguments))


_RATE_LIMIT_FORM = (f"'name:rate' with rate {RATE_FORM}, e.g. 'api:100/m' or "
                    f"'tenant:{{tenant_id}}:10/s'")


def _parse_rate_limit(value: Any) -> RateLimitSpec:
    if not isinstance(value, str) or ":" not in value:
        raise ConfigurationError(f"global_rate_limit must be {_RATE_LIMIT_FORM}, got {value!r}")
    name, _, rate_text = value.rpartition(":")
    try:
        rate = parse_rate(rate_text)
    except ConfigurationError:
        rate = None
    if not name or rate is None:
        raise ConfigurationError(f"global_rate_limit must be {_RATE_LIMIT_FORM}, got {value!r}")
    fields = _template_fields("global_rate_limit", name)
    if not fields:
        try:
            resource_key(name)
        except ConfigurationError as exc:
            raise ConfigurationError(f"global_rate_limit: the limiter's name: {exc}") from None
    return RateLimitSpec(name, rate, fields)


@dataclass(frozen=True)
class TaskPolicy:
    """What the integration does around one task. ``active`` is False for a plain task."""

    singleton: bool = False
    singleton_key: tuple[str, ...] | Callable[..., Any] | None = None
    scope: str = "running"
    on_locked: str = "retry"
    limits: tuple[LimitSpec, ...] = ()
    on_limited: str = "retry"
    limit_timeout: float | None = None
    rate_limits: tuple[RateLimitSpec, ...] = ()
    rate_burst: int = 1
    on_rate_limited: str = "retry"
    cache_ttl: float | None = None
    cache_key: tuple[str, ...] | Callable[..., Any] | None = None
    cache_tags: tuple[str, ...] = ()
    signature: inspect.Signature | None = None

    def __post_init__(self) -> None:
        # Per-call work done once here: how to bind arguments, the limits' names when they
        # have no template (the common case).
        setattr_ = object.__setattr__
        setattr_(self, "_binder", _fast_binder(self.signature))
        fixed = None
        if not any(spec.fields for spec in self.limits):
            fixed = sorted({(spec.template, spec.permits) for spec in self.limits})
        setattr_(self, "_fixed_limits", fixed)
        rates = None
        if not any(spec.fields for spec in self.rate_limits):
            rates = _unique_rates((spec.template, spec.rate) for spec in self.rate_limits)
        setattr_(self, "_fixed_rates", rates)

    # Read several times per run: worked out on first use, then an attribute of the instance
    # (the fields they read are frozen).
    @cached_property
    def parks(self) -> bool:
        """True when a held lock or a full limit parks the task (``"park"``)."""
        return self.on_locked == "park" or self.on_limited == "park"

    @cached_property
    def active(self) -> bool:
        return (self.singleton or bool(self.limits) or bool(self.rate_limits)
                or self.cache_ttl is not None)

    def bind(self, args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
        """The call's arguments by parameter name, defaults applied."""
        args = tuple(args or ())
        kwargs = dict(kwargs or {})
        if self.signature is None:
            return {"args": list(args), "kwargs": kwargs}
        binder: _Binder | None = self.__dict__["_binder"]
        if binder is not None:
            bound_fast = binder(args, kwargs)
            if bound_fast is not None:
                return bound_fast
        bound = self.signature.bind(*args, **kwargs)  # the slow path; raises TypeError
        bound.apply_defaults()
        return dict(bound.arguments)

    def _key_data(self, spec: Any, arguments: Mapping[str, Any], args: Sequence[Any],
                  kwargs: Mapping[str, Any]) -> Any:
        if spec is None:
            return arguments
        if callable(spec):
            return spec(*args, **kwargs)
        return [arguments.get(name) for name in spec]

    def singleton_name(self, task_name: str, arguments: Mapping[str, Any],
                       args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        data = self._key_data(self.singleton_key, arguments, args, kwargs)
        return f"{_singleton_prefix(task_name)}{digest(data)}"

    def cache_name(self, task_name: str, arguments: Mapping[str, Any],
                   args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        """The cache entry of this call's result: by ``cache_key`` (default: every argument)."""
        data = canonical(self._key_data(self.cache_key, arguments, args, kwargs))
        return f"task:{safe_name(task_name)}:{digest(data)}"

    def limit_names(self, arguments: Mapping[str, Any]) -> list[tuple[str, int]]:
        """(semaphore name, permits) of every limit, sorted by name: the order of acquisition,
        the same in every process, so combined limits cannot deadlock."""
        fixed: list[tuple[str, int]] | None = self.__dict__["_fixed_limits"]
        if fixed is not None:
            return fixed
        return sorted({(spec.name(arguments), spec.permits) for spec in self.limits})

    def rate_names(self, arguments: Mapping[str, Any]) -> list[tuple[str, Rate]]:
        """(limiter name, rate) of every global rate limit, sorted by name; a name listed
        twice keeps its slowest rate."""
        fixed: list[tuple[str, Rate]] | None = self.__dict__["_fixed_rates"]
        if fixed is not None:
            return fixed
        return _unique_rates((spec.name(arguments), spec.rate) for spec in self.rate_limits)

    def tags(self, arguments: Mapping[str, Any]) -> list[str]:
        return [safe_name(t.format_map(arguments)) for t in self.cache_tags]


def _unique_rates(pairs: Any) -> list[tuple[str, Rate]]:
    slowest: dict[str, Rate] = {}
    for name, rate in pairs:
        if name not in slowest or rate.interval > slowest[name].interval:
            slowest[name] = rate
    return sorted(slowest.items(), key=lambda item: item[0])


_Binder = Callable[[tuple[Any, ...], dict[str, Any]], "dict[str, Any] | None"]
_POSITIONAL_OR_KEYWORD = inspect.Parameter.POSITIONAL_OR_KEYWORD
_KEYWORD_ONLY = inspect.Parameter.KEYWORD_ONLY


def _fast_binder(sig: inspect.Signature | None) -> _Binder | None:
    """A binder equivalent to ``sig.bind(...).apply_defaults()`` for signatures made only of
    ordinary and keyword-only parameters (no ``*args``/``**kwargs``/positional-only). It
    returns None for any call it would have to reject, so ``Signature.bind`` reports it."""
    if sig is None:
        return None
    params = list(sig.parameters.values())
    if any(p.kind not in (_POSITIONAL_OR_KEYWORD, _KEYWORD_ONLY) for p in params):
        return None
    names = tuple(p.name for p in params)
    positional = sum(1 for p in params if p.kind is _POSITIONAL_OR_KEYWORD)
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    missing = object()

    def bind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
        n = len(args)
        if n > positional:
            return None
        out = dict(zip(names, args, strict=False))
        used = 0
        for name in names[n:]:
            value = kwargs.get(name, missing)
            if value is missing:
                value = defaults.get(name, missing)
                if value is missing:
                    return None  # a required argument is missing
            else:
                used += 1
            out[name] = value
        if used != len(kwargs):
            return None  # an unknown keyword, or one given positionally too
        return out

    return bind


def _key_spec(option: str, value: Any) -> tuple[str, ...] | Callable[..., Any] | None:
    if value is None:
        return None
    if callable(value):
        fn: Callable[..., Any] = value
        return fn
    if isinstance(value, str):
        value = (value,)
    if isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigurationError(
        f"{option} must be a tuple of argument names, e.g. ('user_id',) (() for one key per "
        f"task), or a callable taking the task's arguments, got {value!r}"
    )


def _choice(option: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigurationError(
            f"{option} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}"
        )
    return str(value)


def task_signature(fun: Callable[..., Any] | None, bound: bool) -> inspect.Signature | None:
    """The signature of the task body as callers see it (without ``self`` for bound tasks)."""
    if fun is None:
        return None
    try:
        sig = inspect.signature(fun)
    except (TypeError, ValueError):
        return None
    params = list(sig.parameters.values())
    if bound and params:
        params = params[1:]
    return sig.replace(parameters=params)


def _check_names(option: str, names: Sequence[str], sig: inspect.Signature | None,
                 accepted: str) -> None:
    if sig is None:
        return
    params = sig.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    for name in names:
        if name not in params:
            raise ConfigurationError(
                f"{option} names argument {name!r}, which the task does not take "
                f"(its arguments: {', '.join(params) or 'none'}); {accepted}"
            )


def parse_policy(options: Mapping[str, Any], fun: Callable[..., Any] | None,
                 bound: bool) -> TaskPolicy:
    """Check ``options`` against the task body ``fun`` and build the task's policy."""
    sig = task_signature(fun, bound)
    singleton = options.get("singleton", False)
    if not isinstance(singleton, bool):
        raise ConfigurationError(f"singleton must be True or False, got {singleton!r}")
    skey = _key_spec("singleton_key", options.get("singleton_key"))
    if isinstance(skey, tuple):
        _check_names("singleton_key", skey, sig, "use a tuple of argument names")
    scope = _choice("singleton_scope", options.get("singleton_scope", "running"), SCOPES)
    on_locked = _choice("on_locked", options.get("on_locked", "retry"), ON_LOCKED)

    raw = options.get("concurrency_limit")
    if raw is None:
        specs: tuple[LimitSpec, ...] = ()
    elif isinstance(raw, str):
        specs = (_parse_limit(raw),)
    elif isinstance(raw, (list, tuple)) and raw:
        specs = tuple(_parse_limit(v) for v in raw)
    else:
        raise ConfigurationError(
            f"concurrency_limit must be 'name:permits' (e.g. 'db:5') or a list of them, "
            f"got {raw!r}"
        )
    for spec in specs:
        _check_names("concurrency_limit", spec.fields, sig,
                     "a template may only name the task's arguments, e.g. 'tenant:{tenant_id}:2'")
    on_limited = _choice("on_limited", options.get("on_limited", "retry"), ON_LIMITED)
    lt = options.get("limit_timeout")
    limit_timeout = None if lt is None else parse_duration(lt, "limit_timeout")

    raw_rates = options.get("global_rate_limit")
    if raw_rates is None:
        rate_specs: tuple[RateLimitSpec, ...] = ()
    elif isinstance(raw_rates, str):
        rate_specs = (_parse_rate_limit(raw_rates),)
    elif isinstance(raw_rates, (list, tuple)) and raw_rates:
        rate_specs = tuple(_parse_rate_limit(v) for v in raw_rates)
    else:
        raise ConfigurationError(
            f"global_rate_limit must be {_RATE_LIMIT_FORM}, or a list of them, got {raw_rates!r}"
        )
    for rspec in rate_specs:
        _check_names("global_rate_limit", rspec.fields, sig,
                     "a template may only name the task's arguments, e.g. "
                     "'tenant:{tenant_id}:10/s'")
    burst = options.get("global_rate_burst", 1)
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
        raise ConfigurationError(
            f"global_rate_burst must be an integer of at least 1 (how many starts may pass at "
            f"once after an idle period, for each of the task's global_rate_limit), got "
            f"{burst!r}"
        )
    if "global_rate_burst" in options and not rate_specs:
        raise ConfigurationError("global_rate_burst needs global_rate_limit (e.g. 'api:100/m')")
    on_rate_limited = _choice("on_rate_limited", options.get("on_rate_limited", "retry"),
                              ON_RATE_LIMITED)

    ttl = options.get("cache_ttl")
    cache_ttl = None if ttl is None else parse_duration(ttl, "cache_ttl")
    ckey = _key_spec("cache_key", options.get("cache_key"))
    if isinstance(ckey, tuple):
        _check_names("cache_key", ckey, sig, "use a tuple of argument names")
    raw_tags = options.get("cache_tags") or ()
    if isinstance(raw_tags, str):
        raw_tags = (raw_tags,)
    if not isinstance(raw_tags, (list, tuple)) or not all(isinstance(t, str) for t in raw_tags):
        raise ConfigurationError(
            f"cache_tags must be a list of texts (templates like 'user:{{user_id}}' allowed), "
            f"got {raw_tags!r}"
        )
    for tag in raw_tags:
        _check_names("cache_tags", _template_fields("cache_tags", tag), sig,
                     "a tag template may only name the task's arguments")
    if (ckey is not None or raw_tags) and cache_ttl is None:
        raise ConfigurationError("cache_key and cache_tags need cache_ttl (e.g. cache_ttl='5m')")
    return TaskPolicy(
        singleton=singleton, singleton_key=skey, scope=scope, on_locked=on_locked,
        limits=specs, on_limited=on_limited, limit_timeout=limit_timeout,
        rate_limits=rate_specs, rate_burst=burst, on_rate_limited=on_rate_limited,
        cache_ttl=cache_ttl, cache_key=ckey, cache_tags=tuple(raw_tags), signature=sig,
    )
