"""``GET /v1/items/<item_id>/similar`` and ``GET /v1/popular``: item lists that need no user data."""

from __future__ import annotations

from flask import Blueprint

from recsvc.api.common import (
    FALLBACK,
    FILTER_PARAMS,
    PERSONALIZED,
    answer,
    live_model,
    parse_filters,
    parse_id,
    parse_n,
    query_args,
    recommendation_body,
    services,
)
from recsvc.core import ranking
from recsvc.core.ranking import EMPTY_ITEMS

bp = Blueprint("items", __name__)

PARAMS = ("n", *FILTER_PARAMS)


@bp.get("/v1/items/<item_id>/similar")
def similar(item_id: str):
    """Items closest to ``item_id`` in the model's factor space (cosine), filtered.

    An item the model does not know (e.g. added after training) gets the popular items of the asked
    category instead, with ``source: fallback`` -- a product page never shows an empty widget.
    """
    item_id = parse_id(item_id, "item_id")
    args = query_args(PARAMS)
    config = services().config
    n = parse_n(args, config)
    wanted = parse_filters(args, config)
    choice = live_model()
    model = choice.model
    if model is None:
        return answer(
            recommendation_body(
                None, EMPTY_ITEMS, EMPTY_ITEMS, source=FALLBACK, item_id=item_id, reason=choice.reason
            )
        )
    filters = wanted.for_model(model, config)
    anchor = model.item_index.get(item_id)
    if anchor is None:
        items, scores = ranking.popular_items(model, filters, n, exclude_items=None)
        body = recommendation_body(
            model, items, scores, source=FALLBACK, item_id=item_id, reason="unknown_item"
        )
        return answer(body)
    items, scores = ranking.similar_items(model, anchor, filters, n, unit_factors=model.unit_item_factors)
    extra = {"reason": choice.reason} if choice.degraded else {}
    source = FALLBACK if choice.degraded else PERSONALIZED
    return answer(recommendation_body(model, items, scores, source=source, item_id=item_id, **extra))


@bp.get("/v1/popular")
def popular():
    """The most popular items (overall, or in the asked categories), filtered."""
    args = query_args(PARAMS)
    config = services().config
    n = parse_n(args, config)
    wanted = parse_filters(args, config)
    choice = live_model()
    model = choice.model
    extra = {"reason": choice.reason} if choice.degraded else {}
    if model is None:
        return answer(recommendation_body(None, EMPTY_ITEMS, EMPTY_ITEMS, source=FALLBACK, **extra))
    items, scores = ranking.popular_items(model, wanted.for_model(model, config), n)
    return answer(recommendation_body(model, items, scores, source=FALLBACK, **extra))
