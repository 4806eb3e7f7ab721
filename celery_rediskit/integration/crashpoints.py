"""Named crash points, for the crash tests only: ``RK_TEST_CRASH_AT=<point>[,<point>...]``.

At a named point the process kills itself with SIGKILL, and with it the whole worker (its
process group) when the worker runs in a session of its own (the tests start it so), as a
machine losing power would. Without the variable (always, outside those tests) a point is
a dictionary lookup and does nothing.

Points: ``park:after-park`` (a task parked, its message not yet acknowledged),
``park:received-after-park`` (a message parked on receipt by the worker's main process, not
yet acknowledged),
``release:after-take`` (parked entries taken for re-sending, not yet published),
``release:after-publish`` (published, not yet marked sent).
"""

from __future__ import annotations

import os
import signal

__all__ = ["crash_point"]

_ARMED = frozenset(p for p in os.environ.get("RK_TEST_CRASH_AT", "").split(",") if p)


def crash_point(name: str) -> None:
    """SIGKILL this process (and its worker) here if ``name`` is armed."""
    if name not in _ARMED:
        return
    group = os.getpgrp()
    if group in (os.getpid(), os.getppid()):  # the worker leads its own process group
        os.killpg(group, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
