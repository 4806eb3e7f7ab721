"""The history checker finds each kind of violation in a hand-written log, and only those."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.faults.history import History, check, load_history

SLACK = 1.0


def grant(owner: str, t: float, stop: float, *, token: int = 1, key: str = "m0",
          kind: str = "mutex", pid: int = 1, t_req: float | None = None,
          bound: float = 5.0, lost: float | None = None) -> list[dict[str, Any]]:
    """The lines one holder writes: granted at ``t``, ``end`` at ``stop``."""
    events: list[dict[str, Any]] = [
        {"ev": "grant", "pid": pid, "kind": kind, "key": key, "owner": owner, "token": token,
         "t_req": t if t_req is None else t_req, "t": t, "bound": bound},
        {"ev": "end", "owner": owner, "t": stop},
        {"ev": "released", "owner": owner, "t": stop, "ok": True},
    ]
    if lost is not None:
        events.append({"ev": "lost", "owner": owner, "t": lost, "reason": "test"})
    return events


def fault(kind: str, start: float, end: float, pids: list[int] | None = None) -> dict[str, Any]:
    return {"ev": "fault", "kind": kind, "t_start": start, "t_end": end, "pids": pids or []}


def history_of(tmp_path: Path, *events: dict[str, Any] | list[dict[str, Any]],
               permits: int = 1) -> History:
    lines: list[dict[str, Any]] = [{"ev": "config", "permits": permits, "lease": 1.0}]
    for item in events:
        lines += item if isinstance(item, list) else [item]
    (tmp_path / "run.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    return load_history(tmp_path)


def found(history: History) -> list[str]:
    return [v.invariant for v in check(history, slack=SLACK).violations]


def test_holders_one_after_another_are_clean(tmp_path: Path) -> None:
    h = history_of(tmp_path, grant("a", 1.0, 2.0, token=1), grant("b", 2.0, 3.0, token=2),
                   grant("c", 3.5, 4.0, token=3))
    assert found(h) == []


def test_two_holders_at_once_are_caught(tmp_path: Path) -> None:
    h = history_of(tmp_path, grant("a", 1.0, 2.5, token=1), grant("b", 2.0, 3.0, token=2))
    [v] = check(h, slack=SLACK).violations
    assert v.invariant == "a"
    assert v.details["overlap"] == 0.5


def test_a_holder_told_it_lost_its_lease_stops_acting_then(tmp_path: Path) -> None:
    h = history_of(tmp_path, grant("a", 1.0, 5.0, token=1, lost=1.9),
                   grant("b", 2.0, 3.0, token=2))
    assert found(h) == []


def test_a_killed_holder_stops_acting_when_it_dies(tmp_path: Path) -> None:
    a = grant("a", 1.0, 9.0, token=1, pid=7)[:1]  # no end: killed while holding
    h = history_of(tmp_path, a, {"ev": "kill", "pid": 7, "t": 1.5},
                   grant("b", 2.0, 3.0, token=2))
    assert found(h) == []


def test_a_paused_holder_or_a_wiped_server_ends_intervals_for_the_checker(
    tmp_path: Path,
) -> None:
    h = history_of(tmp_path, grant("a", 1.0, 4.0, token=1, pid=7),
                   fault("pause", 1.5, 3.5, [7]), grant("b", 2.5, 3.0, token=2),
                   grant("c", 5.0, 8.0, token=3), fault("restart_wipe", 6.0, 6.2),
                   grant("d", 6.5, 7.0, token=4))
    assert found(h) == []


def test_more_semaphore_holders_than_permits_are_caught(tmp_path: Path) -> None:
    sem: dict[str, Any] = {"kind": "semaphore", "key": "s0", "token": 1}
    h = history_of(tmp_path, grant("a", 1.0, 3.0, **sem), grant("b", 1.5, 2.0, **sem),
                   grant("c", 2.0, 2.5, **sem), grant("d", 2.6, 2.9, **sem),
                   permits=2)
    assert found(h) == []
    h = history_of(tmp_path, grant("a", 1.0, 3.0, **sem), grant("b", 1.5, 2.5, **sem),
                   grant("c", 2.0, 2.7, **sem), permits=2)
    assert found(h) == ["b"]


def test_tokens_that_start_over_are_one_violation_counting_the_grants(
    tmp_path: Path,
) -> None:
    h = history_of(tmp_path, grant("a", 1.0, 2.0, token=7), grant("b", 3.0, 4.0, token=1),
                   grant("c", 5.0, 6.0, token=2), grant("d", 7.0, 8.0, token=8))
    [v] = check(h, slack=SLACK).violations
    assert v.invariant == "c"
    assert v.details["count"] == 2
    assert v.details["earlier"]["token"] == 7


def test_a_stale_grant_returned_after_a_newer_one_is_caught(tmp_path: Path) -> None:
    # b was granted token 5 by the server first but learned it late, after c held token 6.
    h = history_of(tmp_path, grant("c", 1.0, 1.5, token=6), grant("b", 2.0, 2.5, token=5))
    assert found(h) == ["c"]


def test_a_wait_past_its_bound_is_caught_unless_its_process_was_stopped(
    tmp_path: Path,
) -> None:
    late = grant("a", 4.5, 5.0, t_req=1.0, bound=2.0, pid=3)
    assert found(history_of(tmp_path, late)) == ["d"]
    assert found(history_of(tmp_path, late, fault("pause", 2.0, 3.0, [3]))) == []
    timeout = {"ev": "refused", "pid": 3, "kind": "mutex", "key": "m0", "owner": "x",
               "t_req": 1.0, "t": 4.5, "bound": 2.0, "outcome": "timeout"}
    assert found(history_of(tmp_path, timeout)) == ["d"]


def test_idle_workers_leaving_a_permit_held_past_a_lease_is_caught(tmp_path: Path) -> None:
    settled = {"ev": "settled", "t_idle": 10.0, "deadline": 11.5, "t_free": None,
               "leftover": {"s0": ["owner"]}}
    assert found(history_of(tmp_path, settled)) == ["e"]
    assert found(history_of(tmp_path, dict(settled, t_free=10.2))) == []


def test_a_departed_waiter_seen_holding_is_a_ghost_unless_the_network_was_faulty(
    tmp_path: Path,
) -> None:
    left = {"ev": "refused", "pid": 3, "kind": "mutex", "key": "m0", "owner": "gone",
            "t_req": 1.0, "t": 1.2, "bound": 2.0, "outcome": "interrupted"}
    seen = {"ev": "snapshot", "t_send": 1.5, "t_recv": 1.51, "kind": "mutex", "key": "m0",
            "holders": ["gone"]}
    before = dict(seen, t_send=1.1, t_recv=1.11)  # still holding before it left: fine
    assert found(history_of(tmp_path, left, before)) == []
    assert found(history_of(tmp_path, left, seen)) == ["f"]
    assert found(history_of(tmp_path, left, seen, fault("blackhole", 0.9, 1.1, [3]))) == []
    assert found(history_of(tmp_path, left, seen, fault("blackhole", 0.9, 1.1, [4]))) == ["f"]


def test_violations_name_the_faults_just_before_them(tmp_path: Path) -> None:
    h = history_of(tmp_path, fault("drop_pubsub", 0.5, 0.5, [1]),
                   grant("a", 1.0, 2.5, token=1), grant("b", 2.0, 3.0, token=2))
    [v] = check(h, slack=SLACK).violations
    assert v.faults_nearby == ("drop_pubsub[1]",)
    assert check(h, slack=SLACK).by_fault_kind() == {"a": {"drop_pubsub": 1}}


def test_a_line_cut_short_by_a_kill_is_skipped(tmp_path: Path) -> None:
    good = json.dumps(grant("a", 1.0, 2.0)[0]) + "\n"
    (tmp_path / "w.jsonl").write_text(good + '{"ev": "end", "own')
    h = load_history(tmp_path)
    assert [g.owner for g in h.grants] == ["a"]
    assert h.grants[0].t_end is None
