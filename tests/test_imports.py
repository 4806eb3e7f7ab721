"""Importing the Celery layer, and running a task with it, loads only what that task uses: the
cache (its serializers and providers), the lock reports and the CLI, and the wake-up hubs (a
listener thread per process) come in with the first use that needs them. Each check runs in a
fresh interpreter, so nothing imported by other tests counts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

NOT_FOR_A_PLAIN_TASK = (
    "celery_rediskit.cache",
    "celery_rediskit.report",
    "celery_rediskit.integration.cli",
    "celery_rediskit._redis.wakeup",
)

PROBE = """
import json, sys
from celery import Celery
import celery_rediskit.integration
from celery_rediskit.integration import RedisKit

app = Celery("probe", broker="memory://", set_as_current=False)
RedisKit(app, url=sys.argv[1], prefix=sys.argv[2])

@app.task(shared=False)
def plain(x):
    return x

@app.task(shared=False, singleton=True)
def single(x):
    return x

@app.task(shared=False, concurrency_limit="db:2")
def limited(x):
    return x

@app.task(shared=False, singleton=True, singleton_scope="queued")
def queued(x):
    return x

assert plain.apply((1,)).get() == 1
for name in sys.argv[3:]:
    assert globals()[name].apply((2,)).get() == 2
print(json.dumps(sorted(m for m in sys.modules if m.startswith("celery_rediskit"))))
"""


def _loaded(url: str, prefix: str, *tasks: str) -> list[str]:
    result = subprocess.run([sys.executable, "-c", PROBE, url, prefix, *tasks],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout.strip().splitlines()[-1]))


def _unwanted(loaded: list[str], names: tuple[str, ...]) -> list[str]:
    return [m for m in loaded if any(m == n or m.startswith(n + ".") for n in names)]


def test_the_celery_layer_and_a_plain_task_load_no_cache_reports_cli_or_wakeups() -> None:
    # A plain task never connects: the URL is never used.
    loaded = _loaded("redis://127.0.0.1:1/0", "probe")
    assert "celery_rediskit.integration.task" in loaded
    assert _unwanted(loaded, NOT_FOR_A_PLAIN_TASK) == []


@pytest.mark.parametrize("task", ["single", "limited", "queued"])
def test_an_uncontended_lock_or_permit_loads_no_cache_reports_cli_or_wakeups(
    redis_url: str, prefix: str, task: str
) -> None:
    loaded = _loaded(redis_url, prefix, task)
    assert "celery_rediskit.mutex.redis" in loaded
    assert _unwanted(loaded, NOT_FOR_A_PLAIN_TASK) == []


def test_the_cache_comes_with_its_first_use() -> None:
    code = ("import sys, celery_rediskit as r; assert 'celery_rediskit.cache' not in "
            "sys.modules; r.cached; assert 'celery_rediskit.cache' in sys.modules; "
            "from celery_rediskit import MISSING, RedisCacheProvider; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
