from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.primitives.processes import Holder


@pytest.fixture
def spawn_holder() -> Iterator[type[Holder]]:
    """Start holder processes; each is killed at the end of the test."""
    made: list[Holder] = []

    class Tracked(Holder):
        def __init__(self, *args: str) -> None:
            super().__init__(*args)
            made.append(self)

    yield Tracked
    for holder in made:
        holder.close()
