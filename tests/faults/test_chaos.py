"""The chaos run inside ``make test``: about 25 s of every fault kind against the mutex and the
semaphore, judged by the history checker (invariants (a)-(f), see ``history.py``).

A failure prints the report: the seed, the faults injected, and each violated invariant with
the faults seen just before its violations. ``CHAOS_SEED``, ``CHAOS_SECONDS`` and
``CHAOS_FAULTS`` (comma-separated kinds, see ``chaos.ALL_FAULTS``) narrow a run down, e.g. to
verify one fix: ``CHAOS_FAULTS=interrupt .venv/bin/python -m pytest tests/faults/test_chaos.py``.
Longer runs: ``make chaos``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.faults.chaos import ALL_FAULTS, ChaosConfig, run_chaos


@pytest.mark.timeout(300)
def test_locks_and_permits_keep_their_promises_under_chaos(tmp_path: Path) -> None:
    faults = os.environ.get("CHAOS_FAULTS")
    cfg = ChaosConfig(
        seconds=float(os.environ.get("CHAOS_SECONDS", "25")),
        processes=3,
        threads=3,
        lease=1.5,  # short, so that partitions, stalls and pauses outlast leases
        seed=int(os.environ.get("CHAOS_SEED", random.randrange(2**31))),
        faults=tuple(faults.split(",")) if faults else ALL_FAULTS,
        log_dir=tmp_path / "chaos",
    )
    report = run_chaos(cfg)
    assert report.result.stats["grants"] > 0, report.format()
    assert report.ok, "\n" + report.format(details=2)
