"""A ``redis.Redis`` subclass that records what passes through ``execute_command`` and its
pipelines: what a tracer wrapping those methods would see (``trace_commands`` tests)."""

from __future__ import annotations

from typing import Any

import redis

from celery_rediskit._redis.scripts import load_script


class Recording(redis.Redis):
    """A client that notes every command sent through ``execute_command`` and through its
    pipelines (the two methods OpenTelemetry's redis instrumentation wraps)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[str, Any, Any]] = []

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.seen.append(("execute_command", args[0], args[1] if len(args) > 1 else None))
        return super().execute_command(*args, **options)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)
        seen = self.seen

        class RecordingPipeline(type(pipe)):  # type: ignore[misc]
            def execute_command(self, *args: Any, **kwargs: Any) -> Any:
                seen.append(("pipeline", args[0], args[1] if len(args) > 1 else None))
                return super().execute_command(*args, **kwargs)

        pipe.__class__ = RecordingPipeline
        return pipe

    def scripts_seen(self) -> set[tuple[str, str]]:
        """(path, script name) of every EVALSHA seen."""
        names = {load_script(n).sha: n for n in (
            "mutex_acquire", "mutex_release", "sem_acquire", "sem_release", "mutex_info",
            "sem_info", "claims_mutex_acquire", "claims_mutex_release", "claims_sem_acquire",
            "claims_sem_release")}
        return {(path, names.get(sha, sha)) for path, cmd, sha in self.seen
                if cmd == "EVALSHA"}
