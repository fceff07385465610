"""``GET /v1/items/<item_id>/similar`` and ``GET /v1/popular``: item lists that need no user data."""

from __future__ import annotations

from flask import Blueprint

from recsvc.web.params import declared, filter_args, parse_id
from recsvc.web.render import render
from recsvc.web.services import services

bp = Blueprint("items", __name__)


@bp.get("/v1/items/<item_id>/similar")
def similar(item_id: str):
    """Items closest to ``item_id`` (cosine of item factors), filtered; popular for unknown items."""
    item_id = parse_id(item_id, "item_id")
    q = declared()
    svc = services()
    result = svc.recommender.similar(item_id, q["n"] or svc.config.serving.default_n, filter_args(q))
    return render(result)


@bp.get("/v1/popular")
def popular():
    """The most popular items (overall, or in the asked categories), filtered."""
    q = declared()
    svc = services()
    return render(svc.recommender.popular(q["n"] or svc.config.serving.default_n, filter_args(q)))
