"""``GET /v1/users/<user_id>/recommendations``: personalised top-N with filters and fallbacks."""

from __future__ import annotations

import numpy as np
from flask import Blueprint

from recsvc import realtime
from recsvc.analytics import experiments
from recsvc.api.common import (
    FALLBACK,
    FILTER_PARAMS,
    PERSONALIZED,
    REALTIME,
    answer,
    fallback_model,
    parse_filters,
    parse_id,
    parse_n,
    query_args,
    recommendation_body,
    services,
)
from recsvc.core import ranking
from recsvc.serving import REDIS_DOWN_ERRORS, ModelNotPublished, UserRecord, fetch_request_data

bp = Blueprint("recommendations", __name__)

PARAMS = frozenset(("n", *FILTER_PARAMS))


@bp.get("/v1/users/<user_id>/recommendations")
def recommendations(user_id: str):
    """Top ``n`` items for a user, filtered; popular items for unknown users or when Redis is down."""
    user_id = parse_id(user_id, "user_id")
    args = query_args(PARAMS)
    svc = services()
    config = svc.config
    n = parse_n(args, config)
    wanted = parse_filters(args, config)
    # A/B experiments (issue 7): a variant's model version or strategy decides what is served.
    if (served := experiments.serve_variant(user_id, n, wanted)) is not None:
        return answer(served)

    choice = None
    record: UserRecord | None = None
    model = None
    has_recent = 0
    recent_probe = (realtime.recent_key(user_id),)
    if svc.health.is_down():
        choice = fallback_model("redis_unavailable")
    else:
        try:
            model = svc.models.current() or svc.models.get(svc.client, force_check=True)
            if model is not None:
                # One round trip: live pointer, the user's record, and whether real time could
                # apply at all (the user has recent events), so most requests never pay a second.
                live, record, (has_recent,) = fetch_request_data(svc.client, model, user_id, recent_probe)
                if live != model.version:
                    # A publish or rollback happened: switch once, then read the user again.
                    model = svc.models.switch(svc.client, live) if live is not None else None
                    if model is not None:
                        _, record, (has_recent,) = fetch_request_data(
                            svc.client, model, user_id, recent_probe
                        )
            svc.health.mark_up()
            if model is None:
                choice = fallback_model("not_published")
        except REDIS_DOWN_ERRORS as e:
            svc.health.mark_down(e)
            choice = fallback_model("redis_unavailable")
        except ModelNotPublished:
            choice = fallback_model("not_published")

    if choice is not None:
        # Degraded: the in-process (or local artifact) popularity, in the asked category.
        model = choice.model
        if model is None:
            empty = np.zeros(0, np.int32)
            body = recommendation_body(
                None, empty, empty, source=FALLBACK, user_id=user_id, reason=choice.reason
            )
            return answer(body)
        items, scores = ranking.popular_items(model, wanted.for_model(model, config), n)
        body = recommendation_body(
            model, items, scores, source=FALLBACK, user_id=user_id, reason=choice.reason
        )
        return answer(body)

    filters = wanted.for_model(model, config, record.purchased if record is not None else None)
    # Real-time personalisation (issue 4): a user with events newer than the model, or a visitor the
    # model does not know with at least one event, is folded in against the live item factors.
    known = record is not None
    folded = None
    if has_recent:
        folded = realtime.recommend(
            model, svc.client, user_id, filters, n, known_user=known, history_length=config.history_length
        )
    if folded is not None:
        items, scores, _vector = folded
        return answer(recommendation_body(model, items, scores, source=REALTIME, user_id=user_id))
    if record is None:
        items, scores = ranking.popular_items(model, filters, n)
        body = recommendation_body(
            model, items, scores, source=FALLBACK, user_id=user_id, reason="unknown_user"
        )
        return answer(body)
    # Scores only for the items returned (the cached list is in score order).
    items, scores, _how = ranking.recommend_from_cache(
        model, record.topk_items, None, record.vector, filters, n
    )
    return answer(recommendation_body(model, items, scores, source=PERSONALIZED, user_id=user_id))
