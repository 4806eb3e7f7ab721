"""Several scripts in one round trip: releasing a holder's leases together, and what follows.

A holder that ends several things at once (a task's lock and permits, then the record of what
it held) pays one round trip for all of them instead of one each. The scripts run in order but
not atomically: each one must be idempotent (a lease release carries its release id, see
``release.py``), since after a lost connection each is sent again on its own, through the
client's retry policy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from redis.exceptions import ConnectionError, NoScriptError, TimeoutError

from ..lease import Lease
from ..renewal import renewer
from .scripts import LuaScript, call_many

__all__ = ["PreparedRelease", "ScriptCall", "release_together", "run_scripts"]

log = logging.getLogger(__name__)

ScriptCall = tuple[LuaScript, list[str], list[Any]]
"""A script and its KEYS and ARGV."""


class _BatchReleaser(Protocol):
    """What a Redis storage offers for a release sent with others."""

    def release_call(self, key: str, owner: str, *, witness: bool = True) -> ScriptCall: ...

    def release_reply(self, reply: Any) -> bool: ...

    def renewal_key(self, key: str) -> str: ...


def _run_one(client: Any, script_call: ScriptCall) -> Any:
    script, keys, args = script_call
    try:
        return script.run(client, keys, args)
    except Exception as exc:  # returned in place, as call_many returns error replies
        return exc


def run_scripts(client: Any, calls: Sequence[ScriptCall]) -> list[Any]:
    """Run ``calls`` in order in one round trip; their replies, an error in place of a reply.

    A script the server forgot is loaded and run again; after a connection error or timeout
    (it is unknown which scripts ran) each is sent again on its own, through the client's
    retry policy: only for idempotent scripts.
    """
    commands = [("EVALSHA", script.sha, len(keys), *keys, *args)
                for script, keys, args in calls]
    try:
        replies = call_many(client, *commands)
    except (ConnectionError, TimeoutError, OSError):
        return [_run_one(client, c) for c in calls]
    for i, reply in enumerate(replies):
        if isinstance(reply, NoScriptError):
            replies[i] = _run_one(client, calls[i])  # loads the script, then runs it
    return replies


class PreparedRelease:
    """Releases of several leases (and what follows them) made ready to send: ``calls`` are
    the scripts, in order; :meth:`finish` takes their replies (errors in place). The leases
    stop being renewed when it is made (their holder is done with them)."""

    __slots__ = ("_calls", "_fuse", "_fused", "_leases", "_storages", "_then")

    def __init__(self, leases: Sequence[Lease], then: Sequence[ScriptCall] = (),
                 fuse: Callable[[ScriptCall], ScriptCall] | None = None) -> None:
        pending = [lease for lease in leases if not lease.released]
        for lease in pending:
            if lease.auto_renew:
                renewer().unregister(lease)
        self._leases = pending
        storages: list[_BatchReleaser] = [lease.storage for lease in pending]  # type: ignore[misc]
        self._storages = storages
        self._then, self._fuse = list(then), fuse
        self._fused = fuse is not None and bool(pending)
        self._calls: list[ScriptCall] | None = None  # made when first asked for

    @property
    def calls(self) -> list[ScriptCall]:
        """The release scripts, in order (the last one ``fuse``-d, else ``then`` after them)."""
        if self._calls is None:
            self._calls = self._made(witness=True)
        return self._calls

    def __bool__(self) -> bool:
        """Whether there is anything to send."""
        return bool(self._leases or self._then)

    def in_store(self) -> list[ScriptCall]:
        """:attr:`calls` as sent in the transaction that stores a task's result
        (``integration/with_result.py``): the same releases, but without release records
        (the result, stored in the same transaction, tells a re-send apart) and waking
        waiters of this process by message (``release_call(witness=False)``)."""
        return self._made(witness=False)

    def _made(self, *, witness: bool) -> list[ScriptCall]:
        calls = [storage.release_call(lease.key, lease.owner, witness=witness)
                 for storage, lease in zip(self._storages, self._leases, strict=True)]
        if self._fused and self._fuse is not None:
            calls[-1] = self._fuse(calls[-1])
        else:
            calls.extend(self._then)
        return calls

    def held(self) -> list[tuple[str, str, str]]:
        """What each lease to release holds until its release runs: (its Redis key, its
        kind's value, ``"m"`` a lock's key holding the owner or ``"s"`` a semaphore's
        holders with the owner as a member, and the owner); for a command that must run
        only after the releases (``lua/result_store.lua``)."""
        return [(storage.renewal_key(lease.key), lease.kind.value, lease.owner)
                for storage, lease in zip(self._storages, self._leases, strict=True)]

    def finish(self, replies: Sequence[Any]) -> list[Any]:
        """Take the replies of :attr:`calls`; return those of ``then`` (see
        :func:`release_together`). A lease whose release failed is logged and left as it is
        (it ends with its lease; ``release()`` may be called again)."""
        for storage, lease, reply in zip(self._storages, self._leases, replies, strict=False):
            if isinstance(reply, Exception):
                log.warning("rediskit: releasing %r failed (it ends with its lease): %r",
                            lease.key, reply)
                continue
            storage.release_reply(reply)
            lease.released = True
        return list(replies[-1:]) if self._fused else list(replies[len(self._leases):])


def release_together(client: Any, leases: Sequence[Lease], then: Sequence[ScriptCall] = (),
                     fuse: Callable[[ScriptCall], ScriptCall] | None = None) -> list[Any]:
    """Release ``leases`` (of Redis storages on ``client``) in their order, then run ``then``,
    all in one round trip; return the replies of ``then`` (errors in place).

    ``fuse``, if given, turns the last release sent into another script with the same reply
    (one that continues into the release script, doing ``then``'s work first): ``then`` is
    then not sent, and the reply returned is that release's (or, with no lease left to
    release, ``then`` is sent as it is).

    Each lease is released as by ``Lease.release()``: it stops being renewed, and is marked
    released once its release ran. One whose release failed is logged and left as it is (it
    ends with its lease; ``release()`` may be called again)."""
    prepared = PreparedRelease(leases, then, fuse)
    return prepared.finish(run_scripts(client, prepared.calls))
