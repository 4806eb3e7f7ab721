"""The primitives know nothing of Celery: they import with celery made unimportable."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import celery_rediskit

PROBE = """
import importlib, sys
sys.modules["celery"] = None  # any 'import celery...' now raises ImportError
import celery_rediskit
for name in sys.argv[1:]:
    importlib.import_module(name)
assert not any(m == "celery" or m.startswith("celery.") for m in sys.modules
               if sys.modules[m] is not None), "celery was imported"
print("ok")
"""


def primitive_modules() -> list[str]:
    found = []
    for info in pkgutil.walk_packages(celery_rediskit.__path__, "celery_rediskit."):
        if not info.name.startswith("celery_rediskit.integration"):
            found.append(info.name)
    return found


def test_primitives_import_without_celery() -> None:
    modules = primitive_modules()
    assert "celery_rediskit.mutex" in modules and "celery_rediskit.semaphore" in modules
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *modules], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
