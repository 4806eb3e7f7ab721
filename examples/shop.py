"""A project's tasks, written with an app factory so tests can build the app on their own Redis
(``examples/test_example_tasks.py`` tests them with the plugin ``celery_rediskit.contrib.pytest``).

``create_app(settings)`` makes the Celery app from a settings dict and defines its tasks; the
production app would be ``create_app({"broker_url": ..., "result_backend": ...,
"rediskit_prefix": "shop"})``. The tasks call the slow outside world through module functions
(``fetch_account``, ``run_report_query``), which a test replaces to control timing.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from celery import Celery

from celery_rediskit.integration import RedisKit


def fetch_account(account_id: int) -> dict[str, Any]:
    """The CRM call a sync makes (slow, and it must not run twice at once per account)."""
    time.sleep(0.5)
    return {"id": account_id}


def run_report_query(day: int) -> int:
    """The database query a report runs (the database takes two of them at a time)."""
    time.sleep(0.5)
    return day


def create_app(settings: Mapping[str, Any]) -> Celery:
    """The app with RedisKit installed and the tasks ``shop.sync_account`` and
    ``shop.daily_report`` defined on it (``app.tasks[name]``)."""
    app = Celery("shop", set_as_current=False)
    app.conf.update(settings)
    RedisKit(app)  # before the tasks: it gives them the singleton/limit options

    @app.task(name="shop.sync_account", shared=False, singleton=True,
              singleton_key=("account_id",), on_locked="skip")
    def sync_account(account_id: int) -> str:
        """One sync per account at a time; a duplicate sent meanwhile is skipped (None)."""
        fetch_account(account_id)
        return f"synced {account_id}"

    @app.task(name="shop.daily_report", shared=False, concurrency_limit="db:2")
    def daily_report(day: int) -> int:
        """At most two at once across every worker; the others are re-queued meanwhile."""
        return run_report_query(day)

    return app
