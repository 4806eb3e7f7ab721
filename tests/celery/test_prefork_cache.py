"""A real ``celery worker -P prefork`` whose main process met a cache outage before forking
its pool: once the cache's Redis is back, the children use the cache again (issue 10,
item 11). Before, each child inherited the open breaker without its probe thread and
skipped the cache for good.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import redis

from celery_rediskit.devserver import PrivateServer

from .cacheworker import build

HERE = Path(__file__).parent
WAIT = 60.0  # seconds: worker start-up and results, generous for a loaded machine
REPROBE = 20.0  # seconds a child may take to see the cache's Redis back (cooldown 0.2 s)


def test_prefork_children_use_the_cache_again_after_an_outage_met_before_the_fork(
    redis_url: str, private_server: PrivateServer
) -> None:
    prefix = f"rkc-{uuid.uuid4().hex[:8]}"
    private_server.stop()  # the cache's Redis is down when the worker starts
    env = dict(os.environ, RK_URL=redis_url, RK_CACHE_URL=private_server.url,
               RK_PREFIX=prefix, PYTHONPATH=str(HERE))
    cmd = [sys.executable, "-m", "celery", "-A", "cacheworker", "worker", "-P", "prefork",
           "-c", "2", "-n", f"cache-{prefix}@%h", "-Q", f"q-{prefix}", "-l", "warning",
           "--without-gossip", "--without-mingle", "--without-heartbeat"]
    proc = subprocess.Popen(cmd, env=env, cwd=HERE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    app = build(redis_url, private_server.url, prefix)
    broker = redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + WAIT
        while not app.control.ping(timeout=0.5):  # the pool has forked once this answers
            assert proc.poll() is None, "the worker exited at start"
            assert time.monotonic() < deadline, "the worker did not answer ping"
        # The scenario: the main process's breaker was open when the children were forked.
        assert broker.get(f"{prefix}:main-breaker-open") == b"1"
        private_server.start()
        run = uuid.uuid4().hex
        state = app.tasks["cache_state"].delay(run, REPROBE).get(timeout=WAIT)
        assert state["pid"] != proc.pid  # ran in a pool child
        assert {k: state[k] for k in ("closed", "value", "stored")} == {
            "closed": True, "value": {"run": run}, "stored": {"run": run},
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        app.close()
        broker.close()
