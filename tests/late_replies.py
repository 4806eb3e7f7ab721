"""A real Redis connection whose replies reach the caller late: a link whose replies keep
coming late, or a caller paused as they arrive (for tests of how leases are dated)."""

from __future__ import annotations

import time
from typing import Any, ClassVar

import redis

__all__ = ["AnyLateReply", "LateReplies", "late_replies_client"]


class LateReplies(redis.Connection):
    """Hands every integer reply (an acquire script's) to the caller ``late`` seconds after
    it arrived, while ``LateReplies.late`` is set (class-wide: reset it to 0 after use)."""

    late: ClassVar[float] = 0.0
    delayed: ClassVar[tuple[type, ...]] = (int,)

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        reply = super().read_response(*args, **kwargs)
        if self.late and isinstance(reply, self.delayed):
            time.sleep(self.late)
        return reply


class AnyLateReply(LateReplies):
    """:class:`LateReplies` for every reply (lists too), on the same ``LateReplies.late``."""

    delayed = (object,)


def late_replies_client(url: str, connection_class: type[LateReplies] = LateReplies) -> redis.Redis:
    """A client of ``url`` whose connections are ``connection_class``."""
    pool = redis.ConnectionPool.from_url(url, connection_class=connection_class)
    return redis.Redis(connection_pool=pool)
