"""The app run by ``celery worker -P prefork`` subprocesses in the events and metrics tests.

The worker imports this module with ``RK_URL``/``RK_PREFIX`` (and ``RK_METRICS_PORT``) in
its environment; the test builds the same app (``build``) to send tasks and read results.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import redis
from celery import Celery

from celery_rediskit.integration import RedisKit


def build(url: str, prefix: str, **settings: Any) -> Celery:
    app = Celery(f"observe-{prefix}", broker=url, backend=url, set_as_current=False)
    app.conf.update(
        task_default_queue=f"q-{prefix}",
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=1,
        result_expires=600,
    )
    RedisKit(app, prefix=prefix, retry_delay=0.05, retry_delay_max=0.2, **settings)

    @app.task(shared=False, name="blocked", singleton=True, singleton_key=("key",))
    def blocked(key: str) -> int:
        return os.getpid()

    @app.task(shared=False, name="skippable", singleton=True, singleton_key=("key",),
              on_locked="skip")
    def skippable(key: str) -> int:
        return os.getpid()

    @app.task(shared=False, name="limited", concurrency_limit="tenant:{tenant}:2")
    def limited(tenant: str, i: int) -> int:
        return i

    @app.task(shared=False, name="parking", concurrency_limit="pslot:{key}:1",
              on_limited="park")
    def parking(key: str) -> int:
        return os.getpid()

    @app.task(shared=False, name="cached", cache_ttl=600)
    def cached(x: int) -> int:
        return x * x

    client = redis.Redis.from_url(url)

    @app.task(shared=False, name="hold", concurrency_limit="slot:{run}:3")
    def hold(run: str) -> int:
        """Holds its permit until ``<prefix>:go:<run>`` is pushed; says it started first."""
        client.rpush(f"{prefix}:started:{run}", os.getpid())
        client.blpop([f"{prefix}:go:{run}"], timeout=60)
        return os.getpid()

    return app


HERE = Path(__file__).parent


class WorkerProcess:
    """A ``celery -A observeapp worker -P prefork -E`` subprocess (stop it with ``stop``);
    its output goes to ``log``, shown by failing tests."""

    def __init__(self, url: str, prefix: str, log: Path, *, name: str = "w1",
                 concurrency: int = 2, metrics_port: int | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        env = dict(os.environ, RK_URL=url, RK_PREFIX=prefix, PYTHONPATH=str(HERE))
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if metrics_port is not None:
            env["RK_METRICS_PORT"] = str(metrics_port)
        self.log = log
        self._out: IO[bytes] = open(log, "ab")  # noqa: SIM115 (closed in stop)
        cmd = [sys.executable, "-m", "celery", "-A", "observeapp", "worker", "-P", "prefork",
               "-c", str(concurrency), "-n", f"{name}-{prefix}@%h", "-Q", f"q-{prefix}",
               "-E", "-l", "info", "--without-gossip", "--without-mingle",
               "--without-heartbeat", *extra]
        self.proc = subprocess.Popen(cmd, env=env, cwd=HERE, stdout=self._out,
                                     stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, app: Celery, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not app.control.ping(timeout=0.5):
            assert self.proc.poll() is None, f"the worker exited:\n{self.output()}"
            assert time.monotonic() < deadline, f"no answer to ping:\n{self.output()}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


if os.environ.get("RK_URL"):
    _port = os.environ.get("RK_METRICS_PORT")
    app = build(os.environ["RK_URL"], os.environ["RK_PREFIX"],
                **({"metrics_port": int(_port)} if _port else {}))
