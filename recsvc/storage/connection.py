"""Redis clients with explicit timeouts and bounded retries: a slow Redis must never hang a request."""

from __future__ import annotations

import redis

from recsvc.core.config import Config

#: Redis failures that mean "unreachable or too slow" (serve a fallback), as opposed to bugs.
REDIS_DOWN_ERRORS: tuple[type[redis.ConnectionError], type[redis.TimeoutError], type[OSError]] = (
    redis.ConnectionError,
    redis.TimeoutError,
    OSError,
)


def connect(url: str, config: Config | None = None, **kwargs) -> redis.Redis:
    """A client with explicit timeouts and bounded retries (never hang the storefront)."""
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
    return redis.Redis.from_url(url, **options)


def connect_admin(url: str) -> redis.Redis:
    """A client for batch work (publish, dump, retrain): generous timeouts, same retries."""
    return connect(url, socket_timeout=30.0, socket_connect_timeout=5.0)
