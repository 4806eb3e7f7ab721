"""Redis Cluster hash slots: the slot of a key, and a short hash tag for any slot.

A Lua script on a cluster may touch keys of one slot only, and a sharded pub/sub message
(``SPUBLISH``) goes to the shard serving its channel's slot. Bookkeeping that must change
together with a key (a cache entry's place in a tag index) or a message about it (a grant)
therefore lives under a hash tag of the key's slot. :func:`slot_tag` gives one: a 4-letter
text (``@`` and ``A``-``O``) whose CRC16 is the slot, so every key of a slot shares one tag
set or one wake-up channel per process, however many names map there.

It is found without search: Redis hashes with CRC16/XMODEM, which is linear over GF(2) for
messages of one length, so the tag is ``@@@@`` with some of the low four bits of its letters
flipped, the flips solved for once by Gaussian elimination.

Slot migration. While a slot moves between masters (``redis-cli --cluster reshard``), a
command naming several keys of it is answered ``TRYAGAIN`` when some of those keys have moved
and others have not, or are absent (a script's queue key, say, that exists only while someone
waits): the keys are split between two nodes. redis-py retries that for less than half a second
and then raises ``ClusterError("TTL exhausted.")``; a slot with many keys takes longer to move.
:func:`through_migration` keeps retrying such a command, with a short growing pause, for up to
``MIGRATION_WAIT`` seconds. It is safe: a command answered TRYAGAIN, MOVED or ASK did not run.
"""

from __future__ import annotations

import binascii
import logging
import time
from collections.abc import Callable
from functools import cache
from typing import Any

from redis.cluster import RedisCluster
from redis.exceptions import ClusterError, TryAgainError

__all__ = ["MIGRATION_WAIT", "SLOTS", "is_cluster", "key_slot", "slot_tag", "through_migration"]

log = logging.getLogger(__name__)

MIGRATION_WAIT = 10.0
"""Seconds a cluster command split by a slot migration (TRYAGAIN) keeps being retried."""

SLOTS = 16384
_MASK = SLOTS - 1
_LENGTH = 4
_BASE = b"@" * _LENGTH


def is_cluster(client: Any) -> bool:
    """True for a Redis Cluster client (``redis.cluster.RedisCluster``)."""
    return isinstance(client, RedisCluster)


def key_slot(key: str | bytes) -> int:
    """The hash slot of ``key``, as Redis Cluster computes it (CRC16 of its hash tag: the
    text between the first ``{`` and the next ``}``, when not empty; else the whole key)."""
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1:end]
    return binascii.crc_hqx(data, 0) & _MASK


def _crc(data: bytes) -> int:
    return binascii.crc_hqx(data, 0) & _MASK


@cache
def _basis() -> tuple[dict[int, tuple[int, int]], int]:
    # One vector per (letter, bit) flip: the CRC of that flip alone. Row-reduced so that each
    # kept vector has a distinct highest bit (its pivot); ``combo`` records which flips make it.
    basis: dict[int, tuple[int, int]] = {}
    for index in range(_LENGTH * 4):
        flip = bytearray(_LENGTH)
        flip[index // 4] = 1 << (index % 4)
        vector, combo = _crc(bytes(flip)), 1 << index
        for pivot in sorted(basis, reverse=True):
            if vector >> pivot & 1:
                vector ^= basis[pivot][0]
                combo ^= basis[pivot][1]
        if vector:
            basis[vector.bit_length() - 1] = (vector, combo)
    if len(basis) != 14:  # pragma: no cover - a property of CRC16, checked by the tests
        raise RuntimeError("slot tags: the flips do not span every slot")
    return basis, _crc(_BASE)


@cache
def slot_tag(slot: int) -> str:
    """A hash tag (without braces) whose keys land in ``slot`` (0 to 16383)."""
    if not 0 <= slot < SLOTS:
        raise ValueError(f"slot must be 0..{SLOTS - 1}, got {slot}")
    basis, base = _basis()
    target, combo = slot ^ base, 0
    for pivot in sorted(basis, reverse=True):
        if target >> pivot & 1:
            target ^= basis[pivot][0]
            combo ^= basis[pivot][1]
    tag = bytearray(_BASE)
    for index in range(_LENGTH * 4):
        if combo >> index & 1:
            tag[index // 4] ^= 1 << (index % 4)
    return tag.decode()


def _split_by_migration(exc: BaseException) -> bool:
    # redis-py's own retries gave up: on repeated TRYAGAIN (or MOVED/ASK while slots move) it
    # raises a bare ClusterError naming its exhausted TTL.
    return isinstance(exc, TryAgainError) or (
        type(exc) is ClusterError and "TTL exhausted" in str(exc)
    )


def through_migration(send: Callable[[], Any]) -> Any:
    """``send()`` (a cluster client's command), retried for up to ``MIGRATION_WAIT`` seconds
    while a slot migration splits the command's keys."""
    try:
        return send()
    except (TryAgainError, ClusterError) as exc:
        if not _split_by_migration(exc):
            raise
        log.info("rediskit: a command met a slot migration (%s); retrying for up to %.0f s",
                 exc, MIGRATION_WAIT)
    end = time.monotonic() + MIGRATION_WAIT
    pause = 0.01
    while True:
        time.sleep(min(pause, max(0.0, end - time.monotonic())))  # nothing to wait on: the
        pause = min(pause * 2, 0.2)  # migration is another client's work
        try:
            return send()
        except (TryAgainError, ClusterError) as exc:
            if not _split_by_migration(exc) or time.monotonic() >= end:
                raise
