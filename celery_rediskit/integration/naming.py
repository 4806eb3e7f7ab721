"""Declared names: the bounded name of a resource, for signals and metric labels.

A task's resource keys are made per call (``tenant:42``, ``singleton:app.sync:<digest>``);
its declared name is the same for every call: the ``concurrency_limit`` or
``global_rate_limit`` template (``tenant:{tenant_id}``), ``singleton:<task name>`` for a
singleton lock, and ``queued:singleton:<task name>`` for a queued-scope claim. Labelling
metrics by declared name keeps their cardinality bounded by the code, never by the data
(tenants, users).
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable
from functools import cache
from typing import Any

from ..lease import LeaseKind

__all__ = ["OTHER", "NameMatcher", "declared_name", "templates_of"]

OTHER = "(other)"
"""The declared name of a key that no known template produced (a lock or semaphore used
directly, or a task this process does not know): one label for all of them."""

# singleton:<task>:<digest>, queued:singleton:<task>:<digest>, cache/task:<task>:<digest>
# (options.py: TaskPolicy.singleton_name / cache_name; keys.py: cache_lock_name)
_DERIVED = re.compile(r"^((?:queued:)?singleton:.+|cache/task:.+):[0-9a-f]{32}$")


@cache
def _pattern(template: str) -> re.Pattern[str] | None:
    """A regex matching every key ``template`` makes (None for a name without fields)."""
    parts: list[str] = []
    fields = False
    for text, field, _spec, _conv in string.Formatter().parse(template):
        parts.append(re.escape(text))
        if field is not None:
            parts.append(".*?")
            fields = True
    return re.compile("".join(parts) + r"\Z", re.S) if fields else None


class NameMatcher:
    """Finds the declared name of a resource key among known ``concurrency_limit``
    templates (names without fields match themselves); derived lock names (singleton locks,
    queued claims, the cache's locks) lose their per-call digest. Anything else is
    :data:`OTHER`."""

    def __init__(self, templates: Iterable[str] = ()) -> None:
        names = set(templates)
        self.fixed = {t for t in names if _pattern(t) is None}
        # Most literal text first: 'tenant:{id}:db' is tried before '{anything}'.
        self.templates = sorted((t for t in names if _pattern(t) is not None),
                                key=lambda t: (-len(re.sub(r"\{[^}]*\}", "", t)), t))

    def __call__(self, kind: LeaseKind | str, key: str) -> str:
        derived = _DERIVED.match(key)
        if derived is not None:
            return derived.group(1)
        if key in self.fixed:
            return key
        for template in self.templates:
            pattern = _pattern(template)
            if pattern is not None and pattern.match(key):
                return template
        return OTHER


def declared_name(task: Any, kind: LeaseKind | str, key: str) -> str:
    """The declared name of resource ``key`` taken by ``task`` (its policy's templates)."""
    policy = getattr(task, "_rk_policy", None)
    specs = (*getattr(policy, "limits", ()), *getattr(policy, "rate_limits", ()))
    return _matcher(specs)(kind, key)


@cache
def _matcher(limits: tuple[Any, ...]) -> NameMatcher:
    return NameMatcher(spec.template for spec in limits)


def templates_of(app: Any) -> set[str]:
    """Every ``concurrency_limit`` name or template declared by the tasks of ``app``."""
    found: set[str] = set()
    for task in list(app.tasks.values()):
        policy = getattr(task, "_rk_policy", None)
        for spec in getattr(policy, "limits", ()):
            found.add(spec.template)
    return found
