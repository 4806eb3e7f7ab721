"""The startup section: import time of the package and of its Celery layer, and the resident
memory a worker process gains.

Import times: each measured in a fresh interpreter (``time.perf_counter`` around the import),
``REPEATS`` times in rotating order, medians: ``celery`` alone, ``celery_rediskit`` (the
primitives; the cache comes with its first use), ``celery_rediskit.integration`` (which
imports celery), and the integration with celery already imported (what it adds).

Memory: a fresh interpreter builds a Celery app and reads its resident set (VmRSS) at each
step: the app (celery imported), then ``RedisKit(app)`` installed with tasks of every option,
then after ``TASKS`` runs of a ``singleton=True`` task and of a ``concurrency_limit`` task
through Celery's worker tracer (what a pool process does per message: the Redis client, the
scripts, the renewer's threads), then after ``TASKS`` runs of a ``cache_ttl`` task (the cache
loaded). The same script without the integration gives the baseline of plain tasks.

Targets: none (information), but the import of the Celery layer must not load the cache,
the reports, the CLI or the wake-up hubs (``tests/test_imports.py`` checks it).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from .common import BenchEnv, SectionResult, Target

REPEATS = 7
TASKS = 200
HERE = Path(__file__).resolve().parent

IMPORTS = {
    "celery": "import celery",
    "celery_rediskit": "import celery_rediskit",
    "celery_rediskit.integration": "import celery_rediskit.integration",
}

_TIMED = """
import time, sys
{pre}
t = time.perf_counter()
{stmt}
print(time.perf_counter() - t)
"""

_MEMORY = """
import json, sys, uuid
def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
url, prefix, with_kit, n = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
from celery import Celery
from celery.app.trace import build_tracer
app = Celery("mem", broker=url, backend=url, set_as_current=False)
out = {"app": rss()}
if with_kit:
    from celery_rediskit.integration import RedisKit
    RedisKit(app, prefix=prefix)
    kinds = {"single": {"singleton": True}, "limited": {"concurrency_limit": "mem:4"},
             "cached": {"cache_ttl": 600}}
else:
    kinds = {"single": {}, "limited": {}, "cached": {}}
def body(x):
    return x
for name, opts in kinds.items():
    app.task(shared=False, name=name, **opts)(body)
app.finalize()
out["installed"] = rss()
def run(name):
    task = app.tasks[name]
    trace = build_tracer(name, task, app=app, hostname="mem@host")
    for i in range(n):
        tid = str(uuid.uuid4())
        r = trace(tid, (f"{i}-{tid}",), {}, {"id": tid, "task": name, "hostname": "mem@host",
                  "delivery_info": {"exchange": "", "routing_key": "q"}})
        assert r[1] is None, r
run("single"); run("limited")
out["locks"] = rss()
run("cached")
out["cache"] = rss()
out["modules"] = sorted(m for m in sys.modules if m.startswith("celery_rediskit"))
print(json.dumps(out))
"""


def _python(code: str, *args: str) -> str:
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                            text=True, timeout=120, cwd=HERE.parent)
    if result.returncode != 0:
        raise RuntimeError(result.stderr)
    return result.stdout.strip().splitlines()[-1]


def run(env: BenchEnv, log: Callable[[str], None]) -> SectionResult:
    res = SectionResult("startup", "Startup and memory: import times, a worker process's RSS")
    cases = {name: _TIMED.format(pre="", stmt=stmt) for name, stmt in IMPORTS.items()}
    cases["integration, celery already imported"] = _TIMED.format(
        pre="import celery, celery.app.task, celery.app.base",
        stmt="import celery_rediskit.integration")
    times: dict[str, list[float]] = {k: [] for k in cases}
    names = list(cases)
    for r in range(REPEATS):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(float(_python(cases[name])))
    res.tables.append((
        f"import time in a fresh interpreter, median of {REPEATS} (lowest-highest)",
        ["import", "time"],
        [[name, f"{statistics.median(v) * 1000:.0f} ms ({min(v) * 1000:.0f}-"
                f"{max(v) * 1000:.0f})"] for name, v in times.items()],
    ))
    log("startup: import times done")

    plain = json.loads(_python(_MEMORY, env.url, env.prefix + "-mem0", "0", str(TASKS)))
    kit = json.loads(_python(_MEMORY, env.url, env.prefix + "-mem1", "1", str(TASKS)))
    steps = [("app (celery imported)", "app"), ("tasks defined (RedisKit installed)", "installed"),
             (f"after {TASKS} singleton + {TASKS} limited runs", "locks"),
             (f"after {TASKS} cache_ttl runs", "cache")]
    rows = [[label, f"{plain[key] / 1024:.1f} MB", f"{kit[key] / 1024:.1f} MB",
             f"{(kit[key] - plain[key]) / 1024:+.1f} MB"] for label, key in steps]
    res.tables.append((
        "resident memory (VmRSS) of one process running tasks through Celery's worker tracer",
        ["step", "plain Celery", "with RedisKit", "gained"], rows,
    ))
    lazy = ("celery_rediskit.cache", "celery_rediskit.report", "celery_rediskit.integration.cli",
            "celery_rediskit._redis.wakeup")
    res.targets.append(Target(
        "worker RSS gained with RedisKit (locks, permits, cache used)",
        f"{(kit['cache'] - plain['cache']) / 1024:+.1f} MB", "plain Celery", None, "info",
        None))
    loaded = [m for m in lazy if m in kit["modules"]]
    res.notes.append("after every kind ran, loaded of the lazily imported modules: "
                     + (", ".join(loaded) or "none"))
    return res
