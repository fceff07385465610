"""``GET /v1/users/<user_id>/recommendations`` (personalised top-N) and ``.../buy-again`` (items the
user is due to buy again), with filters and fallbacks."""

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
    result = svc.recommender.recommend(
        user_id,
        n,
        wanted,
        variant=variant,
        include_due=bool(q["include_due"]),
        now=q["as_of"],
        explain=explain,
    )
    return render(result, user_id=user_id, strict=True)


@bp.get("/v1/users/<user_id>/buy-again")
def buy_again(user_id: str):
    """Items the user bought and is likely to buy again within ``horizon_days``, most due first."""
    user_id = parse_id(user_id, "user_id")
    q = declared()
    svc = services()
    n = q["n"] or svc.config.serving.default_n
    result = svc.recommender.buy_again(
        user_id, n, filter_args(q), horizon_days=q["horizon_days"], now=q["as_of"]
    )
    return render(result, user_id=user_id)
