"""Accepting storefront events: per-key rate limit, contract check, one durable Redis transaction.

An accepted batch is in the event stream (and each user's recent list) before the caller hears
back; a rejected one stores nothing.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import redis

from recsvc.core.config import Config
from recsvc.core.contract import validate_batch
from recsvc.core.errors import OutcomeUnknown, RateLimited, Unavailable
from recsvc.serving.health import RedisHealth
from recsvc.storage import ratelimit, stream
from recsvc.storage.connection import REDIS_DOWN_ERRORS

log = logging.getLogger(__name__)

#: How long a request waits, after Redis stopped answering mid-write, to learn whether the batch
#: was stored (or to make sure it never will be) before it answers "outcome unknown".
SETTLE_S = 0.5


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

    def refund_request(self, api_key: str) -> None:
        """Take back the count of a request the service failed (5xx): it is not the caller's."""
        try:
            ratelimit.refund(self.client, api_key)
        except (redis.RedisError, *REDIS_DOWN_ERRORS):
            pass  # Redis down: the window ends within a minute anyway

    def accept(self, payload: Any, client_id: str, batch_id: str | None = None) -> stream.StoredBatch:
        """Validate one event, a list, or ``{"events": [...]}`` and store it all, at most once.

        Parameters
        ----------
        payload : Any
            The decoded JSON body.
        client_id : str
            Who sends (the API key's fingerprint): batch ids are per client.
        batch_id : str, optional
            The client's idempotency key: a batch with an id already stored (within
            ``events.dedup_ttl_s``) is not stored again and is answered like the first time.

        Raises
        ------
        BatchError
            An event breaks the contract (its index and field are named); nothing was stored.
        Unavailable
            Redis failed or the stream is full; nothing of the batch was stored.
        OutcomeUnknown
            Redis stopped answering mid-write and did not answer again in time: the batch may or
            may not be stored. A retry with the same ``batch_id`` stores it exactly once.
        """
        events = validate_batch(payload, self.config.events.max_batch)
        settings = self.config.events
        attempt = os.urandom(8).hex()
        batch_id = batch_id or attempt
        batch_key = stream.record_key(events, client_id, batch_id)
        try:
            return stream.store_batch(
                self.client,
                events,
                batch_key=batch_key,
                attempt=attempt,
                stream=settings.stream,
                history_length=settings.history_length,
                history_ttl_s=settings.history_ttl_s,
                stream_maxlen=settings.stream_maxlen,
                dedup_ttl_s=settings.dedup_ttl_s,
            )
        except stream.StreamFull:
            log.error("event stream %s is full: run `recsvc events dump`", settings.stream)
            raise
        except (redis.RedisError, *REDIS_DOWN_ERRORS) as e:
            self.health.mark_down(e)
            # The reply is lost, not necessarily the write: Redis may run it when it wakes. Learn
            # which, or make sure it never runs, before answering.
            stored = self._settle(batch_key, attempt)
            if stored is not None:
                return stored
            raise Unavailable("events were not stored (Redis unavailable); retry the whole batch") from None

    def _settle(self, batch_key: str, attempt: str) -> stream.StoredBatch | None:
        deadline = time.monotonic() + SETTLE_S
        while True:
            try:
                return stream.settle_batch(self.client, batch_key, attempt, self.config.events.dedup_ttl_s)
            except (redis.RedisError, *REDIS_DOWN_ERRORS):
                if time.monotonic() >= deadline:
                    raise OutcomeUnknown(
                        "Redis stopped answering while storing the batch: it may or may not be stored; "
                        "retry with the same Idempotency-Key to store it exactly once",
                        batch_id=batch_key.rsplit(":", 1)[-1],
                    ) from None
                time.sleep(0.02)
