"""The primitives know nothing of Celery: they import with celery made unimportable.

The Celery layer is ``integration/`` (the pytest plugin included: ``contrib/pytest.py`` only
re-exports it); ``testing.py``, the kit's server, is a primitive module like the others."""

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
        if not info.name.startswith(("celery_rediskit.integration",
                                     "celery_rediskit.contrib.pytest")):
            found.append(info.name)
    return found


def test_primitives_import_without_celery() -> None:
    modules = primitive_modules()
    assert {"celery_rediskit.mutex", "celery_rediskit.semaphore",
            "celery_rediskit.testing"} <= set(modules)
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *modules], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


LAZY_MODULES = frozenset({
    "celery_rediskit.cache",
    "celery_rediskit.report",
    "celery_rediskit._redis.wakeup",
})
"""The only modules imported inside functions: at their first use, so that what a plain task
(or a lock that never waits) does not use is never loaded (tests/test_imports.py). Imports
under ``if TYPE_CHECKING:`` are for annotations only."""


def _is_type_checking_block(node: object) -> bool:
    import ast

    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) \
        and node.test.id == "TYPE_CHECKING"


def _intra_package_imports() -> dict[str, tuple[set[str], list[str]]]:
    """module → (modules of the package it imports at module level, imports inside functions)."""
    import ast
    from pathlib import Path

    root = Path(celery_rediskit.__file__).parent
    found: dict[str, tuple[set[str], list[str]]] = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if parts[-1] == "__init__" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        top: set[str] = set()
        nested: list[str] = []

        def resolve(node: ast.ImportFrom | ast.Import, package: str = package) -> list[str]:
            if isinstance(node, ast.Import):
                return [a.name for a in node.names if a.name.startswith("celery_rediskit")]
            if node.level == 0:
                base = node.module or ""
            else:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            if not base.startswith("celery_rediskit"):
                return []
            return [f"{base}.{a.name}" for a in node.names] + [base]

        typing_only = {id(n) for block in tree.body if _is_type_checking_block(block)
                       for n in ast.walk(block)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets = resolve(node)
                if node in tree.body:
                    top.update(targets)
                elif targets and id(node) not in typing_only and not (
                        set(targets) & LAZY_MODULES):
                    nested.append(f"line {node.lineno}: {targets[-1]}")
        found[name] = (top, nested)
    modules = set(found)
    return {m: ({t for t in top if t in modules and t != m}, nested)
            for m, (top, nested) in found.items()}


def test_no_import_cycles_and_no_imports_inside_functions() -> None:
    graph = _intra_package_imports()
    nested = {m: n for m, (_, n) in graph.items() if n}
    assert not nested, f"imports inside functions: {nested}"
    # A package's __init__ importing its own modules is the usual shape, not a cycle: leave
    # out the edges from a module to the packages that contain it.
    edges = {m: {t for t in deps if not m.startswith(t + ".")} for m, (deps, _) in graph.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)


def test_memory_storages_import_nothing_of_redis() -> None:
    """What a memory storage imports (at module level, transitively) has no Redis code in it:
    neither the package's Redis plumbing nor redis-py."""
    graph = _intra_package_imports()
    uses_redis_py = {m for m in graph if _imports_redis_py(m)}
    for start in ("celery_rediskit.mutex.memory", "celery_rediskit.semaphore.memory",
                  "celery_rediskit.cache.memory", "celery_rediskit.ratelimit.memory"):
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo.extend(graph[m][0])
        redis_code = sorted(m for m in seen if m in uses_redis_py or "._redis" in m
                            or m.endswith(".redis"))
        assert not redis_code, f"{start} imports Redis code: {redis_code}"


def _imports_redis_py(module: str) -> bool:
    import ast
    import importlib.util

    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    with open(spec.origin) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "redis"
                                                for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.level == 0 and \
                (node.module or "").split(".")[0] == "redis":
            return True
    return False
