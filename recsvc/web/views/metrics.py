"""``GET /metrics``: Prometheus metrics summed across this instance's workers (key required).

The scrape needs a key: one of ``RECSVC_METRICS_KEYS`` (read-only keys meant for Prometheus) or of
``RECSVC_API_KEYS``. The text comes from :mod:`recsvc.web.metrics`.
"""

from __future__ import annotations

import datetime as _dt

from flask import Blueprint, Response

from recsvc.storage.connection import REDIS_DOWN_ERRORS
from recsvc.web.auth import check_api_key
from recsvc.web.errors import ApiError
from recsvc.web.metrics import CONTENT_TYPE, LiveState
from recsvc.web.params import declared
from recsvc.web.services import Services, services

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def metrics():
    svc = services()
    if svc.metrics is None:
        raise ApiError(404, "not_found", "metrics are switched off (RECSVC_METRICS_ENABLED=0)")
    check_api_key(also=svc.config.ops.metrics_keys)
    declared()
    text = svc.metrics.render(LiveState(lambda: _redis_up(svc), lambda: _live_model(svc)))
    return Response(text, mimetype=None, content_type=CONTENT_TYPE)


def _redis_up(svc: Services) -> bool:
    if svc.health.is_down():
        return False
    try:
        return bool(svc.client.ping())
    except REDIS_DOWN_ERRORS as e:
        svc.health.mark_down(e)
        return False


def _live_model(svc: Services) -> tuple[str, str, bool, float | None] | None:
    choice = svc.recommender.resolve()
    model = choice.model
    if model is None:
        return None
    created = model.manifest.get("created_at")
    return model.version, model.origin, choice.degraded, _timestamp(created)


def _timestamp(value: object) -> float | None:
    """A manifest's ``created_at`` (ISO-8601 or Unix seconds) as Unix seconds, None when absent."""
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and value:
        try:
            return _dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None
