"""Accuracy under contention: 8 processes hammer one limiter of 50/s for 5 s.

Grants are timed on the server's clock (the time the script read, returned with each
decision), so the processes' own clocks and scheduling do not enter the count.

The smallest burst here is 2. With a burst of 1 (evenly spaced, the default) a slot that no
check asks for at its time is gone: the next slot is one interval after the late check, so
processes descheduled for a few milliseconds at a time (8 of them on 2 shared cores) lose a
few slots over 5 s (245 of 250 here, seen); a burst of 2 lets a late check catch up.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import redis

HAMMER = Path(__file__).with_name("hammer.py")
PROCESSES = 8
SECONDS = 5


@pytest.mark.parametrize("burst", [2, 10])
def test_eight_processes_get_the_rate_and_no_window_holds_more(
        redis_url: str, client: redis.Redis, prefix: str, burst: int) -> None:
    procs = [
        subprocess.Popen([sys.executable, str(HAMMER), redis_url, prefix, "x", "50/s",
                          str(burst), str(SECONDS)], stdout=subprocess.PIPE, text=True)
        for _ in range(PROCESSES)
    ]
    try:
        ready = 0
        for _ in range(60):  # BLPOP 1 s at a time: below the client's socket timeout
            while ready < PROCESSES and client.blpop([f"{prefix}:ready"], timeout=1):
                ready += 1
            if ready == PROCESSES or any(p.poll() is not None for p in procs):
                break
        assert ready == PROCESSES, "the hammering processes did not start"
        seconds, micros = client.time()
        start = seconds * 1_000_000 + micros
        client.rpush(f"{prefix}:go", *[start] * PROCESSES)
        outs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs)
    per_process = [json.loads(out) for out in outs]
    times = sorted(t for got in per_process for t in got if t >= start)
    assert sum(1 for got in per_process if got) > 1  # the grants were shared out
    # 250 slots in 5 s, plus the burst at the start (one of which is the first slot).
    expected = 50 * SECONDS + burst - 1
    assert abs(len(times) - expected) <= 0.02 * 250, (len(times), expected)
    # No window of one second holds more than 50 + burst grants.
    j = 0
    most = 0
    for i, t in enumerate(times):
        while times[j] <= t - 1_000_000:
            j += 1
        most = max(most, i - j + 1)
    print(f"\n50/s, burst {burst}, {PROCESSES} processes, {SECONDS} s: {len(times)} granted "
          f"(expected {expected}), at most {most} in one second")
    assert most <= 50 + burst, most
