"""What a server runs, from a MONITOR: the commands clients send, or those scripts run."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import redis

WAIT = 20


@contextmanager
def client_commands(url: str, scripts: bool = False) -> Iterator[list[str]]:
    """Every command sent by a client (not from inside a script; with ``scripts``, only
    those run from inside a script) while the block runs, from a MONITOR of the server at
    ``url``, as MONITOR prints them (quoted arguments)."""
    stop = f"rediskit-test-stop-{uuid.uuid4().hex}"
    commands: list[str] = []
    ready = threading.Event()
    monitor_client = redis.Redis.from_url(url)

    def listen() -> None:
        with monitor_client.monitor() as m:
            ready.set()
            for command in m.listen():
                text = command["command"]
                if stop in text:
                    return
                if (command.get("client_type") == "lua") == scripts:
                    commands.append(text)

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    assert ready.wait(WAIT)
    try:
        yield commands
    finally:
        redis.Redis.from_url(url).echo(stop)
        thread.join(WAIT)
        monitor_client.close()


def command_names(commands: list[str]) -> list[str]:
    """The command names of :func:`client_commands`' texts, upper case."""
    return [text.split(" ", 1)[0].strip('"').upper() for text in commands]
