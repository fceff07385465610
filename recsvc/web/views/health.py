"""Health checks and the live model's description.

* ``GET /health/live``  -- the process answers (never touches Redis).
* ``GET /health/ready`` -- 200 ``ready`` when Redis answers and a published model is loaded;
  200 ``degraded`` when Redis is unreachable or nothing is published but a model can still be
  served (the in-process copy of the live version, else a local artifact); 503 ``not_ready`` only
  when nothing at all can be served.
* ``GET /v1/model``     -- the live version's manifest summary and the published versions.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint

from recsvc.core.answers import Reason, Source
from recsvc.serving.recommender import ModelChoice
from recsvc.storage import versions
from recsvc.storage.connection import REDIS_DOWN_ERRORS
from recsvc.web.params import declared
from recsvc.web.render import answer, request_id
from recsvc.web.services import services

bp = Blueprint("health", __name__)


@bp.get("/health/live")
def live():
    declared()
    model = services().models.current()
    return answer(
        {
            "status": "ok",
            "model_version": model.version if model else None,
            "source": Source.PERSONALIZED
            if model is not None and model.origin == "redis"
            else Source.FALLBACK,
            "request_id": request_id(),
        }
    )


@bp.get("/health/ready")
def ready():
    declared()
    svc = services()
    checks: dict[str, Any] = {}
    redis_ok = False
    if not svc.health.is_down():
        try:
            t0 = time.perf_counter()
            svc.client.ping()
            checks["redis_ms"] = round(1000 * (time.perf_counter() - t0), 3)
            redis_ok = True
        except REDIS_DOWN_ERRORS as e:
            svc.health.mark_down(e)
    checks["redis"] = "ok" if redis_ok else "unreachable"
    if not redis_ok and svc.health.last_error_kind:
        # The kind only: this endpoint needs no key, and the full message names Redis's address.
        checks["redis_error"] = svc.health.last_error_kind
    choice = svc.recommender.resolve()
    model = choice.model
    body = _envelope(choice)
    if not choice.degraded:
        body.update(status="ready", checks=checks)
        return answer(body)
    checks["model"] = choice.reason
    checks["fallback"] = model.origin if model is not None else None
    if model is not None:
        # Redis down or emptied: the instance still serves (the in-process copy of the live
        # version, else a local artifact). A balancer that pulled every instance now would turn a
        # degraded service into an outage, so only "nothing at all to serve" is not ready.
        body.update(status="degraded", reason=choice.reason, checks=checks)
        return answer(body)
    body.update(
        status="not_ready",
        reason=choice.reason,
        message=(
            "no model is published: run `recsvc publish latest`"
            if choice.reason == Reason.NOT_PUBLISHED
            else "Redis is unreachable and no model is in memory or on disk"
        ),
        checks=checks,
    )
    return answer(body, status=503)


@bp.get("/v1/model")
def model_info():
    """The live model: version, when it was trained, its parameters, metrics and counts."""
    declared()
    svc = services()
    choice = svc.recommender.resolve()
    model = choice.model
    body = _envelope(choice)
    if choice.degraded:
        body["reason"] = choice.reason
    if model is not None:
        m = model.manifest
        body["model"] = {
            "version": model.version,
            "origin": model.origin,
            "created_at": m.get("created_at"),
            "trained_until": m.get("trained_until"),
            "data_fingerprint": m.get("data_fingerprint"),
            "params": m.get("params", {}),
            "metrics": m.get("metrics", {}),
            "counts": m.get("counts", {}),
            "categories": model.categories,
            "cached_top_k": model.k,
        }
    published = []
    if not choice.degraded or choice.reason == Reason.NOT_PUBLISHED:
        try:
            published = versions.list_published(svc.client)
        except REDIS_DOWN_ERRORS as e:
            svc.health.mark_down(e)
    body["versions"] = published
    return answer(body)


def _source(model) -> Source:
    """``personalized`` while the live version from Redis is in memory, else ``fallback``."""
    return Source.PERSONALIZED if model is not None and model.origin == "redis" else Source.FALLBACK


def _envelope(choice: ModelChoice) -> dict[str, Any]:
    """``model_version``, ``source`` and ``request_id`` of an answer about the model in use."""
    return {
        "model_version": choice.model.version if choice.model is not None else None,
        "source": Source.FALLBACK if choice.degraded else Source.PERSONALIZED,
        "request_id": request_id(),
    }
