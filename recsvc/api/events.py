"""``POST /v1/events``: accept storefront events (one or a batch), durably, for real-time fold-in.

A thin HTTP layer over :mod:`recsvc.realtime`: API key, per-key rate limit, body validation, then
one Redis transaction. The answer (202) is sent only after Redis accepted the whole batch; a
rejected batch stores nothing.
"""

from __future__ import annotations

import logging

import redis
from flask import Blueprint, g, request

from recsvc import realtime
from recsvc.api.auth import require_api_key
from recsvc.api.common import answer, query_args, services
from recsvc.serving import REDIS_DOWN_ERRORS
from recsvc.web.errors import ApiError, bad_request

log = logging.getLogger("recsvc.api.events")

bp = Blueprint("events", __name__)


@bp.post("/v1/events")
@require_api_key
def post_events():
    """Validate and store one event, a JSON list of events, or ``{"events": [...]}``."""
    query_args(())
    svc = services()
    config = svc.config
    try:
        decision = realtime.rate_limit(svc.client, g.api_key, config.events_rate_limit_per_min)
    except (redis.RedisError, *REDIS_DOWN_ERRORS) as e:
        svc.health.mark_down(e)
        raise _unavailable("events cannot be stored now (Redis unavailable); nothing was stored") from None
    if not decision.allowed:
        g.retry_after_s = decision.retry_after_s
        raise ApiError(
            429,
            "rate_limited",
            f"more than {decision.limit} requests this minute for this API key; retry in "
            f"{decision.retry_after_s}s",
            retry_after_s=decision.retry_after_s,
        )

    if not request.get_data(cache=True):
        raise bad_request("body", "body is empty; send an event, a list of events or {'events': [...]}")
    payload = request.get_json(force=True, silent=True)
    if payload is None:
        raise bad_request("body", "body is not valid JSON")
    try:
        events = realtime.validate_batch(payload, config.max_events_batch)
    except realtime.BatchError as e:
        raise ApiError(
            400, "invalid_event", e.message, field=e.field, index=e.index, reason=e.reason
        ) from None

    try:
        ids = realtime.append_events(
            svc.client,
            events,
            stream=config.events_stream,
            history_length=config.history_length,
            history_ttl_s=config.history_ttl_s,
            stream_maxlen=config.events_stream_maxlen,
        )
    except realtime.StreamFull:
        log.error("event stream %s is full: run `recsvc events dump`", config.events_stream)
        raise _unavailable(
            "the event stream is full until the next `recsvc events dump`; nothing was stored", "stream_full"
        ) from None
    except (redis.RedisError, *REDIS_DOWN_ERRORS) as e:
        svc.health.mark_down(e)
        raise _unavailable("events were not stored (Redis unavailable); retry the whole batch") from None

    model = svc.models.current()
    body = {
        "model_version": model.version if model is not None else None,
        "accepted": len(ids),
        "first_id": ids[0],
        "last_id": ids[-1],
    }
    return answer(body, status=202)


def _unavailable(message: str, code: str = "unavailable") -> ApiError:
    g.retry_after_s = 1
    return ApiError(503, code, message)


@bp.after_request
def _retry_after(response):
    # Error answers come from recsvc.errors' handlers; the hint for clients is added here.
    retry_after = g.get("retry_after_s")
    if retry_after is not None and response.status_code in (429, 503):
        response.headers["Retry-After"] = str(retry_after)
    return response
