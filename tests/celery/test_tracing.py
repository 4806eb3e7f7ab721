"""``rediskit_trace_commands``: a task's acquire and release scripts go through the client's
``execute_command`` and pipelines (where OpenTelemetry's redis instrumentation sees them)."""

from __future__ import annotations

import pytest

from celery_rediskit.errors import ConfigurationError

from ..tracing_client import Recording
from .conftest import in_process_worker, make_app

WAIT = 20


@pytest.mark.parametrize("traced", [True, False])
def test_task_scripts_go_through_the_client(redis_url: str, prefix: str,
                                            traced: bool) -> None:
    client = Recording.from_url(redis_url)
    app = make_app(redis_url, prefix, client=client, trace_commands=traced)

    @app.task(shared=False, singleton=True, concurrency_limit="db:2")
    def job(x: int) -> int:
        return x

    try:
        with in_process_worker(app):
            assert job.delay(3).get(timeout=WAIT) == 3
    finally:
        app.close()
        client.close()
    seen = client.scripts_seen()
    if not traced:
        assert seen == set()
        return
    # the lock is tried with the task's claims record inside its script (fused.py), the
    # permit apart; at the end both are released in one pipeline, the last release deleting
    # the record
    assert {("execute_command", "claims_mutex_acquire"),
            ("execute_command", "sem_acquire")} <= seen
    assert {("pipeline", "sem_release"), ("pipeline", "claims_mutex_release")} <= seen


def test_trace_commands_setting_is_a_flag(redis_url: str, prefix: str) -> None:
    app = make_app(redis_url, prefix, trace_commands="yes")
    assert app._rediskit.settings.trace_commands is True
    app.close()
    with pytest.raises(ConfigurationError, match="rediskit_trace_commands must be True or False"):
        make_app(redis_url, prefix + "x", trace_commands="maybe")
