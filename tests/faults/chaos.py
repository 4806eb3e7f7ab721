"""The chaos run: worker processes contend for locks and permits while faults are injected,
then the history checker judges what happened.

What it models: a small deployment. ``processes`` worker processes (``workload.py``) with
``threads`` threads each share ``mutex_keys`` locks and one semaphore of ``permits`` permits on
one Redis server. Each worker reaches Redis through a fault proxy of its own, so a network
fault can hit one process (the far side of a partition) or all of them. Two schedulers inject
faults, drawn with ``seed``, until ``seconds`` have passed:

- network and server faults, one at a time: ``delay``, ``blackhole``, ``reset``,
  ``drop_pubsub`` (silently drop one worker's wake-up connection), ``restart`` (with its data),
  ``restart_wipe`` (without), ``stall`` (``DEBUG SLEEP``);
- process faults: ``pause`` (SIGSTOP, then SIGCONT), ``kill`` (SIGKILL; a new worker takes its
  place) and ``interrupt`` (SIGINT: ``KeyboardInterrupt`` inside a wait).

A sampler reads the holders of every key straight from the server ten times a second. When the
time is up the faults stop, the workers finish their last wait or hold and go idle (still
alive, renewer running), and the driver measures how long every permit and lock takes to be
free again. Then ``history.check`` verifies invariants (a)-(f) over the logs.

    python -m tests.faults.chaos --seconds 180 [--processes 3 --threads 3 --seed S
                                                --faults delay,blackhole,... --lease 1.5]

prints grants made, faults injected by kind, and the violations (count, and the first few in
detail); the exit status is 1 if there was any.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import redis

from celery_rediskit import RedisMutexStorage, RedisSemaphoreStorage
from tests.faults.history import INVARIANTS, CheckResult, check, load_history
from tests.faults.holders import REPO_ROOT, LineReader, child_env, pause_process, resume_process
from tests.faults.proxy import FaultProxy
from tests.faults.servers import FaultServer
from tests.faults.workload import WorkerConfig, command_worst_case

__all__ = ["ALL_FAULTS", "ChaosConfig", "ChaosReport", "main", "run_chaos"]

NETWORK_SERVER_FAULTS = ("delay", "blackhole", "reset", "drop_pubsub", "restart",
                         "restart_wipe", "stall")
PROCESS_FAULTS = ("pause", "kill", "interrupt")
ALL_FAULTS = NETWORK_SERVER_FAULTS + PROCESS_FAULTS

SAMPLE_EVERY = 0.1  # seconds between snapshots of the server's holders


@dataclass(frozen=True)
class ChaosConfig:
    """A chaos run's settings. Times are seconds."""

    seconds: float = 180.0
    processes: int = 3
    threads: int = 3
    seed: int = field(default_factory=lambda: random.randrange(2**31))
    faults: tuple[str, ...] = ALL_FAULTS
    lease: float = 1.5
    permits: int = 2
    mutex_keys: int = 2
    fault_gap: tuple[float, float] = (0.3, 1.5)  # between network/server faults
    process_fault_gap: tuple[float, float] = (1.0, 4.0)  # between process faults
    scheduling_allowance: float = 0.75  # a thread on a loaded 2-core machine may wait this
    log_dir: Path | None = None  # default: a temporary directory, kept only on violations

    def __post_init__(self) -> None:
        unknown = set(self.faults) - set(ALL_FAULTS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {ALL_FAULTS}")
        if self.processes < 1 or self.threads < 1 or self.permits < 1 or self.mutex_keys < 1:
            raise ValueError("processes, threads, permits and mutex_keys must be >= 1")
        if self.seconds <= 0 or self.lease <= 0:
            raise ValueError("seconds and lease must be > 0")

    def worker(self, url: str, prefix: str, log_path: Path, seed: int) -> WorkerConfig:
        return WorkerConfig(
            url=url, prefix=prefix, log_path=str(log_path), seed=seed, threads=self.threads,
            mutex_keys=tuple(f"m{i}" for i in range(self.mutex_keys)), semaphore_key="s0",
            permits=self.permits, lease=self.lease, hold_long=2 * self.lease,
        )

    @property
    def slack(self) -> float:
        """What (d) allows past a wait's bound: a wait may have just sent one command when its
        bound passes (an attempt) and then sends one more (leaving the queue), each taking up
        to ``command_worst_case``; plus a scheduling allowance for the loaded machine."""
        sample = self.worker("", "", Path(), 0)
        return 2 * command_worst_case(sample) + self.scheduling_allowance


# What injected faults may make an attempt fail with (network cut, reset, server restarting or
# stalled). Anything else escaping the library is a bug the run must report, not count.
FAULT_ERRORS = frozenset({"ConnectionError", "TimeoutError", "BusyLoadingError"})


@dataclass
class ChaosReport:
    config: ChaosConfig
    result: CheckResult
    elapsed: float
    log_dir: Path
    driver_errors: list[str] = field(default_factory=list)

    @property
    def unexpected_errors(self) -> dict[str, int]:
        """Errors of attempts that no injected fault explains (a TypeError, a ValueError...)."""
        return {name: n for name, n in self.result.stats["errors"].items()
                if name not in FAULT_ERRORS}

    @property
    def ok(self) -> bool:
        return not self.result.violations and not self.driver_errors \
            and not self.unexpected_errors

    def format(self, details: int = 3) -> str:
        """The report: grants, faults by kind, violations by invariant and by nearby fault
        kind, and the first ``details`` violations of each invariant in full."""
        s = self.result.stats
        cfg = self.config
        lines = [
            f"chaos: {cfg.seconds:g} s requested, {self.elapsed:.1f} s in all, seed {cfg.seed}, "
            f"{cfg.processes} processes x {cfg.threads} threads, lease {cfg.lease:g} s, "
            f"{cfg.mutex_keys} mutex keys, semaphore of {cfg.permits}, slack {cfg.slack:.2f} s",
            f"grants: {s['grants']} ({s['grants_by_kind']}), leases lost: {s['lost']}, "
            f"waits ended otherwise: {s['outcomes']}",
            f"errors: {s['errors']}",
            f"waits: p50 {s['wait_p50']} s, max {s['wait_max']} s; wake-up after release: "
            f"p50 {s['handoff_p50']} s, p99 {s['handoff_p99']} s, max {s['handoff_max']} s",
            f"faults injected: {s['faults']}",
            f"violations: {len(self.result.violations)} {self.result.by_invariant()}",
        ]
        for invariant, kinds in self.result.by_fault_kind().items():
            lines.append(f"  ({invariant}) {INVARIANTS[invariant]}; faults nearby: {kinds}")
        shown: dict[str, int] = {}
        for v in self.result.violations:
            if shown.get(v.invariant, 0) >= details:
                continue
            shown[v.invariant] = shown.get(v.invariant, 0) + 1
            lines.append("  - " + v.describe())
            lines.append("      " + json.dumps(v.details, default=str))
        if self.unexpected_errors:
            lines.append(f"errors no fault explains (library bugs): {self.unexpected_errors}")
        if self.driver_errors:
            lines.append(f"faults that could not be injected: {self.driver_errors}")
        lines.append(f"logs: {self.log_dir}" if self.log_dir.exists()
                     else "logs: removed (no violations; --log-dir keeps them)")
        return "\n".join(lines)


class _Worker:
    """One worker process and the fault proxy it reaches Redis through."""

    def __init__(self, run: _Run, index: int) -> None:
        cfg = run.cfg
        self.index = index
        self.proxy = FaultProxy(run.server.port).start()
        wcfg = cfg.worker(self.proxy.url, run.prefix, run.log_dir / f"worker-{index}.jsonl",
                          seed=cfg.seed + index)
        self.stderr = (run.log_dir / f"worker-{index}.err").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.workload", wcfg.to_json()],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
            env=child_env(), cwd=REPO_ROOT,
        )
        assert self.proc.stdout is not None
        self.lines = LineReader(self.proc.stdout)
        line = self.lines.next(30.0)
        if line != "READY":
            self.close()
            raise RuntimeError(f"worker {index} did not start: {line!r} "
                               f"(see {run.log_dir / f'worker-{index}.err'})")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tell(self, command: str) -> None:
        with contextlib.suppress(BrokenPipeError, OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            resume_process(self.pid)
            self.proc.kill()
        self.proc.wait()
        with contextlib.suppress(RuntimeError):
            self.proxy.close()
        for stream in (self.proc.stdin, self.proc.stdout, self.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


class _Run:
    def __init__(self, cfg: ChaosConfig, server: FaultServer, log_dir: Path) -> None:
        self.cfg = cfg
        self.server = server
        self.log_dir = log_dir
        self.prefix = f"chaos-{cfg.seed}"
        self.rng = random.Random(cfg.seed)
        self.stop = threading.Event()
        self.lock = threading.Lock()  # guards workers, the driver log and rng
        self.workers: list[_Worker] = []
        self.next_index = 0
        self.errors: list[str] = []  # faults that could not be injected
        self.holding: set[int] = set()  # pids of the holders the sampler saw last
        self._log = (log_dir / "driver.jsonl").open("a")

    # ---- bookkeeping -----------------------------------------------------------------------

    def log(self, **event: Any) -> None:
        with self.lock:
            self._log.write(json.dumps(event) + "\n")
            self._log.flush()

    def fault(self, kind: str, t_start: float, t_end: float, pids: Sequence[int] = (),
              detail: str = "") -> None:
        self.log(ev="fault", kind=kind, t_start=t_start, t_end=t_end, pids=list(pids),
                 detail=detail)

    def spawn(self) -> _Worker:
        with self.lock:
            index = self.next_index
            self.next_index += 1
        worker = _Worker(self, index)
        with self.lock:
            self.workers.append(worker)
        return worker

    def pick(self, rng: random.Random, *, holder: bool = False) -> _Worker:
        """A worker; with ``holder``, one that holds a lock or permit now (as the sampler
        last saw) 4 times in 5, since faults bite hardest there."""
        with self.lock:
            holding = [w for w in self.workers if w.pid in self.holding]
            if holder and holding and rng.random() < 0.8:
                return rng.choice(holding)
            return rng.choice(self.workers)

    def targets(self, rng: random.Random) -> tuple[list[_Worker], list[int]]:
        """One worker, likely a holder (7 times in 10), or all of them; the pids to log
        ([] for all)."""
        if rng.random() < 0.7:
            one = self.pick(rng, holder=True)
            return [one], [one.pid]
        with self.lock:
            return list(self.workers), []

    # ---- the schedulers --------------------------------------------------------------------

    def schedule(self, kinds: Sequence[str], gap: tuple[float, float],
                 inject: Callable[[str, random.Random], None], seed: int) -> None:
        rng = random.Random(seed)
        while kinds and not self.stop.wait(rng.uniform(*gap)):
            kind = rng.choice(kinds)
            try:
                inject(kind, rng)
            except Exception as exc:  # reported with the results; the run goes on
                self.errors.append(f"{kind}: {type(exc).__name__}: {exc}")
                self.log(ev="driver_error", kind=kind, error=f"{type(exc).__name__}: {exc}")

    def network_or_server_fault(self, kind: str, rng: random.Random) -> None:
        lease = self.cfg.lease
        if kind in ("delay", "blackhole"):
            workers, pids = self.targets(rng)
            duration = rng.uniform(0.5, 2 * lease) if kind == "delay" else rng.uniform(
                0.3, 2.5 * lease)
            up, down = rng.uniform(0.02, 0.2), rng.uniform(0.02, 0.2)
            t_start = time.monotonic()
            for w in workers:
                with contextlib.suppress(RuntimeError):  # killed meanwhile
                    if kind == "delay":
                        w.proxy.delay(up, down)
                    else:
                        w.proxy.blackhole()
            self.stop.wait(duration)
            for w in workers:
                with contextlib.suppress(RuntimeError):
                    w.proxy.heal()
            detail = f"{duration:.2f}s" + (f" up {up:.2f} down {down:.2f}"
                                            if kind == "delay" else "")
            self.fault(kind, t_start, time.monotonic(), pids, detail)
        elif kind == "reset":
            workers, pids = self.targets(rng)
            t_start = time.monotonic()
            count = 0
            for w in workers:
                with contextlib.suppress(RuntimeError):
                    count += w.proxy.reset()
            self.fault(kind, t_start, time.monotonic(), pids, f"{count} connections")
        elif kind == "drop_pubsub":
            worker = self.pick(rng)
            t_start = time.monotonic()
            with contextlib.suppress(RuntimeError):
                live = [link for link in worker.proxy.links()
                        if link.subscribed and not link.dropped]
                if live:
                    link = rng.choice(live)
                    worker.proxy.drop(link.client_port)
                    self.fault(kind, t_start, time.monotonic(), [worker.pid],
                               f"port {link.client_port}")
        elif kind in ("restart", "restart_wipe"):
            down_for = rng.uniform(0.0, 1.0)
            t_start = time.monotonic()
            self.server.restart(keep_data=kind == "restart", down_for=down_for)
            self.fault(kind, t_start, time.monotonic(), (), f"down {down_for:.2f}s")
        elif kind == "stall":
            seconds = rng.uniform(0.2, 1.5 * lease)
            t_start = time.monotonic()
            stall = self.server.stall(seconds)
            stall.wait(seconds + 30)
            self.fault(kind, t_start, time.monotonic(), (), f"{seconds:.2f}s")

    def process_fault(self, kind: str, rng: random.Random) -> None:
        worker = self.pick(rng, holder=kind != "interrupt")  # interrupts are for waiters
        if kind == "pause":
            duration = rng.uniform(0.3, 2 * self.cfg.lease)
            t_start = pause_process(worker.pid)
            self.stop.wait(duration)
            t_end = resume_process(worker.pid)
            self.fault(kind, t_start, t_end, [worker.pid], f"{t_end - t_start:.2f}s")
        elif kind == "kill":
            worker.proc.send_signal(signal.SIGKILL)
            worker.proc.wait()
            t_dead = time.monotonic()
            self.log(ev="kill", pid=worker.pid, t=t_dead)
            self.fault(kind, t_dead, t_dead, [worker.pid])
            self.spawn()  # first, so the list of workers is never empty
            with self.lock:
                self.workers.remove(worker)
            worker.close()
        elif kind == "interrupt":
            t = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGINT)
            self.fault(kind, t, t, [worker.pid])

    # ---- the sampler and the end -----------------------------------------------------------

    def sample(self, done: threading.Event) -> None:
        client = self.server.client(socket_timeout=0.5, socket_connect_timeout=0.5, retry=None)
        mutexes = RedisMutexStorage(client, self.prefix)
        semaphores = RedisSemaphoreStorage(client, self.prefix, permits=self.cfg.permits)
        keys = [f"m{i}" for i in range(self.cfg.mutex_keys)]
        while not done.wait(SAMPLE_EVERY):
            holding: set[int] = set()
            for kind, key in [("mutex", k) for k in keys] + [("semaphore", "s0")]:
                t_send = time.monotonic()
                try:
                    if kind == "mutex":
                        holder = mutexes.get_lock_info(key).holder
                        holders = [holder] if holder else []
                    else:
                        holders = list(semaphores.get_semaphore_info(key).holders)
                except (redis.RedisError, OSError):
                    continue  # the server is down or stalled: no snapshot
                if holders:
                    self.log(ev="snapshot", t_send=t_send, t_recv=time.monotonic(),
                             kind=kind, key=key, holders=holders)
                    holding.update(_pid_of(owner) for owner in holders)
            self.holding = holding
        client.close()

    def settle(self, t_idle: float) -> None:
        """(e): wait (at most a lease, plus a poll) for every permit and lock to be free."""
        client = self.server.client(socket_timeout=2.0)
        mutexes = RedisMutexStorage(client, self.prefix)
        semaphores = RedisSemaphoreStorage(client, self.prefix, permits=self.cfg.permits)
        deadline = t_idle + self.cfg.lease + 0.5
        leftover: dict[str, list[str]] = {}
        t_free: float | None = None
        while True:
            leftover = {}
            for i in range(self.cfg.mutex_keys):
                holder = mutexes.get_lock_info(f"m{i}").holder
                if holder:
                    leftover[f"m{i}"] = [holder]
            holders = list(semaphores.get_semaphore_info("s0").holders)
            if holders:
                leftover["s0"] = holders
            now = time.monotonic()
            if not leftover:
                t_free = now
                break
            if now > deadline:
                break
            time.sleep(0.05)  # expiry happens on the server: nothing to wait on but time
        client.close()
        self.log(ev="settled", t_idle=t_idle, deadline=deadline, t_free=t_free,
                 leftover=leftover)

    def drain(self) -> float:
        """Ask every worker to finish and idle; return when the last went idle."""
        cfg = self.cfg
        sample = cfg.worker("", "", Path(), 0)
        budget = (sample.bound_max + cfg.slack + sample.hold_long
                  + command_worst_case(sample) + 5.0)
        for w in self.workers:
            w.tell("drain")
        end = time.monotonic() + budget
        for w in list(self.workers):
            try:
                line = w.lines.next(max(0.1, end - time.monotonic()))
            except TimeoutError:
                line = ""
            if line != "DRAINED":
                self.log(ev="undrained", pid=w.pid, t=time.monotonic())
        return time.monotonic()

    def run(self) -> None:
        cfg = self.cfg
        self.log(ev="config", permits=cfg.permits, lease=cfg.lease, seed=cfg.seed,
                 faults=list(cfg.faults), processes=cfg.processes, threads=cfg.threads)
        for _ in range(cfg.processes):
            self.spawn()
        sampling = threading.Event()
        sampler = threading.Thread(target=self.sample, args=(sampling,), name="chaos-sampler")
        sampler.start()
        net = [k for k in cfg.faults if k in NETWORK_SERVER_FAULTS]
        proc = [k for k in cfg.faults if k in PROCESS_FAULTS]
        schedulers = [
            threading.Thread(target=self.schedule, name="chaos-faults",
                             args=(net, cfg.fault_gap, self.network_or_server_fault, cfg.seed)),
            threading.Thread(target=self.schedule, name="chaos-process-faults",
                             args=(proc, cfg.process_fault_gap, self.process_fault,
                                   cfg.seed + 1)),
        ]
        try:
            for t in schedulers:
                t.start()
            self.stop.wait(cfg.seconds)
        finally:
            self.stop.set()
            for t in schedulers:
                t.join()
            try:
                for w in self.workers:
                    with contextlib.suppress(RuntimeError):
                        w.proxy.heal()
                t_idle = self.drain()
                self.settle(t_idle)
            finally:
                sampling.set()
                sampler.join()
                for w in self.workers:
                    w.tell("exit")
                for w in self.workers:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        w.proc.wait(5.0)
                    w.close()
                self._log.close()


def _pid_of(owner: str) -> int:
    """The pid in an owner id, ``"<host>/<pid>/<random>:<n>"`` (see ``LockInfo``)."""
    try:
        return int(owner.rsplit("/", 2)[-2])
    except (IndexError, ValueError):
        return -1


def run_chaos(cfg: ChaosConfig) -> ChaosReport:
    """Run the chaos workload with ``cfg`` and check its history."""
    started = time.monotonic()
    log_dir = cfg.log_dir or Path(tempfile.mkdtemp(prefix="rediskit-chaos-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    with FaultServer(persistent=True) as server:
        run = _Run(cfg, server, log_dir)
        run.run()
    history = load_history(log_dir)
    result = check(history, slack=cfg.slack)
    report = ChaosReport(cfg, result, time.monotonic() - started, log_dir, run.errors)
    if cfg.log_dir is None and report.ok:
        shutil.rmtree(log_dir, ignore_errors=True)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.chaos",
                                     description=__doc__.split("\n\n", 1)[0] if __doc__ else "")
    defaults = ChaosConfig(seed=0)
    parser.add_argument("--seconds", type=float, default=defaults.seconds,
                        help="how long faults are injected (default: %(default)s)")
    parser.add_argument("--processes", type=int, default=defaults.processes,
                        help="worker processes (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=defaults.threads,
                        help="threads per worker process (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    parser.add_argument("--faults", default=",".join(ALL_FAULTS),
                        help=f"comma-separated fault kinds (default: all of {','.join(ALL_FAULTS)})"
                             "; 'none' for a run without faults")
    parser.add_argument("--lease", type=float, default=defaults.lease,
                        help="lease of every grant, seconds (default: %(default)s)")
    parser.add_argument("--permits", type=int, default=defaults.permits,
                        help="permits of the semaphore (default: %(default)s)")
    parser.add_argument("--mutex-keys", type=int, default=defaults.mutex_keys,
                        help="distinct lock keys (default: %(default)s)")
    parser.add_argument("--log-dir", type=Path, default=None,
                        help="keep the logs here (default: a temporary directory, kept only "
                             "when there are violations)")
    parser.add_argument("--details", type=int, default=3,
                        help="violations shown in full per invariant")
    args = parser.parse_args(argv)
    faults = () if args.faults == "none" else tuple(
        k.strip() for k in args.faults.split(",") if k.strip())
    try:
        cfg = replace(defaults, seconds=args.seconds, processes=args.processes,
                      threads=args.threads, faults=faults, lease=args.lease,
                      permits=args.permits, mutex_keys=args.mutex_keys, log_dir=args.log_dir,
                      seed=random.randrange(2**31) if args.seed is None else args.seed)
    except ValueError as exc:
        parser.error(str(exc))
    report = run_chaos(cfg)
    print(report.format(details=args.details))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
