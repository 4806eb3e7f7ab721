"""Signals of the integration."""

from __future__ import annotations

from celery.utils.dispatch import Signal

__all__ = ["lease_lost"]

lease_lost = Signal(name="rediskit_lease_lost")
"""Sent from the renewer thread when a running task's lock or permit is found gone.

Handlers receive ``sender`` (the task), ``task_id``, ``lease`` (its ``lost_reason`` says why)
and ``reason``. The task also sees ``self.lease.lost`` turn True, and a warning is logged.
"""
