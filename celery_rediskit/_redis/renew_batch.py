"""Renewing many Redis leases in one round trip: the ``renew_batch`` script."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._validate import to_ms
from ..lease import Lease
from .scripts import load_script

__all__ = ["renew_in_batches"]


def renew_in_batches(
    client: Any, leases: Sequence[Lease], items: list[tuple[str, str]]
) -> list[bool]:
    """Renew ``leases`` with one ``renew_batch`` script call; ``items`` gives (key, kind).

    On a Redis Cluster client, leases are grouped by hash slot (one call per slot), because
    a script may only touch keys of one slot.
    """
    script = load_script("renew_batch")
    groups: dict[Any, list[int]] = {}
    slot_of = getattr(client, "keyslot", None)
    for i, (key, _kind) in enumerate(items):
        groups.setdefault(slot_of(key) if slot_of else 0, []).append(i)
    results = [False] * len(leases)
    for indexes in groups.values():
        keys = [items[i][0] for i in indexes]
        args: list[Any] = []
        for i in indexes:
            args += [items[i][1], leases[i].owner, to_ms(leases[i].lease_seconds)]
        for i, ok in zip(indexes, script.run(client, keys, args), strict=True):
            results[i] = bool(ok)
    return results
