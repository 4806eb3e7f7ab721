"""The testing kit's pytest plugin, opted into with
``pytest_plugins = ["celery_rediskit.contrib.pytest"]``.

The fixtures live in the Celery layer (:mod:`celery_rediskit.integration.pytest_plugin`,
the only layer that imports Celery); this module is the stable name to opt in with.
"""

from __future__ import annotations

from ..integration.pytest_plugin import *  # noqa: F403
from ..integration.pytest_plugin import __all__ as __all__
