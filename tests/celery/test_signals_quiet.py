"""With nobody listening, the task never builds a signal's arguments (its own module: the
other signal tests keep receivers connected for their whole module)."""

from __future__ import annotations

from typing import Any

import pytest

from celery_rediskit.integration import RedisKit, observe

from .conftest import in_process_worker, make_app
from .test_signals import SIGNALS

WAIT = 20


def test_nothing_is_built_while_nobody_listens(redis_url: str, prefix: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """With no receivers, the task never reaches the code that builds a signal's arguments
    (each helper here would fail the task)."""
    for signal in SIGNALS.values():
        assert not signal.receivers, f"{signal.name} has receivers left by another test"

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a signal's arguments were built with no receiver")

    for helper in ("acquired", "released", "skipped", "requeued", "duplicate",
                   "cache_looked_up", "lost"):
        monkeypatch.setattr(observe, helper, refuse)
    app = make_app(redis_url, prefix)

    @app.task(shared=False, singleton=True, concurrency_limit="quiet:2", cache_ttl=60)
    def quiet(x: int) -> int:
        return x

    @app.task(shared=False, singleton=True, on_locked="skip")
    def skip_quietly() -> str:
        return "ran"

    try:
        with in_process_worker(app):
            assert quiet.delay(5).get(timeout=WAIT) == 5
            assert quiet.delay(5).get(timeout=WAIT) == 5  # a hit
            t = app.tasks[skip_quietly.name]
            name = t._rk_policy.singleton_name(t.name, {}, (), {})
            with RedisKit.of(app).runtime().mutex.acquire(name, blocking=False):
                assert skip_quietly.delay().get(timeout=WAIT) is None
    finally:
        app.close()


