"""``POST /v1/events``: accept storefront events (one or a batch), durably, for real-time fold-in.

A thin HTTP layer over :class:`~recsvc.serving.ingest.EventIngest`: API key, per-key rate limit,
body validation, then one atomic Redis script. The answer (202) is sent only after Redis accepted the
whole batch; a rejected batch stores nothing. An optional ``Idempotency-Key`` header names the batch:
a retry with the same key within ``events.dedup_ttl_s`` is answered 202 (``"duplicate": true``)
without storing the events again. A 503 ``outcome_unknown`` (Redis stopped answering mid-write)
carries the ``batch_id`` to retry with.
"""

from __future__ import annotations

from flask import Blueprint, g, request

from recsvc.storage.stream import StoredBatch
from recsvc.web.auth import require_api_key
from recsvc.web.errors import bad_request, status_of
from recsvc.web.params import declared, parse_id
from recsvc.web.render import answer
from recsvc.web.services import Services, services

bp = Blueprint("events", __name__)

#: The client's id of a batch (RFC draft "The Idempotency-Key HTTP Header Field"): a retry of an
#: unanswered request with the same id is stored at most once.
IDEMPOTENCY_HEADER = "Idempotency-Key"


@bp.post("/v1/events")
@require_api_key
def post_events():
    """Validate and store one event, a JSON list of events, or ``{"events": [...]}``."""
    declared()
    svc = services()
    svc.ingest.count_request(g.api_key)
    try:
        stored = _accept(svc)
    except Exception as e:
        if status_of(e) >= 500:
            svc.ingest.refund_request(g.api_key)  # the service failed: not the caller's request
        raise
    # Counted by recsvc.web.observe; a retried batch stored nothing new, so it adds none.
    g.events_accepted = 0 if stored.duplicate else stored.count
    model = svc.models.current()
    body = {
        "model_version": model.version if model is not None else None,
        "accepted": stored.count,
        "first_id": stored.first_id,
        "last_id": stored.last_id,
        "duplicate": stored.duplicate,
    }
    return answer(body, status=202)


def _accept(svc: Services) -> StoredBatch:
    if not request.get_data(cache=True):
        raise bad_request("body", "body is empty; send an event, a list of events or {'events': [...]}")
    payload = request.get_json(force=True, silent=True)
    if payload is None:
        raise bad_request("body", "body is not valid JSON")
    batch_id = request.headers.get(IDEMPOTENCY_HEADER)
    if batch_id is not None:
        batch_id = parse_id(batch_id, IDEMPOTENCY_HEADER)
    return svc.ingest.accept(payload, g.api_key_fingerprint, batch_id)
