"""Options are checked where the task is decorated, with a message naming option and form."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest
from celery import Celery
from kombu.utils.json import dumps, loads

from celery_rediskit import ConfigurationError
from celery_rediskit.integration import RedisKit, RedisKitTask, SingletonTask
from celery_rediskit.integration.options import parse_policy


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"concurrency_limit": "db"}, ["concurrency_limit", "'db:5'"]),
        ({"concurrency_limit": "db:0"}, ["concurrency_limit", "name:permits"]),
        ({"concurrency_limit": "db:x"}, ["concurrency_limit", "name:permits"]),
        ({"concurrency_limit": "tenant:{tenant}:2"}, ["concurrency_limit", "'tenant'"]),
        ({"singleton": True, "on_locked": "wait"}, ["on_locked", "'retry'", "'skip'"]),
        ({"singleton": True, "singleton_scope": "all"}, ["singleton_scope", "'queued'"]),
        ({"singleton": True, "singleton_key": ("nope",)}, ["singleton_key", "'nope'"]),
        ({"concurrency_limit": "db:2", "on_limited": "skip"}, ["on_limited", "'wait'"]),
        ({"cache_ttl": "5 minutes"}, ["cache_ttl", "'5m'"]),
        ({"cache_ttl": 0}, ["cache_ttl"]),
        ({"cache_ttl": 60, "cache_tags": ["user:{missing}"]}, ["cache_tags", "'missing'"]),
    ],
)
def test_invalid_option_fails_at_decoration(redis_url: str, prefix: str,
                                            options: dict[str, Any], words: list[str]) -> None:
    app = Celery("opts", broker=redis_url, set_as_current=False)
    RedisKit(app, prefix=prefix)
    with pytest.raises(ConfigurationError) as info:

        @app.task(shared=False, **options)
        def job(tenant_id: int, user_id: int = 0) -> None: ...

    for word in words:
        assert word in str(info.value)
    assert "job" in str(info.value)


def test_options_on_a_base_outside_the_hierarchy_fail_at_decoration(redis_url: str,
                                                                    prefix: str) -> None:
    from celery import Task

    class Plain(Task):  # type: ignore[misc]
        pass

    app = Celery("opts", broker=redis_url, set_as_current=False)
    RedisKit(app, prefix=prefix)
    with pytest.raises(ConfigurationError, match="singleton.*RedisKitTask.*Plain"):

        @app.task(shared=False, base=Plain, singleton=True)
        def job(x: int) -> None: ...


def test_valid_options_reach_the_task_class(redis_url: str, prefix: str) -> None:
    app = Celery("opts", broker=redis_url, set_as_current=False)
    RedisKit(app, prefix=prefix)

    @app.task(shared=False, concurrency_limit=["tenant:{tenant_id}:2", "db:5"], cache_ttl="5m")
    def job(tenant_id: int) -> None: ...

    @app.task(shared=False, base=SingletonTask, bind=True)
    def single(self: Any, x: int) -> None: ...

    task = app.tasks[job.name]
    assert isinstance(task, RedisKitTask)
    policy = task._rk_policy
    assert policy.cache_ttl == 300.0
    assert policy.limit_names({"tenant_id": 7}) == [("db", 5), ("tenant:7", 2)]
    assert app.tasks[single.name]._rk_policy.singleton


def test_url_defaults_to_redis_broker_else_names_the_setting(redis_url: str) -> None:
    app = Celery("u", broker=redis_url, set_as_current=False)
    assert RedisKit(app).settings.url == redis_url
    other = Celery("u2", broker="amqp://guest@localhost//", set_as_current=False)
    with pytest.raises(ConfigurationError, match="rediskit_url"):
        RedisKit(other)


def test_a_bad_prefix_names_the_setting_and_the_accepted_form(redis_url: str) -> None:
    app = Celery("p", broker=redis_url, set_as_current=False)
    with pytest.raises(ConfigurationError, match=r"^rediskit_prefix must be .* glob characters"):
        RedisKit(app, prefix="svc[12]")


def test_django_style_settings(redis_url: str) -> None:
    class DjangoSettings:
        CELERY_BROKER_URL = "amqp://guest@localhost//"
        CELERY_REDISKIT_URL = redis_url
        CELERY_REDISKIT_PREFIX = "django-app"
        CELERY_REDISKIT_LEASE = 7

    app = Celery("dj", set_as_current=False)
    app.config_from_object(DjangoSettings, namespace="CELERY")
    settings = RedisKit(app).settings
    assert (settings.url, settings.prefix, settings.lease) == (redis_url, "django-app", 7)


def test_idle_ttl_setting_reaches_every_storage(redis_url: str, prefix: str) -> None:
    app = Celery("idle", broker=redis_url, set_as_current=False)
    app.conf.rediskit_idle_ttl = "2d"  # as an environment variable gives it
    rt = RedisKit(app, prefix=prefix).runtime()
    for keys in (rt.mutex_storage.keys, rt.semaphore_storage.keys, rt.cache.keys):
        assert keys.idle_ttl == 172_800.0
    rt.mutex.acquire("res", auto_renew=False).release()
    fence = rt.mutex_storage.keys.lock("res").fence
    assert 172_800_000 < rt.client.pttl(fence) <= 172_800_000 + 31_000  # + the lease
    rt.client.close()


def test_keys_equal_at_enqueue_and_in_the_worker() -> None:
    """Tuples, UUIDs, datetimes and keywords: the caller's values and the values the worker
    decodes from the message (kombu JSON turns tuples into lists) give the same key."""

    def job(pair: tuple[int, int], when: dt.datetime, uid: uuid.UUID, *, opt: Any = None) -> None:
        ...

    policy = parse_policy({"singleton": True}, job, False)
    args = ((1, 2), dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.UTC), uuid.uuid4())
    kwargs = {"opt": {"b": (3,), "a": 1}}
    wire = loads(dumps({"args": args, "kwargs": kwargs}))
    assert isinstance(wire["args"][0], list)

    def name(a: Any, k: Any) -> str:
        return policy.singleton_name("t", policy.bind(a, k), a, k)

    assert name(args, kwargs) == name(wire["args"], wire["kwargs"])
    # positional and keyword spellings of one call, and an omitted default, are one key
    p2 = parse_policy({"singleton": True}, lambda a, b=2: None, False)
    one = p2.singleton_name("t", p2.bind((1,), {}), (1,), {})
    assert one == p2.singleton_name("t", p2.bind((), {"a": 1, "b": 2}), (), {"a": 1, "b": 2})
