"""``GET /v1/users/<user_id>/recommendations``: personalised top-N with filters and fallbacks."""

from __future__ import annotations

from flask import Blueprint

from recsvc.web.params import FILTER_PARAMS, parse_filters, parse_id, parse_n, query_args
from recsvc.web.render import assignment, render, variant_of
from recsvc.web.services import services

bp = Blueprint("recommendations", __name__)

PARAMS = frozenset(("n", *FILTER_PARAMS))


@bp.get("/v1/users/<user_id>/recommendations")
def recommendations(user_id: str):
    """Top ``n`` items for a user, filtered; popular items for unknown users or when Redis is down."""
    user_id = parse_id(user_id, "user_id")
    args = query_args(PARAMS)
    svc = services()
    n = parse_n(args, svc.config)
    wanted = parse_filters(args, svc.config)
    variant = variant_of(assignment(user_id))
    result = svc.recommender.recommend(user_id, n, wanted, variant=variant)
    return render(result, user_id=user_id, strict=True)
