"""Redis clients with explicit timeouts and bounded retries: a slow Redis must never hang a request.

A client can report every round trip (command name, seconds, error or None) to an observer -- the
service's metrics -- without this package knowing what is done with it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, cast

import redis
from redis.client import Pipeline
from redis.exceptions import NoScriptError

from recsvc.core.config import Config

#: Redis failures that mean "unreachable or too slow" (serve a fallback), as opposed to bugs.
REDIS_DOWN_ERRORS: tuple[type[redis.ConnectionError], type[redis.TimeoutError], type[OSError]] = (
    redis.ConnectionError,
    redis.TimeoutError,
    OSError,
)

#: Called after each round trip: ``(command, seconds, error or None)``.
Observer = Callable[[str, float, BaseException | None], None]


class ObservedRedis(redis.Redis):
    """A client that reports each command and each pipeline (one round trip) to ``observer``."""

    observer: Observer

    def execute_command(self, *args: Any, **options: Any) -> Any:
        started = time.perf_counter()
        try:
            result = super().execute_command(*args, **options)
        except NoScriptError:
            # A script's first EVALSHA on a server: the client loads it and retries; not a failure.
            self.observer(str(args[0]), time.perf_counter() - started, None)
            raise
        except BaseException as e:
            self.observer(str(args[0]), time.perf_counter() - started, e)
            raise
        self.observer(str(args[0]), time.perf_counter() - started, None)
        return result

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Pipeline:
        pipe = ObservedPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipe.observer = self.observer
        return pipe


class ObservedPipeline(Pipeline):
    """A pipeline whose ``execute`` (one round trip: ``MULTI`` or ``PIPELINE``) is reported."""

    observer: Observer

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        # `transaction` is an attribute of a pipeline but a method of the client class it extends.
        command = "MULTI" if vars(self).get("transaction") or self.explicit_transaction else "PIPELINE"
        started = time.perf_counter()
        try:
            result = super().execute(raise_on_error)
        except BaseException as e:
            self.observer(command, time.perf_counter() - started, e)
            raise
        self.observer(command, time.perf_counter() - started, None)
        return result


def connect(
    url: str, config: Config | None = None, *, observer: Observer | None = None, **kwargs: Any
) -> redis.Redis:
    """A client with explicit timeouts and bounded retries (never hang the storefront).

    Parameters
    ----------
    url : str
        ``redis://``, ``rediss://`` or ``unix://`` URL.
    config : Config, optional
        Timeouts and retries (``config.redis``); the defaults when None.
    observer : callable, optional
        Told about every round trip (see :data:`Observer`).
    """
    from redis.backoff import ConstantBackoff
    from redis.retry import Retry

    config = config or Config()
    options = dict(
        socket_timeout=config.redis.socket_timeout_s,
        socket_connect_timeout=config.redis.connect_timeout_s,
        # Retry a broken connection (a pooled socket that a Redis restart closed), never a timeout:
        # a slow Redis would cost the request the timeout twice (the fallback is the answer then),
        # and a timed-out write may still run when Redis wakes -- repeating it runs it twice.
        retry=Retry(ConstantBackoff(0.01), config.redis.retries, supported_errors=(redis.ConnectionError,)),
        health_check_interval=30,
    )
    options.update(kwargs)
    if observer is None:
        return redis.Redis.from_url(url, **options)
    client = cast(ObservedRedis, ObservedRedis.from_url(url, **options))
    client.observer = observer
    return client


def connect_admin(url: str) -> redis.Redis:
    """A client for batch work (publish, dump, retrain): generous timeouts, same retries."""
    return connect(url, socket_timeout=30.0, socket_connect_timeout=5.0)
