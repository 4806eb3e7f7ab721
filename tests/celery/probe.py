"""Observing task bodies from the outside, through Redis (works across processes)."""

from __future__ import annotations

from typing import Any

_ENTER = """
local n = redis.call('INCR', KEYS[1])
redis.call('INCR', KEYS[3])
local m = tonumber(redis.call('GET', KEYS[2]) or '0')
if n > m then redis.call('SET', KEYS[2], n) end
return n
"""


class Probe:
    """Counts bodies running now (``current``), the most at once (``peak``) and runs (``runs``)."""

    def __init__(self, client: Any, name: str) -> None:
        self.client = client
        self.keys = [f"{name}:now", f"{name}:peak", f"{name}:runs"]

    def enter(self) -> int:
        return int(self.client.eval(_ENTER, 3, *self.keys))

    def exit(self) -> None:
        self.client.decr(self.keys[0])

    def _get(self, i: int) -> int:
        return int(self.client.get(self.keys[i]) or 0)

    @property
    def current(self) -> int:
        return self._get(0)

    @property
    def peak(self) -> int:
        return self._get(1)

    @property
    def runs(self) -> int:
        return self._get(2)
