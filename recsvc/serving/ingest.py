"""Accepting storefront events: per-key rate limit, contract check, one durable Redis transaction.

An accepted batch is in the event stream (and each user's recent list) before the caller hears
back; a rejected one stores nothing.
"""

from __future__ import annotations

import logging
from typing import Any

import redis

from recsvc.core.config import Config
from recsvc.core.contract import validate_batch
from recsvc.core.errors import RateLimited, Unavailable
from recsvc.serving.health import RedisHealth
from recsvc.storage import ratelimit, stream
from recsvc.storage.connection import REDIS_DOWN_ERRORS

log = logging.getLogger(__name__)


class EventIngest:
    """The events use case of one app (see the module docstring)."""

    def __init__(self, config: Config, client: redis.Redis, health: RedisHealth):
        self.config, self.client, self.health = config, client, health

    def count_request(self, api_key: str) -> None:
        """Count one request of ``api_key``; raise :class:`RateLimited` beyond the limit.

        Raises
        ------
        RateLimited
            More than ``events.rate_limit_per_min`` requests of this key this minute.
        Unavailable
            Redis cannot count (nothing may be stored either).
        """
        limit = self.config.events.rate_limit_per_min
        try:
            decision = ratelimit.rate_limit(self.client, api_key, limit)
        except (redis.RedisError, *REDIS_DOWN_ERRORS) as e:
            self.health.mark_down(e)
            raise Unavailable("events cannot be stored now (Redis unavailable); nothing was stored") from None
        if not decision.allowed:
            raise RateLimited(
                f"more than {decision.limit} requests this minute for this API key; retry in "
                f"{decision.retry_after_s}s",
                retry_after_s=decision.retry_after_s,
                limit=decision.limit,
            )

    def accept(self, payload: Any) -> list[str]:
        """Validate one event, a list, or ``{"events": [...]}`` and store it all; return stream ids.

        Raises
        ------
        BatchError
            An event breaks the contract (its index and field are named); nothing was stored.
        Unavailable
            Redis failed or the stream is full; nothing of the batch was stored.
        """
        events = validate_batch(payload, self.config.events.max_batch)
        settings = self.config.events
        try:
            return stream.append_events(
                self.client,
                events,
                stream=settings.stream,
                history_length=settings.history_length,
                history_ttl_s=settings.history_ttl_s,
                stream_maxlen=settings.stream_maxlen,
            )
        except stream.StreamFull:
            log.error("event stream %s is full: run `recsvc events dump`", settings.stream)
            raise
        except (redis.RedisError, *REDIS_DOWN_ERRORS) as e:
            self.health.mark_down(e)
            raise Unavailable("events were not stored (Redis unavailable); retry the whole batch") from None
