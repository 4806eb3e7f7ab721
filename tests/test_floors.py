"""``make test-min`` tests what pyproject.toml declares: constraints-min.txt pins each declared
floor of celery, kombu and redis-py exactly (the file is hand-written; this keeps them equal)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def declared_floors() -> dict[str, Version]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = {}
    for line in project["dependencies"]:
        req = Requirement(line)
        lower = [Version(s.version) for s in req.specifier if s.operator == ">="]
        if lower:
            floors[req.name.lower()] = max(lower)
    return floors


def pinned() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints-min.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.strip().lower()] = Version(version)
    return pins


def test_min_constraints_pin_every_declared_floor() -> None:
    floors, pins = declared_floors(), pinned()
    assert {"celery", "kombu", "redis"} <= floors.keys()
    for name, floor in floors.items():
        assert pins.get(name) == floor, f"{name}: declared >={floor}, pinned {pins.get(name)}"
