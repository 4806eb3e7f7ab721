"""The history of a chaos run, and the checker of the lease core's promises over it.

What it models: every holder "acts" (would touch the protected resource) from the moment its
``acquire`` returns until it calls ``release()`` or is told its lease is lost (``on_lost``),
whichever comes first; a holder that is SIGKILLed stops acting when it dies. That is the
promise a lock makes to code that does not fence: never two such holders at once.

Two moments end a holder's acting for the checker although the holder itself did not stop,
because no lock service can promise anything past them (fencing covers them, see
``test_fencing.py``):

- its process is SIGSTOPped: a paused holder resumes believing it holds, whatever the lock
  does; its interval ends when it was stopped;
- the server is restarted without its data: the lock service forgot every grant; intervals
  open then end when the server went down (tokens must still rise across it).

The log (JSON lines; times are ``time.monotonic()``, which on Linux is one clock for every
process of the machine): workers write ``grant``, ``end`` (just before ``release()``),
``lost`` (from ``on_lost``), ``released``, ``refused`` (a wait that ended in a timeout, an
error or an interruption) and ``drained``; the chaos driver writes ``fault``, ``pause``,
``kill``, ``snapshot`` (holders read straight from the server) and ``settled``.

The invariants (``check``):

- (a) no two holders of a mutex key act at once;
- (b) no more holders of a semaphore act at once than it has permits;
- (c) fencing tokens rise strictly in grant order: a grant that starts after another ended
  carries a higher token (pairs that overlap are (a)'s business);
- (d) every wait ends, granted or not, within its bound plus ``slack`` (minus the time its
  process was stopped);
- (e) once the faults stop and the workers are idle, every permit and lock is free again within
  one lease (the driver measures it and logs ``settled``);
- (f) a waiter that left (timeout, error, interruption) while the server was reachable is never
  made a holder afterwards (a "ghost": it would keep the key for a whole lease).
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = [
    "Attempt",
    "CheckResult",
    "Fault",
    "Grant",
    "History",
    "Settled",
    "Snapshot",
    "Violation",
    "check",
    "load_history",
]

INVARIANTS = {
    "a": "two holders of a mutex key at once",
    "b": "more semaphore holders than permits",
    "c": "fencing token not rising in grant order",
    "d": "wait not ended within its bound + slack",
    "e": "permits/locks not free within a lease after the faults stopped",
    "f": "a departed waiter made a holder (ghost grant)",
}

NETWORK_FAULTS = frozenset({"delay", "blackhole", "reset", "drop_pubsub"})
SERVER_FAULTS = frozenset({"restart", "restart_wipe", "stall"})


@dataclass
class Grant:
    """One grant as its holder saw it."""

    owner: str
    pid: int
    kind: str  # "mutex" | "semaphore"
    key: str
    token: int
    t_req: float
    t_granted: float
    bound: float
    t_end: float | None = None  # release() was called
    t_lost: float | None = None  # on_lost fired
    t_dead: float | None = None  # its process was killed
    t_cut: float | None = None  # paused or forgotten by the server (see the module docstring)
    released: bool | None = None

    @property
    def stop(self) -> float:
        """When this holder stopped acting (inf if the history never says)."""
        ends = [t for t in (self.t_end, self.t_lost, self.t_dead, self.t_cut) if t is not None]
        return max(self.t_granted, min(ends)) if ends else math.inf

    def why_stopped(self) -> str:
        named = {"released": self.t_end, "lost": self.t_lost, "killed": self.t_dead,
                 "cut": self.t_cut}
        known = {name: t for name, t in named.items() if t is not None}
        return min(known, key=lambda name: known[name]) if known else "never"


@dataclass
class Attempt:
    """A wait that ended without a grant: ``outcome`` is timeout, error or interrupted."""

    owner: str
    pid: int
    kind: str
    key: str
    t_req: float
    t_out: float
    bound: float
    outcome: str
    error: str | None = None


@dataclass(frozen=True)
class Fault:
    """A fault injected from ``t_start`` to ``t_end`` (equal for instantaneous ones).

    ``pids``: the worker processes it hit; empty means all of them (server faults, or a
    network fault on every proxy)."""

    kind: str
    t_start: float
    t_end: float
    pids: tuple[int, ...] = ()
    detail: str = ""

    def hits(self, pid: int) -> bool:
        return not self.pids or pid in self.pids

    def describe(self) -> str:
        where = "all" if not self.pids else ",".join(map(str, self.pids))
        extra = f" {self.detail}" if self.detail else ""
        return f"{self.kind}[{where}]{extra}"


@dataclass(frozen=True)
class Snapshot:
    """Holders of ``key`` read straight from the server between ``t_send`` and ``t_recv``."""

    t_send: float
    t_recv: float
    kind: str
    key: str
    holders: tuple[str, ...]


@dataclass(frozen=True)
class Settled:
    """The driver's measure of (e): idle workers from ``t_idle``; everything free at
    ``t_free`` (None: not by ``deadline``), ``leftover`` what was still held then."""

    t_idle: float
    deadline: float
    t_free: float | None
    leftover: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class History:
    grants: list[Grant] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    snapshots: list[Snapshot] = field(default_factory=list)
    kills: dict[int, float] = field(default_factory=dict)
    settled: Settled | None = None
    undrained: list[int] = field(default_factory=list)  # workers that never went idle
    permits: int = 1
    lease: float = 1.0

    def pauses_of(self, pid: int) -> list[Fault]:
        return [f for f in self.faults if f.kind == "pause" and pid in f.pids]


@dataclass(frozen=True)
class Violation:
    invariant: str  # "a".."f", see INVARIANTS
    t: float
    summary: str
    details: dict[str, Any] = field(default_factory=dict)
    pids: tuple[int, ...] = ()  # the worker processes involved
    faults_nearby: tuple[str, ...] = ()

    def describe(self) -> str:
        near = ", ".join(self.faults_nearby) or "no fault nearby"
        return f"({self.invariant}) {self.summary} [near: {near}]"


@dataclass
class CheckResult:
    violations: list[Violation]
    stats: dict[str, Any]

    def by_invariant(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for v in self.violations:
            counts[v.invariant] += 1
        return dict(sorted(counts.items()))

    def by_fault_kind(self) -> dict[str, dict[str, int]]:
        """For each invariant, how many of its violations had each fault kind nearby."""
        table: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for v in self.violations:
            kinds = {near.split("[", 1)[0] for near in v.faults_nearby} or {"none"}
            for kind in kinds:
                table[v.invariant][kind] += 1
        return {inv: dict(sorted(kinds.items())) for inv, kinds in sorted(table.items())}


# ---- the log ------------------------------------------------------------------------------


def read_events(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON lines of ``path``; a line cut short by a kill is skipped."""
    with path.open() as stream:
        for line in stream:
            if line.endswith("\n"):
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue


def load_history(log_dir: Path) -> History:
    """Build the history from every ``*.jsonl`` file in ``log_dir``."""
    history = History()
    grants: dict[str, Grant] = {}
    late: list[dict[str, Any]] = []  # end/lost/released lines, applied once grants are known
    for path in sorted(log_dir.glob("*.jsonl")):
        for ev in read_events(path):
            kind = ev["ev"]
            if kind == "grant":
                grants[ev["owner"]] = Grant(
                    owner=ev["owner"], pid=ev["pid"], kind=ev["kind"], key=ev["key"],
                    token=ev["token"], t_req=ev["t_req"], t_granted=ev["t"],
                    bound=ev["bound"],
                )
            elif kind in ("end", "lost", "released"):
                late.append(ev)
            elif kind == "refused":
                history.attempts.append(Attempt(
                    owner=ev["owner"], pid=ev["pid"], kind=ev["kind"], key=ev["key"],
                    t_req=ev["t_req"], t_out=ev["t"], bound=ev["bound"],
                    outcome=ev["outcome"], error=ev.get("error"),
                ))
            elif kind == "fault":
                history.faults.append(Fault(ev["kind"], ev["t_start"], ev["t_end"],
                                            tuple(ev.get("pids", ())), ev.get("detail", "")))
            elif kind == "kill":
                history.kills[ev["pid"]] = ev["t"]
            elif kind == "snapshot":
                history.snapshots.append(Snapshot(ev["t_send"], ev["t_recv"], ev["kind"],
                                                  ev["key"], tuple(ev["holders"])))
            elif kind == "settled":
                history.settled = Settled(ev["t_idle"], ev["deadline"], ev["t_free"],
                                          ev.get("leftover", {}))
            elif kind == "config":
                history.permits = ev["permits"]
                history.lease = ev["lease"]
            elif kind == "undrained":
                history.undrained.append(ev["pid"])
    for ev in late:
        grant = grants.get(ev["owner"])
        if grant is None:
            continue
        if ev["ev"] == "end":
            grant.t_end = ev["t"]
        elif ev["ev"] == "lost":
            grant.t_lost = ev["t"] if grant.t_lost is None else min(grant.t_lost, ev["t"])
        else:
            grant.released = ev.get("ok")
    history.grants = sorted(grants.values(), key=lambda g: g.t_granted)
    apply_cuts(history)
    return history


def apply_cuts(history: History) -> None:
    """End intervals at kills, pauses and data-losing restarts (see the module docstring)."""
    for grant in history.grants:
        dead = history.kills.get(grant.pid)
        if dead is not None and dead >= grant.t_granted:
            grant.t_dead = dead
        for fault in history.faults:
            if fault.kind not in ("pause", "restart_wipe") or not fault.hits(grant.pid):
                continue
            # Open during the fault: granted before it ended, not stopped before it began.
            if grant.t_granted < fault.t_end and grant.stop > fault.t_start:
                cut = max(grant.t_granted, fault.t_start)
                grant.t_cut = cut if grant.t_cut is None else min(grant.t_cut, cut)


# ---- the invariants -----------------------------------------------------------------------


def check(history: History, *, slack: float) -> CheckResult:
    """Check invariants (a)-(f); ``slack`` is the seconds (d) allows past a wait's bound."""
    violations: list[Violation] = []
    violations += check_mutual_exclusion(history)
    violations += check_permits(history)
    violations += check_tokens(history)
    violations += check_bounds(history, slack)
    violations += check_settled(history)
    violations += check_ghosts(history)
    violations = [_with_context(v, history) for v in violations]
    violations.sort(key=lambda v: v.t)
    return CheckResult(violations, stats(history))


def _by_key(grants: Iterable[Grant], kind: str) -> dict[str, list[Grant]]:
    out: dict[str, list[Grant]] = defaultdict(list)
    for grant in grants:
        if grant.kind == kind:
            out[grant.key].append(grant)
    for group in out.values():
        group.sort(key=lambda g: g.t_granted)
    return out


def _grant_detail(g: Grant) -> dict[str, Any]:
    return {"owner": g.owner, "pid": g.pid, "token": g.token, "t_req": round(g.t_req, 4),
            "t_granted": round(g.t_granted, 4),
            "stop": round(g.stop, 4) if g.stop != math.inf else None,
            "stopped_by": g.why_stopped(),
            "waited": round(g.t_granted - g.t_req, 4)}


def check_mutual_exclusion(history: History) -> list[Violation]:
    """(a): for each mutex key, no grant starts while another still acts."""
    found: list[Violation] = []
    for key, grants in _by_key(history.grants, "mutex").items():
        active: list[Grant] = []
        for g in grants:
            active = [a for a in active if a.stop > g.t_granted]
            for a in active:
                overlap = min(a.stop, g.stop) - g.t_granted
                found.append(Violation(
                    "a", g.t_granted,
                    f"mutex {key!r}: {g.owner} (token {g.token}) granted while {a.owner} "
                    f"(token {a.token}) still acted, overlapping {overlap:.3f} s",
                    {"key": key, "first": _grant_detail(a), "second": _grant_detail(g),
                     "overlap": round(overlap, 4)},
                    (a.pid, g.pid),
                ))
            active.append(g)
    return found


def check_permits(history: History) -> list[Violation]:
    """(b): for each semaphore, at most ``permits`` holders act at any moment."""
    found: list[Violation] = []
    for key, grants in _by_key(history.grants, "semaphore").items():
        active: list[Grant] = []
        for g in grants:
            active = [a for a in active if a.stop > g.t_granted]
            active.append(g)
            if len(active) > history.permits:
                found.append(Violation(
                    "b", g.t_granted,
                    f"semaphore {key!r}: {len(active)} holders at once with "
                    f"{history.permits} permits (newest {g.owner})",
                    {"key": key, "holders": [_grant_detail(a) for a in active]},
                    tuple(a.pid for a in active),
                ))
    return found


def check_tokens(history: History) -> list[Violation]:
    """(c): a grant that starts after another grant of the key stopped has a higher token.

    Grants that fall below the same earlier token one after another (tokens that started
    over, say) make one violation, which counts them."""
    found: list[Violation] = []
    for key, grants in _by_key(history.grants, "mutex").items():
        by_stop = sorted(grants, key=lambda g: g.stop)
        best: Grant | None = None  # highest token among grants stopped so far
        run: list[Grant] = []  # consecutive grants not above ``best``
        i = 0
        for g in grants:  # in start order
            previous = best
            while i < len(by_stop) and by_stop[i].stop < g.t_granted:
                if best is None or by_stop[i].token > best.token:
                    best = by_stop[i]
                i += 1
            if best is not previous:
                found += _token_run(key, run, previous)
            if best is not None and best.token >= g.token:
                run.append(g)
            else:
                found += _token_run(key, run, best)
        found += _token_run(key, run, best)
    return found


def _token_run(key: str, run: list[Grant], against: Grant | None) -> list[Violation]:
    """One (c) violation for the grants in ``run`` (emptied), all not above ``against``."""
    if not run or against is None:
        run.clear()
        return []
    first = run[0]
    tokens = sorted(g.token for g in run)
    violation = Violation(
        "c", first.t_granted,
        f"mutex {key!r}: {len(run)} grant(s) with tokens {tokens[0]}..{tokens[-1]} started "
        f"after token {against.token} ({against.owner}) had stopped",
        {"key": key, "earlier": _grant_detail(against), "first_later": _grant_detail(first),
         "count": len(run)},
        (against.pid, *sorted({g.pid for g in run})),
    )
    run.clear()
    return [violation]


def _paused_during(history: History, pid: int, start: float, end: float) -> float:
    return sum(max(0.0, min(end, p.t_end) - max(start, p.t_start))
               for p in history.pauses_of(pid))


def check_bounds(history: History, slack: float) -> list[Violation]:
    """(d): every wait ends within its bound + ``slack``, not counting time stopped."""
    found: list[Violation] = []
    ended: list[tuple[str, str, int, str, float, float, float]] = [
        ("granted", g.owner, g.pid, g.key, g.t_req, g.t_granted, g.bound)
        for g in history.grants
    ]
    ended += [(a.outcome, a.owner, a.pid, a.key, a.t_req, a.t_out, a.bound)
              for a in history.attempts if a.outcome != "interrupted"]
    for outcome, owner, pid, key, t_req, t_out, bound in ended:
        took = t_out - t_req - _paused_during(history, pid, t_req, t_out)
        if took > bound + slack:
            found.append(Violation(
                "d", t_out,
                f"{key!r}: the wait of {owner} ended ({outcome}) after {took:.3f} s, "
                f"bound {bound:.3f} s + slack {slack:.3f} s",
                {"key": key, "owner": owner, "pid": pid, "outcome": outcome,
                 "took": round(took, 4), "bound": round(bound, 4), "t_req": round(t_req, 4)},
                (pid,),
            ))
    for pid in history.undrained:
        found.append(Violation("d", math.inf, f"worker {pid} never finished its last wait or "
                               "hold after being asked to stop", {"pid": pid}, (pid,)))
    return found


def check_settled(history: History) -> list[Violation]:
    """(e): the driver found every permit and lock free within a lease of going idle."""
    s = history.settled
    if s is None or s.t_free is not None:
        return []
    return [Violation(
        "e", s.deadline,
        f"still held {s.deadline - s.t_idle:.3f} s after the workers went idle: "
        f"{s.leftover}", {"leftover": s.leftover},
    )]


def check_ghosts(history: History) -> list[Violation]:
    """(f): an owner whose wait ended without a grant is never seen holding afterwards,
    unless a fault could have delivered a stale request for it (network or server trouble
    between its request and its departure)."""
    found: list[Violation] = []
    seen: dict[tuple[str, str], list[Snapshot]] = defaultdict(list)
    for snap in history.snapshots:
        for owner in snap.holders:
            seen[(snap.key, owner)].append(snap)
    for a in history.attempts:
        snaps = [s for s in seen.get((a.key, a.owner), []) if s.t_send > a.t_out]
        if not snaps:
            continue
        excused = [f for f in history.faults
                   if (f.kind in NETWORK_FAULTS - {"drop_pubsub"} or f.kind in SERVER_FAULTS)
                   and f.hits(a.pid) and f.t_start <= a.t_out and f.t_end >= a.t_req]
        if excused:
            continue
        held = snaps[-1].t_recv - snaps[0].t_send
        found.append(Violation(
            "f", snaps[0].t_send,
            f"{a.kind} {a.key!r}: {a.owner} left its wait ({a.outcome}"
            f"{': ' + a.error if a.error else ''}) and was then seen holding for "
            f"{held:.3f} s",
            {"key": a.key, "owner": a.owner, "pid": a.pid, "outcome": a.outcome,
             "t_out": round(a.t_out, 4), "first_seen": round(snaps[0].t_send, 4),
             "held_for": round(held, 4)},
            (a.pid,),
        ))
    return found


PERSISTENT_FAULTS = frozenset({"drop_pubsub"})  # their effect lasts as long as the process


def _with_context(v: Violation, history: History) -> Violation:
    """Name the faults active in the two leases before the violation (effects lag), and any
    earlier fault whose effect persists (a dropped wake-up connection) in a process involved."""
    if v.t == math.inf:
        return v
    since = v.t - 2 * history.lease
    near = tuple(
        f.describe() for f in history.faults
        if f.t_start <= v.t and (
            f.t_end >= since
            or (f.kind in PERSISTENT_FAULTS and any(f.hits(pid) for pid in v.pids))
        )
    )
    return replace(v, faults_nearby=near)


# ---- numbers for the report ---------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def stats(history: History) -> dict[str, Any]:
    """Counts and latencies: grants, outcomes, losses, and the wake-up latency after a
    release (from a holder's ``release()`` to the next grant of a waiter already waiting)."""
    outcomes: dict[str, int] = defaultdict(int)
    errors: dict[str, int] = defaultdict(int)
    for a in history.attempts:
        outcomes[a.outcome] += 1
        if a.error:
            errors[a.error.split(":", 1)[0]] += 1
    handoffs: list[float] = []
    for grants in _by_key(history.grants, "mutex").values():
        for prev, nxt in zip(grants, grants[1:], strict=False):
            if prev.t_end is not None and prev.why_stopped() == "released" and (
                nxt.t_req < prev.t_end <= nxt.t_granted
            ):
                handoffs.append(nxt.t_granted - prev.t_end)
    waits = [g.t_granted - g.t_req for g in history.grants]
    faults: dict[str, int] = defaultdict(int)
    for f in history.faults:
        faults[f.kind] += 1
    return {
        "grants": len(history.grants),
        "grants_by_kind": {k: sum(1 for g in history.grants if g.kind == k)
                           for k in ("mutex", "semaphore")},
        "lost": sum(1 for g in history.grants if g.t_lost is not None),
        "outcomes": dict(outcomes),
        "errors": dict(errors),
        "faults": dict(sorted(faults.items())),
        "kills": len(history.kills),
        "wait_p50": round(statistics.median(waits), 4) if waits else 0.0,
        "wait_max": round(max(waits), 4) if waits else 0.0,
        "handoff_p50": round(_percentile(handoffs, 0.5), 4),
        "handoff_p99": round(_percentile(handoffs, 0.99), 4),
        "handoff_max": round(max(handoffs), 4) if handoffs else 0.0,
    }
