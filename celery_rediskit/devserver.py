"""The former name of :mod:`celery_rediskit.testing`, kept so old imports keep working.

Import from ``celery_rediskit.testing``: this module only re-exports its names.
"""

from __future__ import annotations

from .testing import (
    SLOTS,
    NodeServer,
    PrivateCluster,
    PrivateServer,
    SessionServer,
    find_server_binary,
    free_cluster_port,
    free_port,
    session_server,
)

__all__ = [
    "SLOTS",
    "NodeServer",
    "PrivateCluster",
    "PrivateServer",
    "SessionServer",
    "find_server_binary",
    "free_cluster_port",
    "free_port",
    "session_server",
]
