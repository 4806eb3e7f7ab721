"""A chaos worker: one process whose threads take and give back mutex keys and semaphore
permits, logging every wait and every grant for the history checker.

What it models: an application process using the library as documented, with a careful
client configuration (short socket timeouts, one retry): ``threads`` threads loop, each time
picking a mutex key or the semaphore, waiting for it with a random bound, holding it for a
random time (often past a renewal, sometimes past the lease) and releasing it. The main thread
is one of them, so a SIGINT from the driver raises ``KeyboardInterrupt`` inside its wait, as a
Ctrl-C, a SystemExit or Celery's SoftTimeLimitExceeded would (only inside the library's
``acquire``: a signal arriving elsewhere is ignored, so the interruption is always of a wait).

The log (``history.py`` reads it) is written with one ``os.write`` per line on an O_APPEND
file, so lines of different threads never interleave and a kill cuts at most the last line.
``end`` is written *before* ``release()`` is called: a holder stops acting when it decides to
release, and the next holder may be granted before ``release()`` returns.

Control, on stdin: ``drain`` (finish the current wait or hold, then idle; prints ``DRAINED``)
and ``exit``. The process prints ``READY`` once its log is open.

Run as ``python -m tests.faults.workload '<json WorkerConfig>'``.
"""

from __future__ import annotations

import inspect
import json
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from types import FrameType
from typing import Any

import redis
from redis.backoff import EqualJitterBackoff  # in every redis-py the project supports
from redis.retry import Retry

from celery_rediskit import (
    Lease,
    LockTimeout,
    RedisMutexStorage,
    RedisSemaphoreStorage,
    create_mutex,
    create_semaphore,
)

__all__ = ["WorkerConfig", "client_options", "command_worst_case"]


@dataclass(frozen=True)
class WorkerConfig:
    """One worker's settings. Times are seconds."""

    url: str
    prefix: str
    log_path: str
    seed: int
    threads: int = 3
    mutex_keys: tuple[str, ...] = ("m0", "m1")
    semaphore_key: str = "s0"
    permits: int = 2
    lease: float = 1.5
    bound_min: float = 0.2
    bound_max: float = 3.0
    hold_short: float = 0.15  # most holds are up to this long ...
    hold_long_share: float = 0.3  # ... this share up to hold_long
    hold_long: float = 3.0
    socket_timeout: float = 0.5
    retries: int = 1
    backoff_cap: float = 0.1

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerConfig:
        data = json.loads(text)
        data["mutex_keys"] = tuple(data["mutex_keys"])
        return cls(**data)


def client_options(cfg: WorkerConfig) -> dict[str, Any]:
    """The redis-py options of every worker client: a socket timeout on every read and on
    connecting, one retry after a short backoff, and no CLIENT SETINFO on connect (so a new
    connection costs one round trip, which keeps ``command_worst_case`` tight)."""
    options: dict[str, Any] = {
        "socket_timeout": cfg.socket_timeout,
        "socket_connect_timeout": cfg.socket_timeout,
        "retry": Retry(EqualJitterBackoff(cap=cfg.backoff_cap, base=0.02),
                       cfg.retries),
    }
    if "driver_info" in inspect.signature(redis.Redis.__init__).parameters:
        options["driver_info"] = None
    else:  # redis-py before 7
        options["lib_name"] = None
        options["lib_version"] = None
    return options


def command_worst_case(cfg: WorkerConfig) -> float:
    """The longest one Redis command may take with ``client_options`` however the network
    or server misbehaves: each attempt waits at most one socket timeout (connecting to the
    proxy on loopback is immediate, or refused at once), plus a backoff between redis-py's
    attempts. The library's lean path makes one attempt of its own first and, after a
    connection error or timeout, sends the command again through ``execute_command`` (README,
    "Hot commands"), which makes ``retries + 1`` attempts: ``retries + 2`` in all."""
    return (cfg.retries + 2) * cfg.socket_timeout + cfg.retries * cfg.backoff_cap


class _Log:
    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, **event: Any) -> None:
        os.write(self._fd, (json.dumps(event) + "\n").encode())


class _Attempt(threading.local):
    """What the current thread's acquire is doing (see ``_Recording``)."""

    owner: str | None = None
    interruptible: bool = False


_attempt = _Attempt()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    if _attempt.interruptible:
        raise KeyboardInterrupt  # inside the library's wait, as a Ctrl-C would
    # Anywhere else (holding, logging) an interruption would test this harness, not the library.


class _RecordingMutexStorage(RedisMutexStorage):
    """Records the owner id of the current thread's acquisition, and lets SIGINT interrupt
    only while the library's ``acquire`` runs."""

    def acquire(self, key: str, owner: str, lease: float, timeout: float | None,
                abort: threading.Event | None = None, **options: Any) -> int:
        _attempt.owner = owner
        _attempt.interruptible = True
        try:
            return super().acquire(key, owner, lease, timeout, abort, **options)
        finally:
            _attempt.interruptible = False


class _RecordingSemaphoreStorage(RedisSemaphoreStorage):
    """The semaphore's counterpart of ``_RecordingMutexStorage``."""

    def acquire(self, key: str, owner: str, permits: int, lease: float,
                timeout: float | None, abort: threading.Event | None = None,
                **options: Any) -> int:
        _attempt.owner = owner
        _attempt.interruptible = True
        try:
            return super().acquire(key, owner, permits, lease, timeout, abort, **options)
        finally:
            _attempt.interruptible = False


class Worker:
    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self.log = _Log(cfg.log_path)
        self.pid = os.getpid()
        self.client = redis.Redis.from_url(cfg.url, **client_options(cfg))
        self.mutex = create_mutex(
            lease=cfg.lease, storage=_RecordingMutexStorage(self.client, cfg.prefix),
            on_lost=self._on_lost,
        )
        self.semaphore = create_semaphore(
            permits=cfg.permits, lease=cfg.lease,
            storage=_RecordingSemaphoreStorage(self.client, cfg.prefix), on_lost=self._on_lost,
        )
        self.draining = threading.Event()

    def _on_lost(self, lease: Lease, reason: str) -> None:
        self.log.write(ev="lost", owner=lease.owner, t=time.monotonic(), reason=reason)

    def loop(self, index: int) -> None:
        rng = random.Random(self.cfg.seed * 1000 + index)
        while not self.draining.is_set():
            self.once(rng)

    def once(self, rng: random.Random) -> None:
        cfg = self.cfg
        if rng.random() < 0.6:
            kind, key = "mutex", rng.choice(cfg.mutex_keys)
        else:
            kind, key = "semaphore", cfg.semaphore_key
        bound = rng.uniform(cfg.bound_min, cfg.bound_max)
        if rng.random() < cfg.hold_long_share:
            hold = rng.uniform(cfg.hold_short, cfg.hold_long)
        else:
            hold = rng.uniform(0.0, cfg.hold_short)
        _attempt.owner = None
        t_req = time.monotonic()
        outcome, error = "granted", None
        try:
            if kind == "mutex":
                lease: Lease = self.mutex.acquire(key, timeout=bound)
            else:
                lease = self.semaphore.acquire(key, timeout=bound)
        except LockTimeout:
            outcome = "timeout"
        except KeyboardInterrupt:
            outcome = "interrupted"
        except Exception as exc:
            outcome, error = "error", f"{type(exc).__name__}: {exc}"
        t_out = time.monotonic()
        if outcome != "granted":
            self.log.write(ev="refused", pid=self.pid, kind=kind, key=key, owner=_attempt.owner,
                           t_req=t_req, t=t_out, bound=bound, outcome=outcome, error=error)
            if error is not None:
                time.sleep(rng.uniform(0.05, 0.2))  # an application backs off before retrying
            return
        self.log.write(ev="grant", pid=self.pid, kind=kind, key=key, owner=lease.owner,
                       token=lease.fencing_token, t_req=t_req, t=t_out, bound=bound)
        time.sleep(hold)  # the protected work
        self.log.write(ev="end", owner=lease.owner, t=time.monotonic())
        try:
            ok: bool | None = lease.release()
            failure = None
        except Exception as exc:  # the lease then runs out by itself
            ok, failure = None, f"{type(exc).__name__}: {exc}"
        self.log.write(ev="released", owner=lease.owner, t=time.monotonic(), ok=ok,
                       error=failure)


def main(argv: list[str]) -> None:
    cfg = WorkerConfig.from_json(argv[0])
    worker = Worker(cfg)
    signal.signal(signal.SIGINT, _interrupt)
    others = [threading.Thread(target=worker.loop, args=(i,), name=f"chaos-{i}", daemon=True)
              for i in range(1, cfg.threads)]
    exiting = threading.Event()

    def control() -> None:
        for line in sys.stdin:
            if line.strip() == "drain":
                worker.draining.set()
            elif line.strip() == "exit":
                break
        worker.draining.set()  # "exit", or the driver is gone (stdin closed)
        exiting.set()

    threading.Thread(target=control, name="chaos-control", daemon=True).start()
    worker.log.write(ev="start", pid=worker.pid, t=time.monotonic())
    print("READY", flush=True)
    for thread in others:
        thread.start()
    worker.loop(0)
    for thread in others:
        thread.join()
    worker.log.write(ev="drained", pid=worker.pid, t=time.monotonic())
    print("DRAINED", flush=True)
    exiting.wait()


if __name__ == "__main__":
    main(sys.argv[1:])
