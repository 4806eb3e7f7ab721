"""A prefork pool forks its children while other threads of the worker's main process run:
the park sweeper builds the extension's runtime right after the worker starts. A lock that
such a thread holds at the fork must not stay held in the child, whose first task would wait
on it forever (seen as a task received and never run, with ``--max-tasks-per-child 1``,
whose pool forks a new child after every task: py-spy showed every child in
``RedisKit.runtime``). Forked directly here (``os.fork``), with the lock held for certain."""

from __future__ import annotations

import os
import select
import signal
import threading

from celery_rediskit.integration import RedisKit

from .conftest import make_app

WAIT = 10.0


def test_a_child_forked_while_another_thread_holds_the_runtime_lock_builds_its_own(
    redis_url: str, prefix: str
) -> None:
    app = make_app(redis_url, prefix)
    kit = RedisKit.of(app)
    holding, let_go = threading.Event(), threading.Event()

    def build_slowly() -> None:  # as the sweeper inside runtime(): the lock held
        with kit._lock:
            holding.set()
            let_go.wait(WAIT)

    thread = threading.Thread(target=build_slowly)
    thread.start()
    read_end, write_end = os.pipe()
    try:
        assert holding.wait(WAIT)
        pid = os.fork()
        if pid == 0:  # the child: its first runtime(), then one command through it
            try:
                kit.runtime().client.ping()
                os.write(write_end, b"ok")
            finally:
                os._exit(0)
        os.close(write_end)
        ready, _, _ = select.select([read_end], [], [], WAIT)
        answer = os.read(read_end, 2) if ready else b""
        if answer != b"ok":
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert answer == b"ok", "the child waited on a lock its parent's thread held"
    finally:
        let_go.set()
        thread.join()
        os.close(read_end)
        app.close()
