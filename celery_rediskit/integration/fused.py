"""A task's claims record written and deleted inside its first acquire and last release.

On one Redis server (not a cluster) the record of what a run holds (``claims.py``) costs no
command of its own: the first acquire script writes it (``claims_mutex_acquire.lua``,
``claims_sem_acquire.lua``) and the last release script deletes it
(``claims_mutex_release.lua``, ``claims_sem_release.lua``). Each of these scripts is the
primitive's own script with the record's step in front (``-- then:``), with the same reply.
On a Redis Cluster the record lives in another slot than the lock or semaphore, so it is sent
as a command of its own beside the script, in the same round trip (``call_many``).

A queued-scope task takes its claim at ``apply_async`` with its record in one script
(``claims_queued_claim.lua``, :func:`with_claim_record`). Its run renews the claim and tries
its lock in one script
(``claims_queued_try.lua``, :func:`with_claim`), which does nothing unless the claim is the
run's (or free); its last release gives back the claim, the record and the lock in one
script (``claims_queued_release.lua``, :func:`with_forget` with ``claim``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._redis.batch import ScriptCall
from .._redis.scripts import load_script, wrapped_script

__all__ = ["with_claim", "with_claim_record", "with_forget", "with_record"]

_ACQUIRE = {"mutex_acquire": "claims_mutex_acquire", "sem_acquire": "claims_sem_acquire"}
_RELEASE = {"mutex_release": "claims_mutex_release", "sem_release": "claims_sem_release"}

Wrap = Callable[[ScriptCall], ScriptCall]


def with_record(record: tuple[Any, ...], *, only_if_free: bool = False) -> Wrap:
    """A wrapper turning an acquire script call into one that first writes ``record`` (a
    ``ClaimStore.record_command``: ``SET key text EX seconds``). ``only_if_free`` (locks
    only): write it only while the lock is free or the caller's."""
    _set, key, text, _ex, seconds = record

    def wrap(call: ScriptCall) -> ScriptCall:
        script, keys, args = call
        if script.name == "sem_acquire":
            if len(keys) != 6 or only_if_free:
                raise ValueError("a record goes with a permit's declared-permits try only")
            return load_script(_ACQUIRE[script.name]), [*keys, key], [*args, text, seconds]
        mode = "free" if only_if_free else "always"
        return load_script(_ACQUIRE[script.name]), [*keys, key], [*args, text, seconds, mode]

    return wrap


def with_claim_record(record: tuple[Any, ...]) -> Wrap:
    """A wrapper turning a queued-scope claim's try at ``apply_async`` (``mutex_acquire``,
    timeout 0) into ``claims_queued_claim.lua``: the claim tried without the queue's check
    (a claim is never waited for), and ``record`` written once the claim is the caller's."""
    _set, key, text, _ex, seconds = record

    def wrap(call: ScriptCall) -> ScriptCall:
        script, keys, args = call
        if script.name != "mutex_acquire":
            raise ValueError("a claim's record goes with a lock's try only")
        return load_script("claims_queued_claim"), [*keys, key], [*args, text, seconds]

    return wrap


def with_claim(record: tuple[Any, ...], claim_keys: list[str], claim_owner: str,
               claim_lease_ms: int) -> Wrap:
    """A wrapper turning a lock's try (``mutex_acquire``) into one script that first renews
    the queued-scope claim (``claim_keys``: its lock and fence keys) held by ``claim_owner``
    (or takes it, free) for ``claim_lease_ms``, replying ``[0, 0]`` when the claim is another
    task's; else it tries the lock and, granted, writes ``record``, replying
    ``[claim token, the lock's reply]`` (``claims_queued_try.lua``). One server only (the
    claim is in another slot than the lock)."""
    _set, key, text, _ex, seconds = record

    def wrap(call: ScriptCall) -> ScriptCall:
        script, keys, args = call
        if script.name != "mutex_acquire":
            raise ValueError("a claim goes with a lock's try only")
        return (wrapped_script("claims_queued_try", "mutex_acquire"),
                [*keys, key, *claim_keys[:2]],
                [*args, text, seconds, claim_owner, claim_lease_ms])

    return wrap


def with_forget(record: tuple[Any, ...], claim: tuple[str, str] | None = None) -> Wrap:
    """A wrapper turning a release script call into one that first deletes ``record`` (as
    ``ClaimStore.forget``: only if it still holds the text this run wrote). ``claim`` (a
    lock's release only): the queued-scope claim's lock key and owner, released in the same
    script (``claims_queued_release.lua``)."""
    _set, key, text, _ex, seconds = record

    def wrap(call: ScriptCall) -> ScriptCall:
        script, keys, args = call
        if claim is None:
            return load_script(_RELEASE[script.name]), [*keys, key], [*args, text, seconds]
        if script.name != "mutex_release":
            raise ValueError("a claim goes with a lock's release only")
        claim_key, claim_owner = claim
        return (load_script("claims_queued_release"), [*keys, key, claim_key],
                [*args, text, seconds, claim_owner])

    return wrap
