"""Interrupting a wait the ways real programs do, for the ghost-waiter tests.

- ``"signal"``: the waiter is the main thread, and a signal handler raises the exception while
  it waits, as Ctrl-C (``KeyboardInterrupt``), a ``sys.exit`` from a handler (``SystemExit``) or
  Celery's soft time limit (``SoftTimeLimitExceeded``, raised from billiard's signal handler)
  do.
- ``"thread"``: the waiter is another thread and the exception is thrown into it with
  ``PyThreadState_SetAsyncExc`` (as some task runners and debuggers cancel threads). Such an
  exception lands when the thread next runs Python code, so the waiter is given an ``abort``
  event that is never set: it then looks at it every ``ABORT_CHECK`` seconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

__all__ = ["HOWS", "Background", "interrupt_wait", "wait_until"]

HOWS = ("signal", "thread")


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``predicate`` (a look at Redis state) until true; AssertionError after ``timeout``."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"not true within {timeout} s: {predicate}")
        time.sleep(0.002)


class Background(threading.Thread):
    """Runs ``fn()`` in a thread; keeps its result or exception and when it finished."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.result: Any = None
        self.error: BaseException | None = None
        self.finished_at = 0.0

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # kept for the test to look at
            self.error = exc
        finally:
            self.finished_at = time.monotonic()


@contextlib.contextmanager
def _raising_on_signal(exc: type[BaseException]) -> Iterator[None]:
    def handler(signum: int, frame: Any) -> None:
        raise exc("interrupted by a signal while waiting")

    before = signal.signal(signal.SIGUSR1, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR1, before)


def _throw_into(thread: threading.Thread, exc: type[BaseException]) -> None:
    assert thread.ident is not None
    done = ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread.ident), ctypes.py_object(exc)
    )
    assert done == 1, "the exception was not thrown into the thread"


def interrupt_wait(
    how: str,
    exc: type[BaseException],
    wait: Callable[[threading.Event | None], Any],
    meanwhile: Callable[[], None],
) -> None:
    """Run ``wait(abort)`` and interrupt it with ``exc`` once ``meanwhile()`` has returned.

    ``meanwhile`` runs in another thread while ``wait`` waits (it typically waits until the
    waiter is queued in Redis and queues a live waiter behind it). Returns once ``wait`` ended
    by ``exc``; fails the test if it ended otherwise.
    """
    if how == "signal":
        def then_signal() -> None:
            meanwhile()
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR1)

        helper = Background(then_signal)
        with _raising_on_signal(exc):
            helper.start()
            with pytest.raises(exc):
                wait(None)
            helper.join(30)
        if helper.error is not None:
            raise helper.error
        return
    abort = threading.Event()  # never set: the waiter looks at it every ABORT_CHECK seconds
    waiter = Background(lambda: wait(abort))
    waiter.start()
    meanwhile()
    _throw_into(waiter, exc)
    waiter.join(30)
    assert not waiter.is_alive(), "the waiter did not stop"
    assert isinstance(waiter.error, exc), f"the wait ended with {waiter.error!r}"
