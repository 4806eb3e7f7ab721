"""A grant message held up on its way must not be taken for a grant that is still live.

The scenario the chaos run found (seed 1861855770, 3 holders of a 2-permit semaphore): a
waiter's process is paused while a release grants it; its lease runs out on the server and
someone else takes the key; the waiter resumes and checks in again (not granted: the key is
held), while another thread of its process, the one reading the wake-up connection, hands it
the old grant message. Dated from the latest check-in, the old grant looked fresh; dated from
the check-in it names, it is seen for what it is, and the waiter waits on until the key is
really free.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import redis

from celery_rediskit import (
    RedisMutexStorage,
    RedisSemaphoreStorage,
    create_mutex,
    create_semaphore,
)
from tests.faults.holders import LineReader, pause_process, resume_process
from tests.interrupts import wait_until
from tests.processes import HOLDER

LEASE = 1.0  # the waiter's lease, seconds
HOLDUP = 0.3  # seconds each wake-up message waits in the waiter before its reader sees it


@pytest.fixture
def waiters() -> Iterator[list[subprocess.Popen[str]]]:
    made: list[subprocess.Popen[str]] = []
    yield made
    for proc in made:
        resume_process(proc.pid)
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("kind", ["mutex", "semaphore"])
def test_a_grant_message_held_up_past_the_grants_end_does_not_make_a_second_holder(
    kind: str, client: redis.Redis, redis_url: str, prefix: str,
    waiters: list[subprocess.Popen[str]],
) -> None:
    if kind == "mutex":
        granter = create_mutex(timeout=5, lease=30, storage=RedisMutexStorage(client, prefix))
        waitq = f"{prefix}:lock:{{%s}}:waitq"
    else:
        granter = create_semaphore(permits=1, timeout=5, lease=30,
                                   storage=RedisSemaphoreStorage(client, prefix))
        waitq = f"{prefix}:sem:{{%s}}:waitq"
    other = granter.acquire("other", auto_renew=False)  # held throughout
    first = granter.acquire("res", auto_renew=False)
    proc = subprocess.Popen(
        [sys.executable, str(HOLDER), "wait", kind, redis_url, prefix, "res", str(LEASE), "1",
         str(HOLDUP), "other"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    waiters.append(proc)
    lines = LineReader(proc.stdout)  # type: ignore[arg-type]
    wait_until(lambda: client.hlen(waitq % "other") == 1, timeout=10)  # the reader waits
    proc.stdin.write("go\n")  # type: ignore[union-attr]
    proc.stdin.flush()  # type: ignore[union-attr]
    wait_until(lambda: client.hlen(waitq % "res") == 1, timeout=10)
    pause_process(proc.pid)
    time.sleep(0.5)  # the grant comes well after the waiter's last check-in (0.5 s > HOLDUP)
    first.release()  # grants the paused waiter; its message waits in the paused process
    # The waiter's grant runs out unrenewed; then someone else holds the key.
    second = granter.acquire("res", timeout=LEASE + 2, auto_renew=False)
    resume_process(proc.pid)
    # The waiter checks in (not granted: `second` holds), then reads the old grant message.
    # It must not count that as a grant while `second` holds.
    with pytest.raises(TimeoutError):
        got = lines.next(timeout=1.0 + HOLDUP)
        pytest.fail(f"the waiter took a grant that had ended while another held: {got}")
    released_at = time.monotonic()
    second.release()
    got = lines.next(timeout=10)
    assert got.startswith("GOT "), got
    assert float(got.split()[1]) >= released_at, "granted only once the key was free"
    proc.stdin.write("release\n")  # type: ignore[union-attr]
    proc.stdin.flush()  # type: ignore[union-attr]
    assert lines.next(timeout=10).startswith("RELEASED True")
    other.release()
