"""Paused holders and a fenced resource.

What it models: a lock holder that stops running past its lease (a long GC pause, a VM
migration, a stopped container: here SIGSTOP) while another process takes the lock, and then
resumes (SIGCONT) still believing it holds the lock. No lock service can stop such a holder
from acting; the resource it protects can, by refusing writes whose fencing token is lower
than one it has already seen. ``FencedResource`` is such a resource: a Redis hash written only
through ``fenced_write.lua``.

- ``HolderProcess(url, prefix, key, lease, resource)`` starts a child process that acquires the
  mutex ``key`` (auto-renewed) and then obeys ``write(value)`` (a fenced write with its token),
  ``release()`` and ``lost()``; ``pause()`` / ``resume()`` stop and continue it.
- ``pause_process(pid)`` / ``resume_process(pid)`` do the same to any child process.
- ``python -m tests.faults.holders URL PREFIX KEY LEASE RESOURCE`` is the child's side.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import redis

from celery_rediskit import RedisMutexStorage, create_mutex

__all__ = [
    "FencedResource",
    "FencedWrite",
    "HolderProcess",
    "LineReader",
    "REPO_ROOT",
    "child_env",
    "pause_process",
    "resume_process",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
FENCED_WRITE_LUA = Path(__file__).with_name("fenced_write.lua")


def child_env() -> dict[str, str]:
    """The environment for a child run as ``python -m tests.faults...`` from any directory."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
    )
    return env


def pause_process(pid: int) -> float:
    """SIGSTOP ``pid`` (a child of this process) and return ``time.monotonic()`` once the
    kernel reports it stopped (or gone)."""
    os.kill(pid, signal.SIGSTOP)
    # WNOWAIT: only look; the child's exit status, if it died, stays for subprocess to reap.
    os.waitid(os.P_PID, pid, os.WSTOPPED | os.WEXITED | os.WNOWAIT)
    return time.monotonic()


def resume_process(pid: int) -> float:
    """SIGCONT ``pid``; return ``time.monotonic()`` taken just before the signal."""
    at = time.monotonic()
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)
    return at


@dataclass(frozen=True)
class FencedWrite:
    """The answer of a fenced write: ``accepted``, and the highest token the resource has
    seen (the writer's own token when accepted)."""

    accepted: bool
    highest: int


class FencedResource:
    """A value in Redis (hash ``key``) that refuses writes carrying a token lower than the
    highest it has seen. Equal tokens are accepted: a holder may write many times."""

    def __init__(self, client: redis.Redis, key: str) -> None:
        self.client = client
        self.key = key
        self._script = client.register_script(FENCED_WRITE_LUA.read_text())

    def write(self, token: int, value: str) -> FencedWrite:
        accepted, highest = self._script(keys=[self.key], args=[token, value])
        return FencedWrite(bool(accepted), int(highest))

    def read(self) -> tuple[str | None, int]:
        """The last accepted value (None if never written) and the highest token seen."""
        value, token = self.client.hmget(self.key, ["value", "token"])
        text = value.decode() if isinstance(value, bytes) else value
        return text, int(token or 0)


class LineReader:
    """Lines of a child's stdout, read by a thread so a reader can wait with a timeout;
    ``next`` returns "" once the stream ended."""

    def __init__(self, stream: IO[str]) -> None:
        self._lines: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True,
                                        name="fault-holder-stdout")
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line.rstrip("\n"))
        self._lines.put("")  # EOF

    def next(self, timeout: float) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no line from the child within {timeout} s") from None
        if not line:
            self._lines.put("")  # stays at EOF
        return line


class HolderProcess:
    """A child process holding mutex ``key`` (see the module docstring)."""

    def __init__(self, url: str, prefix: str, key: str, lease: float, resource: str, *,
                 timeout: float = 30.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.holders", url, prefix, key, repr(lease),
             resource],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env(),
            cwd=REPO_ROOT,
        )
        assert self.proc.stdout is not None
        self._lines = LineReader(self.proc.stdout)
        line = self._lines.next(timeout)
        if not line.startswith("HELD "):
            self.close()
            raise RuntimeError(f"the holder did not get the lock: {line!r}")
        self.token = int(line.split()[1])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def command(self, text: str, timeout: float = 30.0) -> str:
        """Send one command line and return the child's answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self._lines.next(timeout)

    def write(self, value: str) -> FencedWrite:
        """Have the holder write ``value`` to the fenced resource with its token."""
        _, accepted, highest = self.command(f"write {value}").split()
        return FencedWrite(accepted == "1", int(highest))

    def lost(self) -> bool:
        """Whether the holder's lease is marked lost (as the holder sees it)."""
        return self.command("lost").split()[1] == "True"

    def release(self) -> str:
        return self.command("release")

    def pause(self) -> float:
        return pause_process(self.pid)

    def resume(self) -> float:
        return resume_process(self.pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            resume_process(self.pid)
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


def _child(url: str, prefix: str, key: str, lease: str, resource: str) -> None:
    client = redis.Redis.from_url(url)
    mutex = create_mutex(timeout=30.0, lease=float(lease),
                         storage=RedisMutexStorage(client, prefix))
    held = mutex.acquire(key)
    fenced = FencedResource(client, resource)
    print(f"HELD {held.fencing_token}", flush=True)
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "write":
            result = fenced.write(held.fencing_token, arg)
            print(f"WROTE {int(result.accepted)} {result.highest}", flush=True)
        elif command == "lost":
            print(f"LOST {held.lost}", flush=True)
        elif command == "release":
            print(f"RELEASED {held.release()} lost={held.lost}", flush=True)
        elif command == "exit":
            return


if __name__ == "__main__":
    _child(*sys.argv[1:])
