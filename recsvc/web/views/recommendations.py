"""``GET /v1/users/<user_id>/recommendations``: personalised top-N with filters and fallbacks."""

from __future__ import annotations

from flask import Blueprint

from recsvc.web.params import declared, filter_args, parse_id
from recsvc.web.render import assignment, render, variant_of
from recsvc.web.services import services

bp = Blueprint("recommendations", __name__)


@bp.get("/v1/users/<user_id>/recommendations")
def recommendations(user_id: str):
    """Top ``n`` items for a user, filtered; popular items for unknown users or when Redis is down."""
    user_id = parse_id(user_id, "user_id")
    q = declared()
    svc = services()
    n = q["n"] or svc.config.serving.default_n
    wanted = filter_args(q)
    variant = variant_of(assignment(user_id))
    explain = q["explain"] is not False
    result = svc.recommender.recommend(user_id, n, wanted, variant=variant, explain=explain)
    return render(result, user_id=user_id, strict=True)
