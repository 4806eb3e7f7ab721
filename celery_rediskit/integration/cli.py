"""``celery -A proj rediskit ...``: see and repair locks, semaphores, rate limiters and the cache
from a shell.

Installed through the ``celery.commands`` entry point (see ``pyproject.toml``), so it appears
in ``celery --help``. Every command reads and writes Redis directly (the app's
``rediskit_url`` and ``rediskit_prefix``): no worker needs to run. Exit status: 0 on success;
1 with a one-line message when Redis can't be reached, a key does not exist or the operator
declines; 2 for an invalid argument.

Importing this module also registers ``celery inspect rediskit_leases`` in the CLI process.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from importlib import import_module
from typing import Any, NoReturn

import click
import redis
from celery.bin.base import CeleryCommand
from redis.backoff import NoBackoff
from redis.retry import Retry

from .._validate import resource_key
from ..cache import CacheUnavailable, RedisCacheProvider
from ..errors import RedisKitError
from ..lease import LeaseKind
from ..mutex.redis import RedisMutexStorage
from ..ratelimit import RateInfo
from ..ratelimit.redis import RedisRateLimitStorage
from ..report import Holder, Resource, glob_escape, read_rate_limiters, scan_keys
from ..semaphore.redis import RedisSemaphoreStorage
from . import control
from .runtime import kit_of, make_client

__all__ = ["rediskit"]

# `celery inspect rediskit_leases` must be known to the command line that sends it.
control.register()

class Failure(click.ClickException):
    """A one-line error (``Error: ...`` on stderr), exit status 1."""

    exit_code = 1


class InvalidArgument(Failure):
    """A one-line error about an argument, exit status 2 (click's usage errors show usage)."""

    exit_code = 2


def _fail(message: str, exit_code: int = 1) -> NoReturn:
    raise (InvalidArgument if exit_code == 2 else Failure)(message)


class PositiveInt(click.ParamType):  # type: ignore[type-arg]
    """An integer >= 1; a bad value is a one-line error with exit status 2."""

    name = "N"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            n = int(value)
        except (TypeError, ValueError):
            n = 0
        if n < 1 or str(value).strip() not in (str(n), f"+{n}"):
            opt = param.opts[0] if param is not None and param.opts else "value"
            _fail(f"{opt} must be a whole number >= 1, got {value!r}", 2)
        return n


# -- context ---------------------------------------------------------------------------------

class Ops:
    """The app's settings and a Redis client for one command (short timeouts, no retries)."""

    def __init__(self, ctx: click.Context) -> None:
        app = ctx.obj.app if ctx.obj is not None else None
        if app is None:
            _fail("no Celery app: run as 'celery -A proj rediskit ...'")
        try:
            kit = kit_of(app)
        except RedisKitError as exc:
            _fail(str(exc))
        self.app = app
        self.settings = kit.settings
        self.prefix = kit.settings.prefix
        if kit.ready_client is not None:  # RedisKit(app, client=...): the app's own client
            self.client = kit.ready_client
        else:  # the app's client, with short timeouts and no retries
            try:
                self.client = make_client(
                    kit.settings, timeout=min(kit.settings.socket_timeout, 3.0),
                    retry=Retry(NoBackoff(), 0),
                )
            except (redis.ConnectionError, redis.TimeoutError) as exc:  # a cluster's layout
                _fail(f"cannot reach Redis at {kit.settings.url}: {exc}")

    @property
    def where(self) -> str:
        pool = getattr(self.client, "connection_pool", None)
        if pool is None:  # a cluster client: its seed node
            return str(self.settings.url)
        kwargs = pool.connection_kwargs
        if "path" in kwargs:
            return f"unix://{kwargs['path']}"
        service = getattr(pool, "service_name", None)
        if service is not None:
            return f"Sentinel master {service!r} ({self.settings.url})"
        return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"

    @contextmanager
    def redis_errors(self) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            _fail(f"cannot reach Redis at {self.where}: {exc}")
        except redis.RedisError as exc:
            _fail(f"Redis error: {exc}")

    def resource_name(self, key: str) -> str:
        """The resource name of ``key``: a name, or a Redis key as ``locks`` prints it."""
        for head, tails in ((f"{self.prefix}:lock:{{", ("}",)),
                            (f"{self.prefix}:sem:{{", ("}:holders", "}:total", "}")),
                            (f"{self.prefix}:rate:{{", ("}",))):
            if key.startswith(head):
                for tail in tails:
                    if key.endswith(tail):
                        return key[len(head):len(key) - len(tail)]
        try:
            return resource_key(key)
        except RedisKitError as exc:
            _fail(f"invalid key: {exc}", 2)


def _ops(ctx: click.Context) -> Ops:
    return Ops(ctx)


def _json_out(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


# -- formatting ------------------------------------------------------------------------------

def _seconds(value: float | None) -> str:
    if value is None:
        return "no expiry"
    if value >= 120:
        return f"{value / 60:.1f}m"
    return f"{value:.1f}s"


def _since(value: float | None, now: float) -> str:
    if value is None:
        return "-"
    stamp = datetime.fromtimestamp(value).strftime("%Y-%m-%d %H:%M:%S")
    return f"{stamp} ({_seconds(max(0.0, now - value))} ago)"


def _who(h: Holder) -> str:
    if h.task_name or h.task_id:
        return f"{h.task_name or '?'}[{h.task_id or '?'}]"
    return h.owner


def _state(h: Holder) -> str:
    if h.stale:
        return "STALE"
    if h.stale is False:
        return "ok"
    if h.owner.startswith("q:") and not h.worker:
        return "queued"
    return "-"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _render(resources: list[Resource]) -> str:
    now = time.time()
    header = ["KIND", "KEY", "HOLDER", "WORKER", "PID", "SINCE", "LEASE", "TOKEN", "STATE"]
    rows = [header]
    for r in resources:
        if r.kind is LeaseKind.MUTEX:
            h = r.holders[0]
            rows.append(["lock", r.key, _who(h), h.worker or h.host or "-",
                         str(h.pid or "-"), _since(h.since, now), _seconds(h.remaining),
                         str(r.fencing_token or "-"), _state(h)])
            if r.parked:
                rows.append(["  parked", "", f"{r.parked} task(s) waiting", "", "", "", "",
                             "", ""])
            continue
        rows.append(["semaphore", r.key,
                     f"{r.acquired}/{r.total} held, {r.available} available",
                     "", "", "", "", "", "STALE" if r.stale else ""])
        for h in r.holders:
            rows.append(["  permit", "", _who(h), h.worker or h.host or "-",
                         str(h.pid or "-"), _since(h.since, now), _seconds(h.remaining),
                         "", _state(h)])
        if r.parked:
            rows.append(["  parked", "", f"{r.parked} task(s) waiting", "", "", "", "", "",
                         ""])
    return _table(rows)


# -- the commands ----------------------------------------------------------------------------

@click.group(name="rediskit")
@click.pass_context
def rediskit(ctx: click.Context) -> None:
    """celery-rediskit: see and repair locks, semaphores and the cache."""


@rediskit.command(cls=CeleryCommand)
@click.option("--pattern", default="*", show_default=True,
              help="Glob over resource names (*, ?, [abc]).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--all", "include_idle", is_flag=True,
              help="Also list semaphores with no permit held.")
@click.option("--no-ping", is_flag=True, help="Do not ping workers (no stale check).")
@click.option("--ping-timeout", type=float, default=1.0, show_default=True,
              help="Seconds to wait for the holders' workers to answer.")
@click.pass_context
def locks(ctx: click.Context, pattern: str, as_json: bool, include_idle: bool,
          no_ping: bool, ping_timeout: float) -> None:
    """Every held lock and semaphore under the app's prefix, and who holds it.

    A holder whose worker does not answer a ping is marked STALE; holders with no known
    worker (a queued message, a lock taken outside a task) are not checked.
    """
    ops = _ops(ctx)
    with ops.redis_errors():
        report = control.lock_report(ops.app, pattern, ping=not no_ping,
                                     ping_timeout=ping_timeout, include_idle=include_idle,
                                     client=ops.client)
    if report.ping_error:
        click.echo(f"warning: could not ping workers ({report.ping_error}): "
                   "stale holders are not marked", err=True)
    elif report.workers_checked and not report.workers_alive:
        click.echo("warning: no worker answered the ping: their holders are marked STALE",
                   err=True)
    if as_json:
        _json_out([r.to_dict() for r in report.resources])
        return
    if not report.resources:
        click.echo(f"nothing held under prefix {ops.prefix!r}"
                   + (f" matching {pattern!r}" if pattern != "*" else ""))
        return
    click.echo(_render(report.resources))


@rediskit.command(cls=CeleryCommand)
@click.argument("key")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--kind", type=click.Choice(["lock", "semaphore"]),
              help="Which resource, when a lock and a semaphore share the name.")
@click.option("--holder", "owner", metavar="OWNER",
              help="Semaphore: release only this holder's permit (owner id, see --json).")
@click.pass_context
def release(ctx: click.Context, key: str, yes: bool, kind: str | None,
            owner: str | None) -> None:
    """Force-release lock KEY, or the permits held on semaphore KEY.

    The holder is not told at once: its next renewal finds the lease gone (its task sees
    ``self.lease.lost`` and the ``lease_lost`` signal).
    """
    ops = _ops(ctx)
    name = ops.resource_name(key)
    mutexes = RedisMutexStorage(ops.client, prefix=ops.prefix, idle_ttl=ops.settings.idle_ttl)
    sems = RedisSemaphoreStorage(ops.client, prefix=ops.prefix, idle_ttl=ops.settings.idle_ttl)
    with ops.redis_errors():
        lock = mutexes.get_lock_info(name)
        sem = sems.get_semaphore_info(name)
    lock_held = lock.locked and kind in (None, "lock")
    sem_held = bool(sem.holders) and kind in (None, "semaphore")
    if lock_held and sem_held:
        _fail(f"both a lock and a semaphore named {name!r} are held: pass --kind", 2)
    if not lock_held and not sem_held:
        what = {"lock": "held lock", "semaphore": "semaphore with permits held"}.get(
            kind or "", "held lock or semaphore")
        _fail(f"no {what} named {name!r} under prefix {ops.prefix!r}")
    if lock_held:
        if not yes:
            click.confirm(f"Force-release lock {name!r} held by {lock.holder} "
                          f"(lease {_seconds(lock.ttl)} left)?", abort=True)
        with ops.redis_errors():
            done = mutexes.force_release(name)
        click.echo(f"released lock {name!r}" if done else f"lock {name!r} was already free")
        return
    targets = list(sem.holders)
    if owner is not None:
        if owner not in sem.holders:
            _fail(f"{owner!r} holds no permit of semaphore {name!r}")
        targets = [owner]
    if not yes:
        click.confirm(f"Release {len(targets)} permit(s) of semaphore {name!r} "
                      f"({sem.acquired}/{sem.total} held)?", abort=True)
    with ops.redis_errors():
        released = sum(1 for o in targets if sems.release(name, o))
    click.echo(f"released {released} permit(s) of semaphore {name!r}")


@rediskit.command(cls=CeleryCommand)
@click.argument("key")
@click.option("--set", "set_to", type=PositiveInt(),
              help="Set the total (and the initial); it wins over tasks' declared permits "
                   "until --reset.")
@click.option("--increase", type=PositiveInt(),
              help="Add N permits; the total wins over declared permits until --reset.")
@click.option("--decrease", type=PositiveInt(),
              help="Remove N permits (never below 0); the total wins over declared permits "
                   "until --reset.")
@click.option("--reset", is_flag=True,
              help="Back to the initial total; tasks' declared permits apply again at their "
                   "next acquire.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def permits(ctx: click.Context, key: str, set_to: int | None, increase: int | None,
            decrease: int | None, reset: bool, as_json: bool) -> None:
    """Show or change the permits of semaphore KEY.

    Without an option, prints the semaphore. Holders keep their permits; a change that frees
    permits hands them to waiters at once. A total set here is the operator's: tasks'
    ``concurrency_limit`` permits no longer change it until --reset.
    """
    ops = _ops(ctx)
    name = ops.resource_name(key)
    chosen = [opt for opt, v in (("--set", set_to), ("--increase", increase),
                                 ("--decrease", decrease), ("--reset", reset or None))
              if v is not None]
    if len(chosen) > 1:
        _fail(f"choose one of --set, --increase, --decrease, --reset (got {', '.join(chosen)})",
              2)
    sems = RedisSemaphoreStorage(ops.client, prefix=ops.prefix, idle_ttl=ops.settings.idle_ttl)
    with ops.redis_errors():
        before = sems.get_semaphore_info(name)
        if not before.initialized:
            _fail(f"no semaphore named {name!r} under prefix {ops.prefix!r}")
        if set_to is not None:
            sems.initialize(name, set_to)
        elif increase is not None:
            sems.increase_permits(name, increase)
        elif decrease is not None:
            sems.decrease_permits(name, decrease)
        elif reset:
            sems.reset(name)
        after = sems.get_semaphore_info(name)
    if as_json:
        _json_out({"key": name, "total": after.total, "acquired": after.acquired,
                   "available": after.available, "previous_total": before.total,
                   "set_by_operator": after.pinned})
        return
    change = f"{before.total} -> {after.total}" if chosen else str(after.total)
    click.echo(f"semaphore {name!r}: total {change}, {after.acquired} acquired, "
               f"{after.available} available")
    if after.pinned:
        click.echo("the total was set by an operator: tasks' declared permits do not change "
                   "it until --reset")
    elif reset:
        click.echo("tasks' declared permits apply again at their next acquire")


def _render_rates(infos: list[RateInfo]) -> str:
    rows = [["KEY", "RATE", "BURST", "BUDGET LEFT", "NEXT FREE SLOT", "FULL AGAIN IN"]]
    for i in infos:
        rows.append([i.key, i.rate, str(i.burst), f"{i.remaining}/{i.burst}",
                     "now" if i.next_free <= 0 else f"in {i.next_free:.3f}s",
                     _seconds(i.full_in)])
    return _table(rows)


@rediskit.command(cls=CeleryCommand)
@click.argument("key", required=False)
@click.option("--pattern", default="*", show_default=True,
              help="Glob over limiter names (*, ?, [abc]), when no KEY is given.")
@click.option("--reset", is_flag=True,
              help="Reset limiter KEY: its whole burst is free at once.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def rates(ctx: click.Context, key: str | None, pattern: str, reset: bool,
          as_json: bool) -> None:
    """The global rate limiters: each one's rate, budget left and next free slot.

    Without KEY, every limiter under the app's prefix that was used within its period (a
    limiter whose budget is full again keeps no state). With KEY, that limiter; with
    --reset, its state is deleted, so its whole burst is free at once.
    """
    ops = _ops(ctx)
    if key is None:
        if reset:
            _fail("--reset needs the KEY of the limiter to reset", 2)
        with ops.redis_errors():
            infos = read_rate_limiters(ops.client, ops.prefix, pattern)
        if as_json:
            _json_out([i.to_dict() for i in infos])
        elif not infos:
            click.echo(f"no active rate limiter under prefix {ops.prefix!r}"
                       + (f" matching {pattern!r}" if pattern != "*" else ""))
        else:
            click.echo(_render_rates(infos))
        return
    name = ops.resource_name(key)
    storage = RedisRateLimitStorage(ops.client, prefix=ops.prefix)
    with ops.redis_errors():
        info = storage.get_rate_info(name)
        done = storage.reset(name) if reset else False
    if reset:
        if as_json:
            _json_out({"key": name, "reset": done, "before": info.to_dict()})
        elif done:
            click.echo(f"reset rate limiter {name!r} ({info.rate}): its burst of {info.burst} "
                       f"is free")
        else:
            click.echo(f"rate limiter {name!r} had no state: its budget was already full")
        return
    if not info.active:
        _fail(f"no active rate limiter named {name!r} under prefix {ops.prefix!r} (unused "
              f"within its period: its whole budget is free)")
    if as_json:
        _json_out(info.to_dict())
        return
    click.echo(_render_rates([info]))


@rediskit.group()
def cache() -> None:
    """The shared result cache under the app's prefix."""


@cache.command("clear", cls=CeleryCommand)
@click.option("--tag", help="Drop only the entries with this tag.")
@click.pass_context
def cache_clear(ctx: click.Context, tag: str | None) -> None:
    """Delete every cached entry (or those tagged TAG). Found with SCAN under the prefix only."""
    ops = _ops(ctx)
    with ops.redis_errors():
        ops.client.ping()  # fail here, in one line, rather than through the cache's breaker
    provider = RedisCacheProvider(ops.client, prefix=ops.prefix, idle_ttl=ops.settings.idle_ttl)
    try:
        with ops.redis_errors():
            if tag is not None:
                n = provider.revalidate_tag(tag)
                click.echo(f"dropped {n} entr{'y' if n == 1 else 'ies'} tagged {tag!r}")
            else:
                n = provider.clear()
                click.echo(f"deleted {n} cache key(s) under prefix {ops.prefix!r}")
    except CacheUnavailable as exc:
        _fail(f"cannot reach Redis at {ops.where}: {exc}")
    except RedisKitError as exc:
        _fail(str(exc), 2)


@cache.command("stats", cls=CeleryCommand)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--top", type=PositiveInt(), default=10, show_default=True,
              help="How many functions to list by entry count.")
@click.pass_context
def cache_stats(ctx: click.Context, as_json: bool, top: int) -> None:
    """Count cached entries (by function), tags and computations in flight."""
    ops = _ops(ctx)
    base = glob_escape(ops.prefix)
    entry_head = f"{ops.prefix}:cache:e:{{cache/"
    by_function: dict[str, int] = {}
    entries = tags = filling = 0
    with ops.redis_errors():
        for key in scan_keys(ops.client, f"{base}:cache:e:*"):
            entries += 1
            name = key[len(entry_head):-1] if key.startswith(entry_head) else key
            function = name.rpartition(":")[0] or name
            by_function[function] = by_function.get(function, 0) + 1
        tags = sum(1 for _ in scan_keys(ops.client, f"{base}:cache:t:*"))
        filling = sum(1 for _ in scan_keys(ops.client, f"{base}:lock:{{cache/*}}"))
    ranked = sorted(by_function.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    if as_json:
        _json_out({"prefix": ops.prefix, "entries": entries, "tags": tags,
                   "filling": filling, "by_function": dict(ranked)})
        return
    click.echo(f"prefix {ops.prefix!r}: {entries} entries, {tags} tag sets, "
               f"{filling} being computed")
    if ranked:
        click.echo(_table([["ENTRIES", "FUNCTION"]]
                          + [[str(n), fn] for fn, n in ranked]))


@rediskit.command(cls=CeleryCommand)
@click.option("--port", type=click.IntRange(0, 65535), default=None,
              help="TCP port to serve the metrics on (0: any free port, printed).")
@click.option("--address", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--once", is_flag=True,
              help="Print the metrics once (Prometheus text format) and exit.")
@click.pass_context
def metrics(ctx: click.Context, port: int | None, address: str, once: bool) -> None:
    """Serve the gauges read from Redis (permits total and held, locks held, by declared
    name) for Prometheus at http://ADDRESS:PORT/metrics, until interrupted. Each scrape reads
    Redis with SCAN under the prefix. Needs prometheus_client (celery-rediskit[metrics])."""
    if port is None and not once:
        _fail("--port is required (or --once to print the metrics once)", 2)
    try:  # the [metrics] extra (prometheus_client) is loaded only when asked for
        serve_gauges = import_module(f"{__package__}.exporter").serve_gauges
    except ImportError as exc:
        _fail(f"'rediskit metrics' needs prometheus_client "
              f"(pip install 'celery-rediskit[metrics]'): {exc}")
    ops = _ops(ctx)
    with ops.redis_errors():
        ops.client.ping()
        serve_gauges(ops.app, ops.client, ops.prefix, address, port, once, click.echo)
