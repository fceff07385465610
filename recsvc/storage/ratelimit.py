"""Fixed-window request counters per API key, in Redis (shared by every worker and instance)."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import redis

from recsvc.storage import keys


@dataclass(frozen=True)
class RateDecision:
    """Outcome of :func:`rate_limit`."""

    allowed: bool
    count: int  # requests of this key in the current window, this one included
    limit: int
    retry_after_s: int  # seconds until the window resets


def key_fingerprint(api_key: str) -> str:
    """A stable, non-reversible name for an API key, safe to use in Redis keys and logs."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()[:32]


def rate_limit(
    client: redis.Redis, api_key: str, limit_per_min: int, now: float | None = None, scope: str = "events"
) -> RateDecision:
    """Count one request of ``api_key`` in its fixed one-minute window (``INCR`` + ``EXPIRE``).

    The Redis key holds a hash of the API key, never the key itself.
    """
    now = time.time() if now is None else now
    window = int(now // 60)
    key = keys.rate_limit(scope, key_fingerprint(api_key), window)
    pipe = client.pipeline(transaction=True)
    pipe.incr(key)
    pipe.expire(key, 120)
    count = int(pipe.execute()[0])
    retry_after = max(1, int((window + 1) * 60 - now + 0.999))
    return RateDecision(count <= limit_per_min, count, limit_per_min, retry_after)


def peek(
    client: redis.Redis, api_key: str, limit_per_min: int, now: float | None = None, scope: str = "events"
) -> RateDecision:
    """The current window of :func:`rate_limit` without counting: allowed while under the limit."""
    now = time.time() if now is None else now
    window = int(now // 60)
    raw = client.get(keys.rate_limit(scope, key_fingerprint(api_key), window))
    count = int(raw) if raw is not None else 0
    retry_after = max(1, int((window + 1) * 60 - now + 0.999))
    return RateDecision(count < limit_per_min, count, limit_per_min, retry_after)


def refund(client: redis.Redis, api_key: str, now: float | None = None, scope: str = "events") -> None:
    """Take back one request of the current window (a request the service failed, 5xx)."""
    now = time.time() if now is None else now
    key = keys.rate_limit(scope, key_fingerprint(api_key), int(now // 60))
    client.eval(_REFUND, 1, key)


# Never below zero, and never creating a key that expired.
_REFUND = "local n = redis.call('GET', KEYS[1]) if n and tonumber(n) > 0 then redis.call('DECR', KEYS[1]) end"
