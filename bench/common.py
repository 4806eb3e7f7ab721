"""Shared pieces of the benchmark sections: the Redis server, command counting, targets, tables."""

from __future__ import annotations

import math
import os
import secrets
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

# Connection set-up and the bench's own probes: never counted as a contender's round trips.
IGNORED_COMMANDS = frozenset(
    {"info", "hello", "client|setinfo", "client|setname", "ping", "config|resetstat", "scan"}
)


@dataclass
class BenchEnv:
    """Where the benchmarks run: the server URL, a unique key prefix, an admin client."""

    url: str
    prefix: str
    owns_server: bool
    admin: Any
    rounds: int = 3
    scale: float = 1.0  # multiplies every measuring window (BENCH_SCALE)
    notes: list[str] = field(default_factory=list)

    def client(self) -> Any:
        """A new redis-py client on the bench server (each contender gets its own)."""
        return redis.Redis.from_url(self.url)

    def key(self, *parts: object) -> str:
        return ":".join([self.prefix, *map(str, parts)])

    def seconds(self, base: float) -> float:
        return base * self.scale

    def cleanup(self) -> None:
        """Delete every key under this run's prefix (only ours: the server may be shared)."""
        batch: list[Any] = []
        for name in self.admin.scan_iter(match=f"{self.prefix}*", count=1000):
            batch.append(name)
            if len(batch) >= 500:
                self.admin.delete(*batch)
                batch.clear()
        if batch:
            self.admin.delete(*batch)


def unique_prefix() -> str:
    return f"rkbench-{os.getpid()}-{secrets.token_hex(3)}"


# ---------------------------------------------------------------------------------------------
# Counting commands with INFO commandstats


def command_calls(admin: Any) -> dict[str, int]:
    """``{command: calls}`` from INFO commandstats (includes commands run inside scripts)."""
    stats = admin.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


@dataclass(frozen=True)
class CommandProfile:
    """Which commands a contender's clients send themselves, and which run inside its scripts.

    Redis counts commands called from Lua in INFO commandstats too, so a round trip is only a
    command of ``client``: an EVALSHA counts once whatever it does inside (PUBLISH included).
    A command in neither set is counted as a round trip and reported as unexpected.
    """

    client: frozenset[str]
    scripted: frozenset[str] | None = frozenset()  # None: every command not in ``client``


@dataclass
class CallCount:
    round_trips: int
    scripted: int
    unexpected: dict[str, int]


def count_calls(
    before: dict[str, int], after: dict[str, int], profile: CommandProfile
) -> CallCount:
    trips = scripted = 0
    unexpected: dict[str, int] = {}
    for name, calls in after.items():
        delta = calls - before.get(name, 0)
        if delta <= 0 or name in IGNORED_COMMANDS:
            continue
        if name in profile.client:
            trips += delta
        elif profile.scripted is None or name in profile.scripted:
            scripted += delta
        else:
            trips += delta
            unexpected[name] = delta
    return CallCount(trips, scripted, unexpected)


# ---------------------------------------------------------------------------------------------
# Statistics and interleaving


def median(values: Iterable[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return statistics.median(vals) if vals else math.nan


def rotated(items: Sequence[Any], round_no: int) -> list[Any]:
    """``items`` rotated by the round number: every contender runs first in some round."""
    k = round_no % len(items)
    return [*items[k:], *items[:k]]


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---------------------------------------------------------------------------------------------
# Targets and tables


@dataclass
class Target:
    """One line of the verdict table: ``ours`` against ``other`` (a floor, a peer or a limit)."""

    what: str
    ours: str
    other: str
    ratio: float | None
    target: str
    passed: bool | None  # None: information only


@dataclass
class SectionResult:
    name: str
    title: str
    tables: list[tuple[str, list[str], list[list[str]]]] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None


def paired_ratio(ours: Sequence[float], other: Sequence[float]) -> float:
    """Median over rounds of ours/other within the same round (drift between rounds cancels)."""
    return median(o / t for o, t in zip(ours, other, strict=True) if t)


def at_least(what: str, ours: float, other: float, other_name: str, floor: float,
             unit: str = "/s", strict: bool = False, ratio: float | None = None) -> Target:
    """Target: ``ours / other >= floor`` (``>`` when ``strict``); ``ratio`` if given is used
    instead of ours/other (the paired per-round ratio)."""
    if ratio is None:
        ratio = ours / other if other else math.nan
    ok = ratio > floor if strict else ratio >= floor
    return Target(what, f"{ours:,.0f}{unit}", f"{other_name} {other:,.0f}{unit}", ratio,
                  f"{'>' if strict else '>='} {floor:.2f}x", bool(ok))


def at_most(what: str, ours: float, limit: float, fmt: str, other: str = "") -> Target:
    """Target: ``ours <= limit`` (an absolute bound on a quality, not a speed)."""
    ok = not math.isnan(ours) and ours <= limit
    return Target(what, fmt.format(ours), other, None, "<= " + fmt.format(limit), ok)


def info(what: str, ours: float, other: float, other_name: str, unit: str = "/s",
         ratio: float | None = None) -> Target:
    if ratio is None:
        ratio = ours / other if other else math.nan
    return Target(what, f"{ours:,.0f}{unit}", f"{other_name} {other:,.0f}{unit}", ratio, "info",
                  None)


def render_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def target_rows(targets: list[Target]) -> list[list[str]]:
    rows = []
    for t in targets:
        verdict = "info" if t.passed is None else ("PASS" if t.passed else "FAIL")
        ratio = "" if t.ratio is None else f"{t.ratio:.2f}x"
        rows.append([t.what, t.ours, t.other, ratio, t.target, verdict])
    return rows


TARGET_HEADERS = ["what", "ours", "floor/peer", "ratio", "target", "result"]


def fmt_ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.1f} ms"


def fmt_us(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1e6:.0f} us"


def fmt_num(value: float, digits: int = 2) -> str:
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


DETAIL_LEGEND = (
    "ratios are medians over rounds of ours/theirs within one round; "
    "grants/s: grants in the window per second; wait: request to grant (p50; max = median over "
    "rounds of each round's longest, worst max = longest of all rounds); handoff: from the "
    "holder's release call to the next holder's grant (p50, p90; mutex only); max/min: per-worker "
    "grant counts; RT/grant: round trips = commands the contender's clients sent (INFO "
    "commandstats delta over the window; an EVALSHA counts once, the commands it runs inside, "
    "PUBLISH included, are not counted; connection set-up and the bench's INFO are excluded); "
    "overlaps: grants made while another worker still held the lock (must be 0)."
)


Runner = Callable[[BenchEnv], SectionResult]
