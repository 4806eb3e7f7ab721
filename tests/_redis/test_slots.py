"""Hash slots: ``key_slot`` agrees with redis-py's, and ``slot_tag`` gives every slot a tag."""

from __future__ import annotations

import pytest
from redis.crc import key_slot as redis_key_slot

from celery_rediskit._redis.slots import SLOTS, key_slot, slot_tag


@pytest.mark.parametrize("key", ["a", "x:{b}:c", "{}a", "a{}b{c}", "{a", "p:lock:{cache/k}",
                                 "é{ü}", "}{x}"])
def test_key_slot_agrees_with_redis_py(key: str) -> None:
    assert key_slot(key) == redis_key_slot(key.encode())


def test_every_slot_has_a_short_printable_tag_hashing_to_it() -> None:
    tags = [slot_tag(slot) for slot in range(SLOTS)]
    assert all(redis_key_slot(f"p:cache:t:{{{t}}}:x".encode()) == s for s, t in enumerate(tags))
    assert all(len(t) == 4 and t.isprintable() and not set(t) & set("{}*?[]\\") for t in tags)
    with pytest.raises(ValueError):
        slot_tag(SLOTS)
