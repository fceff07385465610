"""``POST /v1/events``: accept storefront events (one or a batch), durably, for real-time fold-in.

A thin HTTP layer over :class:`~recsvc.serving.ingest.EventIngest`: API key, per-key rate limit,
body validation, then one Redis transaction. The answer (202) is sent only after Redis accepted the
whole batch; a rejected batch stores nothing.
"""

from __future__ import annotations

from flask import Blueprint, g, request

from recsvc.web.auth import require_api_key
from recsvc.web.errors import bad_request
from recsvc.web.params import query_args
from recsvc.web.render import answer
from recsvc.web.services import services

bp = Blueprint("events", __name__)


@bp.post("/v1/events")
@require_api_key
def post_events():
    """Validate and store one event, a JSON list of events, or ``{"events": [...]}``."""
    query_args(())
    svc = services()
    svc.ingest.count_request(g.api_key)
    if not request.get_data(cache=True):
        raise bad_request("body", "body is empty; send an event, a list of events or {'events': [...]}")
    payload = request.get_json(force=True, silent=True)
    if payload is None:
        raise bad_request("body", "body is not valid JSON")
    ids = svc.ingest.accept(payload)
    g.events_accepted = len(ids)  # counted by recsvc.web.metrics
    model = svc.models.current()
    body = {
        "model_version": model.version if model is not None else None,
        "accepted": len(ids),
        "first_id": ids[0],
        "last_id": ids[-1],
    }
    return answer(body, status=202)
