"""Parked entries of locks and semaphores: wait in Redis, not in a process or a queue.

See :mod:`.base` for the model (turns, reservations, dispatch and adoption) and :mod:`.redis`
for the keys. Nothing here knows Celery: the Celery layer parks task messages with it
(``on_locked="park"``, ``on_limited="park"``).
"""

from .base import (
    AHEAD_LEFT,
    DUPLICATE,
    FREE,
    GRANTED,
    NEED_PAYLOAD,
    PARKED,
    Dispatch,
    ParkedEntry,
    ParkingStore,
    ParkOutcome,
    reservation_owner,
)
from .redis import PUBLISH_DEADLINE, RedisParkingStore

__all__ = [
    "AHEAD_LEFT",
    "DUPLICATE",
    "FREE",
    "GRANTED",
    "NEED_PAYLOAD",
    "PARKED",
    "PUBLISH_DEADLINE",
    "Dispatch",
    "ParkOutcome",
    "ParkedEntry",
    "ParkingStore",
    "RedisParkingStore",
    "reservation_owner",
]
