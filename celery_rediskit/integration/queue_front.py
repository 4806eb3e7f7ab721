"""Re-sent parked messages go to the front of their queue, on a Redis broker.

A parked task's lock or permit is reserved for it while its re-sent message travels, so the
resource idles until that message is consumed. Published the usual way, the message joins the
back of its queue, behind every task sent since (during a burst of sends: hundreds, each of
which a worker must receive and park first). It was sent before all of them, so it goes to
the front instead: right after the publish, one script on the broker moves it there
(``lua/queue_front.lua``).

Only kombu's Redis transport (``redis://``, ``rediss://``, ``sentinel://`` brokers), for the
queue the message names (``queue``, else its routing key: Celery re-sends to the queue it
came from). Elsewhere (RabbitMQ) the message keeps the usual place at the back: later, never
lost. A failure to move it is logged and ignored.
"""

from __future__ import annotations

import logging
from typing import Any

from .._redis.scripts import load_script

__all__ = ["SEARCH_DEPTH", "to_front"]

log = logging.getLogger("celery_rediskit")

SEARCH_DEPTH = 64
"""How many of the newest messages of the queue are searched for the one to move."""

_SCRIPT = load_script("queue_front")


def to_front(producer: Any, options: dict[str, Any], marker: str) -> bool:
    """Move the message just published with ``producer`` (with the signature's ``options``:
    queue or routing key, priority) holding ``marker`` to the front of its Redis queue. True
    when moved; False on another transport, or when it was not found (consumed already)."""
    if getattr(getattr(producer.connection, "transport", None), "driver_type", "") != "redis":
        return False
    queue = options.get("queue") or options.get("routing_key")
    queue = getattr(queue, "name", queue)  # a kombu Queue, or its name
    if not queue:
        return False
    try:
        channel = producer.channel
        priority = channel.priority(options.get("priority") or 0)
        key = channel._q_for_pri(queue, priority)
        return bool(_SCRIPT.run(channel.client, [key], [marker, SEARCH_DEPTH]))
    except Exception:
        log.warning("rediskit: moving a re-sent message to the front of its queue failed "
                    "(it stays at the back)", exc_info=True)
        return False
