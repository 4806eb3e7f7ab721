"""Opt in to the rediskit pytest plugin, as a project's top conftest.py would."""

pytest_plugins = ["celery_rediskit.contrib.pytest"]
