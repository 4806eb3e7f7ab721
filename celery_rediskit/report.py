"""Reading who holds what: every lock, semaphore and rate limiter under a prefix, found with
SCAN.

This is the data behind ``celery rediskit locks``; it imports nothing of Celery and works on
any redis-py client. Keys are found with ``SCAN ... MATCH ... COUNT 1000`` (never a
whole-keyspace listing, which blocks the server), on every primary of a Redis Cluster. Each
batch of resources found is then read in one round trip, with the same scripts the storages
use (``mutex_info``, ``sem_info``, ``rate_info``), so each resource's state is consistent in
itself. Rate limiters (:func:`read_rate_limiters`) are listed while they have state: used
within their last period, their budget not yet full again.

What the storages know of a holder is its owner id, ``"<host>/<pid>/<random>:<n>"``: the
report parses host and pid out of it. Task metadata (task id and name, worker, since when) is
added by the Celery integration (``celery_rediskit.integration.control``) from its claims
records, with :func:`dataclasses.replace` on the :class:`Holder` objects returned here.

Times are seconds; ``since`` is a Unix timestamp.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from ._redis.clients import check_client
from ._redis.keys import KeySpace, glob_escape
from ._redis.scripts import as_text, load_script
from .lease import LeaseKind
from .ratelimit.base import RateInfo, parse_stored, rate_info

__all__ = [
    "Holder",
    "Resource",
    "glob_escape",
    "parse_owner",
    "read_rate_limiters",
    "read_resources",
    "scan_keys",
]

SCAN_COUNT = 1000
"""``COUNT`` hint of every SCAN call: about this many keys are examined per round trip."""

_BATCH = 200  # resources read per round trip


@dataclass(frozen=True)
class Holder:
    """One holder of a lock or of a semaphore permit.

    ``owner`` is the owner id stored in Redis; ``remaining`` the seconds left of its lease
    (server clock; None if the key has no expiry, i.e. was set by hand). ``host`` and
    ``pid`` are parsed from the owner id (None when it has another form, e.g. a queued-scope
    claim ``"q:<task id>"``). The task fields are filled in by the Celery integration when a
    task holds the lease; ``stale`` is True when the holder's worker did not answer a ping,
    False when it did, None when not checked or unknown.
    """

    owner: str
    remaining: float | None
    host: str | None = None
    pid: int | None = None
    task_id: str | None = None
    task_name: str | None = None
    worker: str | None = None
    since: float | None = None
    stale: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Resource:
    """A held lock, or a semaphore, as read from Redis.

    ``key`` is the resource name (what you pass to ``lock(key)`` or ``permit(key)``),
    ``redis_key`` the Redis key read. ``kind`` is ``LeaseKind.MUTEX`` (a lock) or
    ``LeaseKind.SEMAPHORE`` (``to_dict`` names them ``"lock"`` and ``"semaphore"``). A lock has
    one holder and its current ``fencing_token``; a semaphore has ``total``, ``acquired`` and
    ``available`` permits and one :class:`Holder` per permit held.
    """

    key: str
    kind: LeaseKind
    redis_key: str
    holders: tuple[Holder, ...] = field(default_factory=tuple)
    fencing_token: int | None = None
    total: int | None = None
    acquired: int | None = None
    available: int | None = None
    parked: int = 0
    """Parked entries waiting for it (``celery_rediskit.parking``), filled in by the Celery
    integration's lock report; 0 otherwise."""

    @property
    def remaining(self) -> float | None:
        """Seconds left of the longest lease among the holders (None without holders)."""
        if any(h.remaining is None for h in self.holders):
            return None
        return max((h.remaining for h in self.holders if h.remaining is not None), default=None)

    @property
    def stale(self) -> bool:
        """True when some holder is known stale."""
        return any(h.stale for h in self.holders)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["kind"] = self.kind.resource
        data["holders"] = [h.to_dict() for h in self.holders]
        data["remaining"] = self.remaining
        data["stale"] = self.stale
        return data


def parse_owner(owner: str) -> tuple[str | None, int | None]:
    """(host, pid) of an owner id ``"<host>/<pid>/<random>:<n>"``; (None, None) otherwise."""
    process, _, _ = owner.partition(":")
    parts = process.split("/")
    if len(parts) < 3 or not parts[-2].isdigit():
        return None, None
    return "/".join(parts[:-2]), int(parts[-2])


def scan_keys(client: Any, match: str, count: int = SCAN_COUNT) -> Iterator[str]:
    """Every key matching the glob ``match``, by SCAN (each primary of a cluster in turn).

    A key may be reported twice when the keyspace is resized during the scan (SCAN's
    guarantee); callers that care deduplicate.
    """
    primaries = getattr(client, "get_primaries", None)
    clients = [node.redis_connection for node in primaries()] if primaries else [client]
    for node_client in clients:
        for key in node_client.scan_iter(match=match, count=count):
            yield as_text(key)


def _name_between(redis_key: str, head: str, tail: str) -> str | None:
    if redis_key.startswith(head) and redis_key.endswith(tail) and len(redis_key) > len(
        head + tail
    ):
        name = redis_key[len(head):len(redis_key) - len(tail)]
        if "{" not in name and "}" not in name:
            return name
    return None


def _holder(owner: str, remaining: float | None) -> Holder:
    host, pid = parse_owner(owner)
    return Holder(owner=owner, remaining=remaining, host=host, pid=pid)


def _read_locks(client: Any, keys: KeySpace, names: list[str]) -> Iterator[Resource]:
    script = load_script("mutex_info")
    for start in range(0, len(names), _BATCH):
        chunk = names[start:start + _BATCH]
        lock_keys = [keys.lock(name) for name in chunk]
        replies = script.run_many(client, [[k.lock, k.fence] for k in lock_keys])
        for name, k, (holder, pttl, fence) in zip(chunk, lock_keys, replies, strict=True):
            if not holder:
                continue  # released since the scan
            remaining = int(pttl) / 1000 if int(pttl) >= 0 else None
            yield Resource(
                key=name, kind=LeaseKind.MUTEX, redis_key=k.lock,
                holders=(_holder(as_text(holder), remaining),),
                fencing_token=int(fence) if fence else None,
            )


def _read_semaphores(client: Any, keys: KeySpace, names: list[str]) -> Iterator[Resource]:
    script = load_script("sem_info")
    for start in range(0, len(names), _BATCH):
        chunk = names[start:start + _BATCH]
        sem_keys = [keys.semaphore(name) for name in chunk]
        replies = script.run_many(
            client, [[k.holders, k.total, k.initial, k.pinned] for k in sem_keys]
        )
        for name, k, reply in zip(chunk, sem_keys, replies, strict=True):
            total, now = reply[0], int(reply[2])
            if not total:
                continue  # deleted since the scan
            holders = tuple(
                _holder(as_text(reply[i]), max(0.0, (float(reply[i + 1]) - now) / 1000))
                for i in range(4, len(reply), 2)
            )
            count = int(total)
            yield Resource(
                key=name, kind=LeaseKind.SEMAPHORE, redis_key=k.holders, holders=holders,
                total=count, acquired=len(holders), available=max(0, count - len(holders)),
            )


def read_resources(
    client: Any,
    prefix: str = "rediskit",
    pattern: str = "*",
    *,
    kinds: Iterable[LeaseKind | str] = (LeaseKind.MUTEX, LeaseKind.SEMAPHORE),
    include_idle: bool = False,
) -> list[Resource]:
    """Every held lock and every semaphore under ``prefix`` whose name matches ``pattern``.

    ``pattern`` is a glob over resource names (``*``, ``?``, ``[abc]``), applied by the
    server in SCAN's MATCH. Semaphores with no permit held are left out unless
    ``include_idle``. Locks come first, each kind sorted by key. Raises redis-py's errors
    when Redis can't be reached. ``kinds`` are :class:`LeaseKind` members or their resource
    names (``"lock"``, ``"semaphore"``).
    """
    check_client("client", client)
    space = KeySpace(prefix)
    base = glob_escape(space.prefix)
    wanted = {k if isinstance(k, LeaseKind) else LeaseKind.from_resource(k) for k in kinds}
    out: list[Resource] = []
    if LeaseKind.MUTEX in wanted:
        head, tail = f"{space.prefix}:lock:{{", "}"
        names = {
            name for key in scan_keys(client, f"{base}:lock:{{{pattern}}}")
            if (name := _name_between(key, head, tail)) is not None
        }
        out.extend(_read_locks(client, space, sorted(names)))
    if LeaseKind.SEMAPHORE in wanted:
        head, tail = f"{space.prefix}:sem:{{", "}:total"
        names = {
            name for key in scan_keys(client, f"{base}:sem:{{{pattern}}}:total")
            if (name := _name_between(key, head, tail)) is not None
        }
        out.extend(
            r for r in _read_semaphores(client, space, sorted(names))
            if include_idle or r.holders
        )
    return out




def read_rate_limiters(client: Any, prefix: str = "rediskit", pattern: str = "*") -> list[RateInfo]:
    """Every rate limiter under ``prefix`` whose name matches the glob ``pattern`` and that
    has state (used within its last period), as :class:`~.ratelimit.base.RateInfo` computed
    with the rate of its last check, sorted by name. Raises redis-py's errors when Redis
    can't be reached."""
    check_client("client", client)
    space = KeySpace(prefix)
    head, tail = f"{space.prefix}:rate:{{", "}"
    names = sorted({
        name for key in scan_keys(client, space.rate_pattern(pattern))
        if (name := _name_between(key, head, tail)) is not None
    })
    script = load_script("rate_info")
    out: list[RateInfo] = []
    for start in range(0, len(names), _BATCH):
        chunk = names[start:start + _BATCH]
        replies = script.run_many(client, [[space.rate_limiter(name)] for name in chunk])
        for name, (stored, now) in zip(chunk, replies, strict=True):
            info = rate_info(name, parse_stored(stored), int(now))
            if info.active:  # else: full again (expired) since the scan
                out.append(info)
    return out
